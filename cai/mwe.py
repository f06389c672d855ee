"""`cai mwe`: model-written evaluations (Perez et al. 2022, "Discovering Language Model Behaviors with Model-Written
Evaluations"): yes/no probes for a named behaviour, written by one model and checked by another, then how far each
checkpoint answers them as an assistant with the behaviour would; with PPO snapshots (ppo@N), whether more RL
makes a behaviour (a stated wish to avoid shutdown, sycophancy) stronger.

Steps:
  1. statements: the writer model (mwe.writer_model, by default the feedback model) sees a behaviour's examples
     of one side (statements an assistant with it would agree with, or disagree with) and writes more: mwe.n
     sampled outputs per side, batched and seeded; each line is one statement (cai/mwe_data.py), and an output
     with none is counted as unparseable;
  2. labels: the judge (mwe.judge_model) is asked whether such an assistant would agree with each statement, both
     option orders averaged as cai/feedback.py asks; a statement whose side gets less than
     mwe.min_label_confidence, or whose verdict is off the options, is dropped;
  3. near duplicates (of a more confident statement, or of an example) go, and the sides are balanced;
  4. probes.jsonl in Anthropic's layout; with --probes FILE, steps 1-3 are skipped and the file is read instead;
  5. scores: each checkpoint's probability of each answer after each question (cai/mwe_scoring.py);
  6. mwe.json and report.html (cai/report_mwe.py), committed together into <output_dir>/audit/mwe/<behaviour>/.
Work is committed in shards under <output_dir>/audit/mwe/.work/<behaviour>/, so a stopped or killed run resumes.

  cai mwe pipelines/default.yaml --behaviour avoid-shutdown --checkpoints base,sft,policy,ppo@2 [--n 64]
  cai mwe pipelines/default.yaml --probes persona/desire-to-not-have-memory-erased.jsonl --checkpoints base,policy
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cai.checkpoints import Checkpoint, resolve, unique_labels
from cai.config import ModelConfig, MweConfig, PipelineConfig, feedback_model
from cai.errors import CaiError
from cai.mwe_data import (NAME, SIDES, Behaviour, Probe, load_behaviour, parse_statements, probe_row, probes_text,
                          read_probes, statement_probe, writer_messages)
from cai.mwe_scoring import checkpoint_scores, differences, match_probability, training_order
from cai.mwe_shards import judge_shard, score_shard, write_shard

@dataclass(frozen=True)
class Plan:
    """What a run does, every input checked before a model loads."""
    name: str
    out: Path                       # <output_dir>/audit/mwe/<name>
    work: Path                      # its shards
    behaviour: Behaviour | None     # None: probes given
    probes: list[Probe] | None
    probes_source: str
    checkpoints: list[Checkpoint]
    writer: ModelConfig
    judge: ModelConfig


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _local(model: ModelConfig) -> ModelConfig:
    """A local model folder made absolute, for Ray actors started elsewhere."""
    path = os.path.expanduser(model.name)
    return model.model_copy(update={"name": os.path.abspath(path)}) if os.path.isdir(path) else model


def _folder_stamp(model: str) -> str:
    """What a model folder holds now (names, sizes, times), so that a retrained checkpoint is scored again."""
    path = Path(model).expanduser()
    return "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(path.glob("*"))) \
        if path.is_dir() else model


# -- step 0: every input checked ------------------------------------------------------------------
def resolve_checkpoints(cfg: PipelineConfig, specs: list[str]) -> list[Checkpoint]:
    """As `cai eval` names them; a checkpoint of this run must be its stage's current output."""
    from cai.constitution import load_constitution
    from cai.runner import is_done, stage_keys

    constitution = load_constitution(cfg.constitution)
    run_dir, keys, found = Path(cfg.output_dir), None, []
    try:
        for spec in specs:
            c = resolve(spec, run_dir, cfg.policy.name, cfg.policy_optimization, cfg.name, cfg.ppo.steps,
                        constitution.name)
            if c.stage is not None:
                keys = keys or stage_keys(cfg, constitution)
                if not is_done(run_dir / c.stage, keys[c.stage]):
                    raise CaiError(f"evaluate.checkpoints: '{spec}': the {c.stage} stage in {run_dir} has no current "
                                   f"output for this config; run it first (with the same overrides)")
            found.append(c)
        unique_labels(found)
    except CaiError as e:  # checkpoints.py names the key evaluate.checkpoints; here it is mwe.checkpoints
        raise CaiError(str(e).replace("evaluate.checkpoints", "mwe.checkpoints", 1)) from None
    return found


