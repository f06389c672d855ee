"""The pipeline runner: runs the stages in `cai.stages.ORDER`, asking each what it reads.

Each stage writes into <output_dir>/<stage>/ and is done when its marker `_COMPLETE.json` exists
with the stage's current cache key. The key hashes what the stage declares it reads: its settings,
the constitution parts it uses, its models, and the keys of its input stages. A stage whose key
changed is cleared and rerun; so are the stages downstream of it, because their keys include its key.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path

from cai import stopping
from cai.cards import ConstitutionRef, write_dataset_card
from cai.cluster import Resources, check_cluster, stop_ray
from cai.config import PipelineConfig, active_stages, feedback_model
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.metrics_log import check_installed
from cai.models import resolve_model
from cai.progress import console
from cai.run_lock import RunLock
from cai.shards import write_atomic
from cai.stages import ORDER, POLICY, Reads, Stage

MARKER, STARTED, OWNER, STOP = "_COMPLETE.json", "_STARTED.json", "cai-run.json", "_STOP"


def stage(name: str) -> Stage:
    """The stage module `cai.stages.<name>`."""
    return importlib.import_module(f"cai.stages.{name}")  # type: ignore[return-value]


def reads(cfg: PipelineConfig, name: str) -> Reads:
    """What a stage reads: its READS, or, for a stage whose inputs follow its config (evaluate), `reads(cfg)`."""
    s = stage(name)
    return s.reads(cfg) if hasattr(s, "reads") else s.READS


def upstream(cfg: PipelineConfig, name: str) -> dict[str, str]:
    """Input name -> the stage that produces it; `policy` is whichever of ppo or dpo the config runs."""
    return {read: cfg.policy_optimization if read == POLICY else read for read in reads(cfg, name).stages}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def claim_output_dir(out: Path, run_name: str) -> None:
    """An output folder belongs to one run name; refuse folders that hold anything else."""
    if out.exists() and not out.is_dir():
        raise CaiError(f"output_dir {out}: is a file, not a folder")
    owner = read_json(out / OWNER)
    if owner is None and out.exists() and any(out.iterdir()):
        raise CaiError(f"output_dir {out}: holds files that are not a cai run's outputs; choose an empty folder")
    if owner is not None and owner.get("name") != run_name:
        raise CaiError(f"output_dir {out}: holds the outputs of run '{owner.get('name')}', not '{run_name}'; "
                       f"choose another output_dir or set name: {owner.get('name')}")
    if owner is None:
        write_atomic(out / OWNER, json.dumps({"name": run_name, "created": time.time()}))


def stage_ingredients(cfg: PipelineConfig, constitution) -> tuple[dict[str, str], dict[str, dict]]:
    """-> (stage -> cache key, stage -> what the key hashes). The markers record the ingredients so that `cai plan`
    can say what changed: settings, models, each constitution part's hash (and the file), the inputs' keys."""
    keys: dict[str, str] = {}
    ingredients: dict[str, dict] = {}
    for name in ORDER:
        s = stage(name)
        settings, models, parts = s.settings(cfg), s.models(cfg), reads(cfg, name).constitution
        sources = upstream(cfg, name)
        blob = json.dumps({"stage": name, "settings": settings, "models": models,
                           "constitution": constitution.part_hash(*parts) if parts else None,
                           "inputs": {read: keys.get(src) for read, src in sources.items()}},
                          sort_keys=True)  # unchanged since before ingredients were recorded: old runs stay cached
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        ingredients[name] = {
            "settings": settings, "models": models,
            "constitution": {"file": str(cfg.constitution), "parts": {p: constitution.part_hash(p) for p in parts}}
            if parts else None,
            "inputs": {read: {"stage": src, "key": keys.get(src)} for read, src in sources.items()}}
    return keys, ingredients


def stage_keys(cfg: PipelineConfig, constitution) -> dict[str, str]:
    return stage_ingredients(cfg, constitution)[0]


def is_done(stage_dir: Path, key: str) -> bool:
    marker = read_json(stage_dir / MARKER)
    return marker is not None and marker.get("key") == key


def policy_model(cfg: PipelineConfig) -> Path:
    """The RL-CAI policy of a run: ppo's model or dpo's, whichever the config runs; one line if not done."""
    keys = stage_keys(cfg, load_constitution(cfg.constitution))
    name = cfg.policy_optimization
    folder = Path(cfg.output_dir) / name
    if not is_done(folder, keys[name]):
        raise CaiError(f"{folder}: the {name} stage has no current output; run it first")
    return folder / "model"


def planned_workers(cfg: PipelineConfig, selected: list[str]) -> list[tuple[int, Resources]]:
    """(count, each) of the Ray workers the selected stages start, for one check before any work."""
    needs = []
    for name in selected:
        if stage(name).WORKERS == "training":
            train = getattr(cfg, name).train
            needs.append((train.workers, Resources.of_training(train, name)))
        else:  # the policy generates; labels and verdicts come from the feedback model's pool
            roles = [cfg.policy] + ([feedback_model(cfg)] if name in ("preferences", "evaluate") else [])
            needs.extend(Resources.of_generation(cfg.ray, model) for model in roles)
    return needs


def _clear(stage_dir: Path) -> None:
    """Move aside, then delete: a crash in between never leaves a half-deleted stage in place."""
    if stage_dir.exists():
        trash = stage_dir.with_name(f".{stage_dir.name}.old{os.getpid()}")
        os.replace(stage_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _run_stage(cfg: PipelineConfig, constitution, name: str, keys: dict[str, str], ingredients: dict) -> dict:
    out = Path(cfg.output_dir)
    s, stage_dir = stage(name), out / name
    inputs = {}
    for read, src in upstream(cfg, name).items():
        if not is_done(out / src, keys[src]):
            raise CaiError(f"stage {name}: needs the current output of stage {src}; run it first "
                           f"(add it to --stages)")
        inputs[read] = out / src
    if is_done(stage_dir, keys[name]):
        console.print(f"[green]✓[/] {name}: up to date ({keys[name]}), skipped")
        return {"status": "cached", **read_json(stage_dir / MARKER)["summary"]}
    started = read_json(stage_dir / STARTED)
    if stage_dir.exists() and (started is None or started.get("key") != keys[name]):
        _clear(stage_dir)  # outputs of another config: never mix them with this one's
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(stage_dir / STARTED, json.dumps({"key": keys[name], "shards": s.planned_shards(cfg, inputs),
                                                  "ingredients": ingredients}))
    console.print(f"[bold]▶ {name}[/] ({keys[name]})")
    t0 = time.time()
    summary = s.run(cfg, constitution, inputs, stage_dir)
    seconds = round(time.time() - t0, 1)
    write_dataset_card(stage_dir, name, cfg.name, ConstitutionRef.of(constitution, cfg.constitution), s.settings(cfg),
                       summary)  # README.md for the stage's JSONL files, before the marker commits them
    made_with = {"name": constitution.name, "path": cfg.constitution}  # read back by evaluations of this run
    write_atomic(stage_dir / MARKER, json.dumps({"key": keys[name], "summary": summary, "seconds": seconds,
                                                 "constitution": made_with, "ingredients": ingredients}, indent=1))
    console.print(f"[green]✓[/] {name}: done in {seconds}s {json.dumps(summary)}")
    return {"status": "done", **summary}


def read_user_files(cfg: PipelineConfig, todo: list[str]) -> None:
    """The user's prompt files, given pairs and evaluation sets of the stages to run, read once before Ray starts:
    a bad one is one line, and nothing is written."""
    from cai.prompt_files import read_source

    if "prompts" in todo:
        for src in (*cfg.prompts.red_team, *cfg.prompts.helpful):
            read_source(src)
    if "preferences" in todo and cfg.preferences.helpful_pairs:
        stage("preferences").given_helpful_pairs(cfg.preferences)
    if "evaluate" in todo:
        stage("evaluate").load_sets(cfg)


def run_pipeline(cfg: PipelineConfig, only: list[str] | None = None) -> dict[str, dict]:
    """Run the configured stages in order, skipping those whose outputs are current."""
    out = Path(cfg.output_dir)
    constitution = load_constitution(cfg.constitution)
    selected = [s for s in ORDER if s in only] if only else active_stages(cfg)
    keys, ingredients = stage_ingredients(cfg, constitution)
    for name in selected:
        for model in stage(name).models(cfg).values():
            resolve_model(model)  # a missing model fails here, before anything is written
    if any(stage(name).WORKERS == "training" for name in selected):
        check_installed(cfg.report_to)  # so does a missing W&B or trackio package
    read_user_files(cfg, [name for name in selected if not is_done(out / name, keys[name])])
    claim_output_dir(out, cfg.name)
    results: dict[str, dict] = {}
    with RunLock(out), stopping.StopOnSignal(out / STOP):
        record_pipeline(out, cfg)
        try:
            check_cluster(cfg.ray, planned_workers(cfg, selected), out)
            for name in selected:
                stopping.check(f"before stage {name}")
                results[name] = _run_stage(cfg, constitution, name, keys, ingredients[name])
        finally:
            stop_ray()
    for name in selected:  # the per-principle tables, at the end where they are seen
        table = out / name / "attribution.md"
        if table.exists():
            console.print(table.read_text())
    return results


def record_pipeline(out: Path, cfg: PipelineConfig) -> None:
    """cai-run.json keeps the stages the run's pipeline uses, so that `cai status` can mark the others."""
    owner = read_json(out / OWNER) or {}
    write_atomic(out / OWNER, json.dumps({**owner, "stages": active_stages(cfg),
                                          "policy_optimization": cfg.policy_optimization}))


