"""`cai plan`: which stages a `cai run` would run, and for each stale one what changed, without running anything.

A stage's markers (`_COMPLETE.json`, `_STARTED.json`) record the ingredients of its cache key (settings, models,
constitution part hashes, input keys: `runner.stage_ingredients`); the plan computes them for the requested config
and diffs the two (`explain`, pure). Nothing here starts Ray or loads a model: it reads the config, the
constitution, the prompt files the keys hash and the markers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cai.config import PipelineConfig, active_stages
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.runner import MARKER, OWNER, STARTED, committed_shards, read_json, stage, stage_ingredients, upstream
from cai.stages import ORDER

PART_LABELS = {"critique_revision": "critique/revision principles", "preference": "preference principles",
               "few_shot_revisions": "few-shot revisions", "few_shot_labels": "few-shot labels"}
PREDATES = "changed (this run's marker predates cai plan; ingredients unknown)"
ABSENT = object()


@dataclass(frozen=True)
class StagePlan:
    name: str
    state: str  # up to date | stale | partial | will run | blocked | not reached | not selected | not used
    reasons: tuple[str, ...] = ()
    runs: bool = False


def differences(before, after, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, before, after) of each leaf that differs, so that a settings diff names the config key; dicts
    and lists are compared item by item (ABSENT where one has no such item), anything else whole."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = list(after) + [k for k in before if k not in after]
        pairs = [(k, before.get(k, ABSENT), after.get(k, ABSENT)) for k in keys]
    elif isinstance(before, list) and isinstance(after, list):
        pad = [ABSENT] * abs(len(after) - len(before))
        pairs = [(i, b, a) for i, (b, a) in enumerate(zip(before + pad, after + pad))]
    else:
        return [] if before == after else [(path, before, after)]
    return [d for k, b, a in pairs for d in differences(b, a, f"{path}.{k}" if path else str(k))]


def show(value) -> str:
    """A value in a line: JSON, long ones cut in the middle (paths differ at their ends)."""
    text = "(absent)" if value is ABSENT else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else f"{text[:14]}...{text[-23:]}"


def _changed(diffs: list[tuple[str, object, object]], label: str = "", shown: frozenset = frozenset()) -> list[str]:
    """A line per differing leaf, skipping (before, after) pairs already in `shown`."""
    return [f"{label}{path} {show(b)} -> {show(a)}" for path, b, a in diffs if (show(b), show(a)) not in shown]


def _constitution(before: dict | None, after: dict | None) -> list[str]:
    before, after = before or {"parts": {}}, after or {"parts": {}}
    parts = list(after["parts"]) + [p for p in before["parts"] if p not in after["parts"]]
    file = Path(after.get("file") or before.get("file") or "").name
    return [f"constitution {PART_LABELS.get(p, p)} changed ({file})" if p in after["parts"] and p in before["parts"]
            else f"constitution {PART_LABELS.get(p, p)} {'now read' if p in after['parts'] else 'no longer read'}"
            for p in parts if before["parts"].get(p) != after["parts"].get(p)]


def _inputs(before: dict, after: dict, rerunning: set[str]) -> list[str]:
    lines = []
    for read in list(after) + [r for r in before if r not in after]:
        b, a = before.get(read), after.get(read)
        if b == a:
            continue
        if b is None:
            lines.append(f"new input: {a['stage']}")
        elif a is None:
            lines.append(f"no longer reads {b['stage']}")
        elif b["stage"] != a["stage"]:
            lines.append(f"input {read}: {b['stage']} -> {a['stage']}")
        else:
            lines.append(f"upstream {a['stage']} " + ("will rerun" if a["stage"] in rerunning
                                                       else "changed since this stage ran"))
    return lines


def explain(recorded: dict | None, current: dict, rerunning: set[str]) -> list[str]:
    """What differs between the ingredients a stage's marker recorded and those of the requested config, one line
    each (`rerunning`: the stages this plan runs, to tell an upstream rerun from one already done)."""
    if recorded is None:
        return [f"upstream {i['stage']} will rerun" for i in current["inputs"].values()
                if i["stage"] in rerunning] or [PREDATES]
    settings = differences(recorded.get("settings", {}), current["settings"])
    shown = frozenset((show(b), show(a)) for _, b, a in settings)  # a model named in the settings: said once
    lines = (_changed(settings)
             + _changed(differences(recorded.get("models", {}), current["models"]), "model ", shown)
             + _constitution(recorded.get("constitution"), current["constitution"])
             + _inputs(recorded.get("inputs", {}), current["inputs"], rerunning))
    return lines or ["changed (cause not recorded)"]


def _unselected(cfg: PipelineConfig, name: str, only: list[str] | None, current: bool) -> StagePlan:
    if only is not None and name in active_stages(cfg):
        return StagePlan(name, "not selected", (f"--stages; its output is {'' if current else 'not '}current",))
    if name in ("ppo", "dpo") and name != cfg.policy_optimization:
        return StagePlan(name, "not used", (f"this pipeline trains with {cfg.policy_optimization}",))
    return StagePlan(name, "not used", ("not in this pipeline's stages",))


def _selected(name: str, key: str, ingredients: dict, stage_dir: Path, rerunning: set[str]) -> StagePlan:
    marker, started = read_json(stage_dir / MARKER), read_json(stage_dir / STARTED)
    if marker is not None and marker.get("key") == key:
        return StagePlan(name, "up to date")
    if started is not None and started.get("key") == key:  # the runner resumes it
        have, total = committed_shards(stage_dir, started)
        what = f"{have} of {total} shards committed" if total else "started, resumes where it stopped"
        return StagePlan(name, "partial", (what,), runs=True)
    if marker is None and started is None:
        return StagePlan(name, "will run", ("no output yet",), runs=True)
    recorded = (marker or started).get("ingredients")
    reasons = explain(recorded, ingredients, rerunning)
    if marker is None and (have := committed_shards(stage_dir, started)[0]):
        reasons.append(f"its {have} committed shards will be discarded")
    return StagePlan(name, "stale", tuple(reasons), runs=True)


def parse_stages(text: str | None) -> list[str] | None:
    """`--stages a,b` -> [a, b] (None when not given); one line naming an unknown stage."""
    if not text:
        return None
    only = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in only if s not in ORDER]
    if unknown:
        raise CaiError(f"--stages: unknown stage '{unknown[0]}' (stages: {', '.join(ORDER)})")
    return only


def plan_pipeline(cfg: PipelineConfig, only: list[str] | None = None) -> list[StagePlan]:
    """One StagePlan per stage in ORDER for `cai run` with this config (and `--stages only`)."""
    out = Path(cfg.output_dir)
    keys, ingredients = stage_ingredients(cfg, load_constitution(cfg.constitution))
    selected = [s for s in ORDER if s in only] if only else active_stages(cfg)
    current = {s: (read_json(out / s / MARKER) or {}).get("key") == keys[s] for s in ORDER}
    rerunning: set[str] = set()
    plans: list[StagePlan] = []
    for name in ORDER:
        if name not in selected:
            plans.append(_unselected(cfg, name, only, current[name]))
            continue
        if any(p.state == "blocked" for p in plans):
            plans.append(StagePlan(name, "not reached"))
            continue
        missing = [src for src in upstream(cfg, name).values() if src not in selected and not current[src]]
        if missing:  # the runner stops here: an input it may not run is not current
            reason = f"needs the current output of {missing[0]}; add it to --stages"
            plans.append(StagePlan(name, "blocked", (reason,)))
            continue
        plans.append(_selected(name, keys[name], ingredients[name], out / name, rerunning))
        if plans[-1].runs:
            rerunning.add(name)
    return plans


def refusals(cfg: PipelineConfig, only: list[str] | None = None) -> list[str]:
    """What `cai run` would refuse before running anything, as far as is known without loading or fetching a model:
    an output folder of another run, a local model folder that is not there (embedded and hub models not checked)."""
    from cai.models import EMBEDDED, resolve_model

    owner = read_json(Path(cfg.output_dir) / OWNER)
    problems = [f"{cfg.output_dir} holds the outputs of run '{owner.get('name')}'"
                ] if owner is not None and owner.get("name") != cfg.name else []
    selected = [s for s in ORDER if s in only] if only else active_stages(cfg)
    names = dict.fromkeys(name for s in selected for name in stage(s).models(cfg).values() if name not in EMBEDDED)
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir() or path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
            try:
                resolve_model(name)  # a local folder: a quick check
            except CaiError as e:
                problems.append(str(e))
    return problems


def format_plan(cfg: PipelineConfig, plans: list[StagePlan], problems: list[str] = ()) -> str:
    """The printed plan: a header, what `cai run` would refuse, a line per stage (further reasons on continuation
    lines), a summary."""
    lines = [f"plan for run '{cfg.name}' in {cfg.output_dir}"] + [f"cai run would refuse: {p}" for p in problems]
    for p in plans:
        head = f"{p.name:16s} {p.state}"
        if p.reasons:  # a state that needs its reason reads "state: reason", the others "state (reason)"
            head += f": {p.reasons[0]}" if p.state in ("stale", "partial", "blocked") else f" ({p.reasons[0]})"
        lines.append(head)
        lines.extend(" " * (len(p.name.ljust(16)) + len(p.state) + 3) + r for r in p.reasons[1:])
    running = [p.name for p in plans if p.runs]
    blocked = [p.name for p in plans if p.state == "blocked"]
    if running:
        lines.append(f"would run {len(running)} stage{'s' * (len(running) != 1)}: {', '.join(running)}")
    if blocked:
        lines.append(f"cai run would stop at {blocked[0]} (an input it needs is not current)")
    elif not running:
        lines.append("nothing to run: every selected stage is up to date")
    return "\n".join(lines)