def plan(cfg: PipelineConfig, behaviour: str | None, probes_file: str | None) -> Plan:
    from cai.models import resolve_model

    m = cfg.mwe
    if not behaviour and not probes_file:
        raise CaiError("cai mwe: give --behaviour NAME (a behaviour of mwe.behaviours) or --probes FILE")
    name = behaviour or Path(probes_file).stem
    if not re.fullmatch(NAME, name):
        raise CaiError(f"cai mwe: '{name}' cannot name the output folder (letters, digits, '.', '_' and '-' only)")
    spec = m.behaviours if m.behaviours.startswith("builtin:") else os.path.abspath(os.path.expanduser(m.behaviours))
    found = None if probes_file else load_behaviour(spec, name)
    probes = read_probes(os.path.abspath(os.path.expanduser(probes_file))) if probes_file else None
    checkpoints = resolve_checkpoints(cfg, m.checkpoints)
    writer, judge = (_local(model or feedback_model(cfg)) for model in (m.writer_model, m.judge_model))
    for model in ([] if probes else [writer.name, judge.name]) + [c.model for c in checkpoints]:
        resolve_model(model)  # a missing model fails here, before anything is written
    out = Path(cfg.output_dir) / "audit" / "mwe" / name
    return Plan(name, out, out.parent / ".work" / name, found, probes,
                os.path.abspath(probes_file) if probes_file else "generated", checkpoints, writer, judge)


# -- steps 1-5 on pools of actors -----------------------------------------------------------------
def _with_pool(model: ModelConfig, cfg: PipelineConfig, work):
    from cai.pool import GenerationPool

    pool = GenerationPool(model, cfg.ray)
    try:
        return work(pool)
    finally:
        pool.shutdown()


def _map(pool, fn, rows: list[dict], folder: Path, family: str, cfg: PipelineConfig) -> list[dict]:
    from cai.shards import ShardStore, chunk

    shards = chunk(rows, cfg.mwe.shard_size)
    store = ShardStore(folder / family, len(shards))
    pool.map_shards(fn, shards, store, cfg.seed, family.split("-")[0])
    return store.rows()


def statements_of(outputs: list[dict]) -> list[dict]:
    return [{"id": f"{o['id']}.{j}", "side": o["side"], "statement": s}
            for o in outputs for j, s in enumerate(parse_statements(o["text"], o["finished"]))]


def write_and_judge(cfg: PipelineConfig, p: Plan) -> tuple[list[dict], list[dict], list[dict]]:
    """Steps 1-2 -> (the writer's outputs, every parsed statement with the judge's verdict, the judge's verdicts on
    the behaviour's examples it is not shown, as a check of the judge). One pool when the writer is the judge (the
    default), so the model loads once."""
    m, b = cfg.mwe, p.behaviour
    requests = [{"id": f"{side}-{i:05d}", "side": side,
                 "messages": writer_messages(b, side, random.Random(f"{cfg.seed}|mwe|{b.name}|{side}|{i}"))}
                for side in SIDES for i in range(m.n)]
    checks = [{"id": f"check-{side}-{i}", "side": side, "statement": s}
              for side in SIDES for i, s in enumerate(b.examples(side)[1:])]  # the first of each side is a shot
    wkey = _key(b.model_dump(), m.n, m.generation.model_dump(), p.writer.model_dump(), cfg.seed)
    write = functools.partial(write_shard, generation=m.generation)
    judge = functools.partial(judge_shard, behaviour=b, max_tokens=m.max_prompt_tokens, batch_size=m.batch_size)

    def writing(pool):
        return _map(pool, write, requests, p.work, f"write-{wkey}", cfg)

    def judging(pool, outputs):  # keyed by its rows: a change in parsing makes other rows
        rows = checks + statements_of(outputs)
        key = _key(rows, b.model_dump(), p.judge.model_dump(), m.max_prompt_tokens)
        return _map(pool, judge, rows, p.work, f"judge-{key}", cfg)

    if p.writer == p.judge:
        def both(pool):
            outputs = writing(pool)
            return outputs, judging(pool, outputs)
        outputs, judged = _with_pool(p.writer, cfg, both)
    else:
        outputs = _with_pool(p.writer, cfg, writing)
        judged = _with_pool(p.judge, cfg, lambda pool: judging(pool, outputs))
    return outputs, judged[len(checks):], judged[:len(checks)]


def label_confidence(verdict: dict, min_option_mass: float) -> float | None:
    """The judge's probability for the statement's own side; None when it gave no answer (too long, off the
    options)."""
    if "skipped" in verdict or verdict["option_mass"] < min_option_mass:
        return None
    return verdict["p_agree"] if verdict["side"] == "agree" else 1 - verdict["p_agree"]


def judge_check(verdicts: list[dict], m: MweConfig) -> dict:
    """How often the judge gives the right side more than half of the probability, on examples of known side."""
    confidences = [label_confidence(v, m.min_option_mass) for v in verdicts]
    answered = [c for c in confidences if c is not None]
    correct = sum(c > 0.5 for c in answered)
    return {"examples": len(verdicts), "answered": len(answered), "correct": correct,
            "accuracy": round(correct / len(answered), 4) if answered else None}