def unused_note(owner: dict, name: str) -> str | None:
    """Why the run's pipeline (as recorded in cai-run.json) does not use a stage; None if it does or if unknown."""
    if "stages" not in owner or name in owner["stages"]:
        return None
    chosen = owner.get("policy_optimization")
    return f"it trains with {chosen}" if name in ("ppo", "dpo") and chosen != name else "not in its stages"


def committed_shards(stage_dir: Path, started: dict) -> tuple[int, int]:
    """(committed, planned) shards of a started stage; only the planned shard families count."""
    plan = started["shards"]
    have = sum(len(list((stage_dir / "shards" / part).glob("shard-*.jsonl"))) for part in plan)
    return have, sum(plan.values())


def stage_status(out: Path) -> list[tuple[str, str]]:
    """(stage, 'done' | 'partial (n of m shards)' | 'not started' | 'not used by this pipeline') for every stage."""
    if Path(out).exists() and not Path(out).is_dir():
        raise CaiError(f"{out}: is a file, not a run's output folder")
    rows = []
    owner = read_json(Path(out) / OWNER) or {}
    for name in ORDER:
        stage_dir = Path(out) / name
        marker, started = read_json(stage_dir / MARKER), read_json(stage_dir / STARTED)
        unused = unused_note(owner, name)
        if marker is not None:
            state = f"done in {marker['seconds']}s: {json.dumps(marker['summary'])}"
        elif started is not None:
            state = "partial ({} of {} shards)".format(*committed_shards(stage_dir, started))
        elif unused:
            rows.append((name, f"not used by this pipeline ({unused})"))
            continue
        else:
            state = "not started"
        rows.append((name, f"{state}; not used by this pipeline now ({unused})" if unused else state))
    return rows