def filter_statements(outputs: list[dict], judged: list[dict], behaviour: Behaviour, m: MweConfig
                      ) -> tuple[list[dict], list[Probe], dict]:
    """Steps 2-3 -> (every statement with its label confidence and fate, the probes kept, counts at each step)."""
    from cai.mwe_data import drop_near_duplicates

    rows = []
    for r in judged:
        confident = label_confidence(r, m.min_option_mass)
        fate = "judge_skipped" if confident is None else "below_label_confidence" \
            if confident < m.min_label_confidence else None
        rows.append({**r, "label_confidence": confident and round(confident, 5), "fate": fate})
    live = sorted((r for r in rows if r["fate"] is None), key=lambda r: -r["label_confidence"])
    for r, fate in zip(live, drop_near_duplicates([r["statement"] for r in live], behaviour.agree + behaviour.disagree,
                                                  m.near_duplicate_threshold)):
        r["fate"] = fate
    kept = [r for r in live if r["fate"] == "kept"]
    quota = min(sum(r["side"] == s for r in kept) for s in SIDES) if m.balance else len(kept)
    seen = {s: 0 for s in SIDES}
    for r in kept:  # most confident first
        seen[r["side"]] += 1
        if seen[r["side"]] > quota:
            r["fate"] = "unbalanced"
    probes = [statement_probe(r["statement"], r["side"], r["label_confidence"]) for r in live if r["fate"] == "kept"]
    count = lambda fate: sum(r["fate"] == fate for r in rows)  # noqa: E731
    steps = {"writer_outputs": len(outputs),
             "unparseable_outputs": sum(not parse_statements(o["text"], o["finished"]) for o in outputs),
             "statements": len(rows), "judge_skipped": count("judge_skipped"),
             "below_label_confidence": count("below_label_confidence"), "copies_of_examples": count("copy_of_example"),
             "near_duplicates": count("near_duplicate"), "unbalanced": count("unbalanced"), "probes": len(probes)}
    return rows, probes, steps


def score_checkpoints(cfg: PipelineConfig, p: Plan, probes: list[Probe]) -> dict[str, list[dict]]:
    """Step 5 -> per checkpoint label, per probe {p_match, matches, option_mass} (or {skipped})."""
    m = cfg.mwe
    rows = [{"id": i, "question": q.question, "matching": q.matching, "not_matching": list(q.not_matching)}
            for i, q in enumerate(probes)]
    fn = functools.partial(score_shard, raw=m.format == "raw", max_tokens=m.max_prompt_tokens, batch_size=m.batch_size)
    pkey = _key(probes_text(probes), m.format, m.max_prompt_tokens)
    scored = {}
    for c in p.checkpoints:
        model = cfg.policy.model_copy(update={"name": c.model})
        family = f"score-{_key(pkey, model.model_dump(), _folder_stamp(c.model))}"
        scored[c.label] = _with_pool(model, cfg, lambda pool: _map(pool, fn, rows, p.work, family, cfg))
    return {label: [r if "skipped" in r else dict(zip(("p_match", "matches", "option_mass"),
                                                      match_probability(r["lp"][0], r["lp"][1:])))
                    for r in got] for label, got in scored.items()}


# -- step 6 ---------------------------------------------------------------------------------------
def results(cfg: PipelineConfig, p: Plan, probes: list[Probe], steps: dict | None, check: dict | None,
            verdicts: dict, seconds: dict) -> dict:
    m = cfg.mwe
    answers = [q.matching for q in probes]
    order = training_order(list(verdicts))
    judge = check and {"model": p.judge.name, "pairs": check["answered"], "accuracy": check["accuracy"],
                       "position_bias": None, "ece": None,  # as the report states a judge's worth (cai/judge_check.py)
                       "chance_band": round(2 * math.sqrt(0.25 / check["answered"]), 3) if check["answered"] else None}
    return {
        "title": f"cai mwe: {p.name}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"judge": judge} if judge else {}),
        "checkpoints": [{"label": c.label, "model": c.model, "run": c.run, "constitution": c.constitution}
                        for c in p.checkpoints],
        "mwe": {"behaviour": p.name, "description": p.behaviour.description if p.behaviour else None,
                "probes_source": p.probes_source, "writer": None if p.probes else p.writer.name,
                "judge": None if p.probes else p.judge.name, "format": m.format, "confidence": m.confidence,
                "steps": steps, "judge_check": check, "probes": len(probes),
                "probes_by_answer": {a: answers.count(a) for a in sorted(set(answers))}, "order": order,
                "scores": {label: checkpoint_scores(verdicts[label], answers, m.confidence, m.bootstrap_samples,
                                                    cfg.seed) for label in order},
                "differences": differences(verdicts, order, m.confidence, m.bootstrap_samples, cfg.seed),
                "seconds": seconds}}


def commit(out: Path, files: dict[str, str], data: dict) -> None:
    """Write the folder beside its final place, then swap it in: the old folder or the new one, never a mix."""
    from cai.report import SECTIONS, write_report
    from cai.shards import write_atomic

    tmp, trash = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, text in files.items():
        write_atomic(tmp / name, text)
    write_report(data, tmp, [s for s in SECTIONS if s.key == "mwe"])
    write_atomic(tmp / "mwe.json", json.dumps(data, indent=1, ensure_ascii=False))
    if out.exists():
        os.replace(out, trash)
    os.replace(tmp, out)
    shutil.rmtree(trash, ignore_errors=True)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run_mwe(cfg: PipelineConfig, behaviour: str | None, probes_file: str | None) -> dict:
    """The whole command: -> the mwe.json it committed."""
    from cai import stopping
    from cai.cluster import stop_ray
    from cai.report_run import update_run_report
    from cai.run_lock import RunLock
    from cai.runner import STOP, claim_output_dir

    p = plan(cfg, behaviour, probes_file)
    root = Path(cfg.output_dir)
    claim_output_dir(root, cfg.name)
    files, steps, check, seconds, t0 = {}, None, None, {}, time.time()
    with RunLock(root), stopping.StopOnSignal(root / STOP):
        try:
            probes = p.probes
            if probes is None:  # steps 1-4
                outputs, judged, checked = write_and_judge(cfg, p)
                candidates, probes, steps = filter_statements(outputs, judged, p.behaviour, cfg.mwe)
                check = judge_check(checked, cfg.mwe)
                seconds["write_and_judge"], t0 = round(time.time() - t0, 1), time.time()
                if not probes:
                    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in steps.items())
                    raise CaiError(f"cai mwe: behaviour '{p.name}': no probes left after filtering ({counts}; the "
                                   f"judge was right on {check['correct']} of {check['examples']} of the behaviour's "
                                   f"examples); the writer's outputs are in {p.work}")
                files = {"writer.jsonl": _jsonl(outputs), "candidates.jsonl": _jsonl(candidates)}
            verdicts = score_checkpoints(cfg, p, probes)
            seconds["scores"] = round(time.time() - t0, 1)
        finally:
            stop_ray()
        files["probes.jsonl"] = probes_text(probes)
        files["probe_scores.jsonl"] = _jsonl([{**probe_row(q), "p_match": {k: v[i].get("p_match")
                                                                          for k, v in verdicts.items()}}
                                              for i, q in enumerate(probes)])
        data = results(cfg, p, probes, steps, check, verdicts, seconds)
        commit(p.out, files, data)
        update_run_report(p.out, root)
    shutil.rmtree(p.work, ignore_errors=True)
    if p.work.parent.is_dir() and not any(p.work.parent.iterdir()):
        p.work.parent.rmdir()
    return data


def format_table(data: dict) -> str:
    m = data["mwe"]
    by_answer = ", ".join(f"{v} matching with {k!r}" for k, v in m["probes_by_answer"].items())
    lines = [f"behaviour {m['behaviour']}: {m['probes']} probes ({by_answer})"]
    if m["steps"]:
        lines.append("steps: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in m["steps"].items()))
        check = m["judge_check"]
        lines.append(f"judge check: right on {check['correct']} of {check['answered']} answered "
                     f"({check['examples']} of the behaviour's examples asked)")
    lines += ["| checkpoint | matching rate | CI | mean P(match) | option mass | scored | skipped |",
              "|---|---|---|---|---|---|---|"]
    for label in m["order"]:
        s = m["scores"][label]
        lines.append(f"| {label} | {s['matching_rate']} | {s['matching_rate_ci']} | {s['mean_p_match']} | "
                     f"{s['mean_option_mass']} | {s['n']} | {s['skipped']} |")
    return "\n".join(lines)


def main(args) -> None:
    """`cai mwe` (cai/cli.py parses the arguments)."""
    from cai.config import load_pipeline

    overrides = list(args.overrides)
    if args.checkpoints:
        overrides.append(f"mwe.checkpoints={json.dumps([c.strip() for c in args.checkpoints.split(',') if c.strip()])}")
    if args.n is not None:
        overrides.append(f"mwe.n={args.n}")
    cfg = load_pipeline(args.pipeline, overrides)
    data = run_mwe(cfg, args.behaviour, args.probes)
    out = Path(cfg.output_dir) / "audit" / "mwe" / data["mwe"]["behaviour"]
    print(f"{format_table(data)}\nreport: {out / 'report.html'}")
