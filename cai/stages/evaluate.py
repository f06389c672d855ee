"""Stage `evaluate`: checkpoints side by side on held-out prompt sets (Bai et al. 2022, §4.4 and Figure 2).

Steps:
  1. the checkpoints (cai/checkpoints.py: base, sft, policy, PPO snapshots, other runs' checkpoints, folders)
     and the prompt sets (shipped sets disjoint from the training seeds, or user files with a column mapping);
  2. answers: every checkpoint answers every set once, with the policy's system prompt (sharded, resumable);
  3. preference-model scores of every answer, read as PPO reads them;
  4. judge check: the feedback model's accuracy and position bias, shown beside every judged number;
  5. refusals: the feedback model asked whether each answer to a harmful or borderline prompt refuses (both
     option orders), with a pattern check beside it;
  6. comparisons: for each pair of checkpoints, a seeded sample of each set's prompts judged under the
     constitution's preference principles, harmlessness on harmful sets and helpfulness on the others, both
     orders averaged; a verdict off the two options is skipped and counted;
  7. the numbers (cai/eval_metrics.py): statistics with bootstrap intervals, Elo per aspect, per-principle
     verdicts, and the differences beyond the bootstrap noise;
  8. eval.json, report.html (cai/report.py) and answers.jsonl (every answer with its score and refusal verdict).
Run alone: `cai eval pipelines/default.yaml` (or `cai run ... --stages evaluate`).
"""
from __future__ import annotations

import functools
import itertools
import json
import random
import time
from pathlib import Path

from cai.checkpoints import Checkpoint, fingerprint, own_stage, resolve, unique_labels
from cai.config import EvalSetConfig, ModelConfig, PipelineConfig, PromptSource, feedback_model
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.stages import ORDER, Reads

READS = Reads(constitution=("preference", "few_shot_labels"))  # the stages it reads follow the config: reads()
WORKERS = "generation"
ASPECT = {"harmful": "harmless", "helpful": "helpful", "borderline": "helpful"}


def reads(cfg: PipelineConfig) -> Reads:
    stages = {own_stage(spec, cfg.policy_optimization) for spec in cfg.evaluate.checkpoints} - {None}
    if cfg.evaluate.reward_model == "reward_model" and not cfg.evaluate.reward_function:
        stages.add("reward_model")
    return Reads(stages=tuple(sorted(stages, key=ORDER.index)), constitution=READS.constitution)


def settings(cfg: PipelineConfig) -> dict:
    from cai.prompt_files import fingerprint as file_fingerprint

    ev = cfg.evaluate
    return {"evaluate": ev.model_dump(mode="json"), "seed": cfg.seed, "policy": cfg.policy.model_dump(mode="json"),
            "feedback_model": feedback_model(cfg).model_dump(mode="json"),
            "judge_check": cfg.preferences.judge_check.model_dump(mode="json"),
            "checkpoints": {s: fingerprint(s, cfg.policy_optimization) for s in ev.checkpoints},
            "reward_model": fingerprint(ev.reward_model, cfg.policy_optimization) if ev.reward_model else None,
            "sets": {s.name: file_fingerprint(_source(s)) for s in ev.sets}}


def models(cfg: PipelineConfig) -> dict[str, str]:
    base = {"base": cfg.policy.name} if "base" in cfg.evaluate.checkpoints else {}
    judged = cfg.evaluate.judge.enabled and not cfg.evaluate.judge.function
    return {**base, "feedback_model": feedback_model(cfg).name} if judged else base


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {f"answers_{i}_{s.name}": -(-len(rows) // cfg.evaluate.shard_size)
            for s, rows in zip(cfg.evaluate.sets, load_sets(cfg)) for i in range(len(cfg.evaluate.checkpoints))}


# -- step 1: checkpoints and prompt sets ---------------------------------------------------------------
def _source(s: EvalSetConfig) -> PromptSource:
    return PromptSource(path=s.path, column=s.column, split=s.split)


def read_set(s: EvalSetConfig, limit: int | None) -> list[dict]:
    """A set's rows {id, prompt} after its `where` filter; one line naming the file and row when one is bad."""
    from cai.prompt_files import read_rows

    path, rows = read_rows(_source(s))
    out = []
    for n, row in rows:
        missing = [k for k in [s.id_column, *s.where] if k and k not in row]
        if missing:
            raise CaiError(f"{path}: row {n}: no column '{missing[0]}' (evaluate.sets '{s.name}')")
        if any(str(row[k]) != v for k, v in s.where.items()):
            continue
        text = row.get(s.column)
        if not isinstance(text, str) or not text.strip():
            raise CaiError(f"{path}: row {n}: column '{s.column}' is empty or not text")
        ident = row[s.id_column] if s.id_column else row.get("id") or f"{path.stem}-{n:05d}"
        out.append({"id": str(ident), "prompt": text.strip()})
    if not out:
        raise CaiError(f"{path}: no prompts left in evaluate.sets '{s.name}' after its `where` filter")
    return out[:limit]


def load_sets(cfg: PipelineConfig) -> list[list[dict]]:
    names = [s.name for s in cfg.evaluate.sets]
    if len(set(names)) < len(names):
        raise CaiError(f"evaluate.sets: the name '{next(n for n in names if names.count(n) > 1)}' is used twice")
    return [read_set(s, cfg.evaluate.max_prompts) for s in cfg.evaluate.sets]


def resolve_checkpoints(cfg: PipelineConfig, constitution: Constitution, out: Path) -> list[Checkpoint]:
    run_dir = out.parent
    found = [resolve(spec, run_dir, cfg.policy.name, cfg.policy_optimization, cfg.name, cfg.ppo.steps,
                     constitution.name) for spec in cfg.evaluate.checkpoints]
    unique_labels(found)
    return found


def reward_model_folder(cfg: PipelineConfig, run_dir: Path, spec: str | None = "",
                        key: str = "evaluate.reward_model") -> Path | None:
    if spec == "":  # the evaluation's own: none when a rule-based reward function scores instead
        spec = None if cfg.evaluate.reward_function else cfg.evaluate.reward_model
    if spec is None:
        return None
    folder, _, name = spec.rpartition(":")
    path = run_dir / "reward_model" / "model" if spec == "reward_model" else \
        Path(folder).expanduser().resolve() / "reward_model" / "model" if name == "reward_model" and folder else \
        Path(spec).expanduser()
    if not (path / "reward_stats.json").is_file():
        raise CaiError(f"{key}: '{spec}': {path} is not a preference model folder (no "
                       f"reward_stats.json; the reward_model stage writes one)")
    return path


# -- steps 2-6: shards on pools of actors ---------------------------------------------------------------
def _map(pool, fn, rows: list[dict], out: Path, family: str, cfg: PipelineConfig) -> list[dict]:
    from cai.shards import ShardStore, chunk

    shards = chunk(rows, cfg.evaluate.shard_size)
    store = ShardStore(out / "shards" / family, len(shards))
    pool.map_shards(fn, shards, store, cfg.seed, family)
    return store.rows()


def _with_pool(model: ModelConfig, cfg: PipelineConfig, work, load=None):
    """work(pool) on a pool of actors holding `model` (loaded by `load`, a chat generator by default)."""
    from cai.pool import GenerationPool, load_chat_generator

    pool = GenerationPool(model, cfg.ray, load or load_chat_generator)
    try:
        return work(pool)
    finally:
        pool.shutdown()


def generate_answers(cfg, checkpoints, sets, out) -> dict[str, dict[str, list[dict]]]:
    from cai.prompting import answer_shard

    fn = functools.partial(answer_shard, generation=cfg.evaluate.generation, keep_ids=True)
    answers: dict[str, dict[str, list[dict]]] = {}
    for i, c in enumerate(checkpoints):
        model = cfg.policy.model_copy(update={"name": c.model})
        answers[c.label] = _with_pool(model, cfg, lambda pool: {
            s.name: _map(pool, fn, rows, out, f"answers_{i}_{s.name}", cfg)
            for s, rows in zip(cfg.evaluate.sets, sets)})
    return answers


def pm_shard(scorer, rows: list[dict], seed: int, *, batch_size: int) -> tuple[list[dict], int]:
    scores = scorer.score([r["prompt"] for r in rows], [r["answer"] for r in rows], [r["finished"] for r in rows],
                          batch_size)
    return [{"id": r["id"], "pm": round(s, 5)} for r, s in zip(rows, scores)], 0


def score_answers(cfg, folder: Path, answers, out) -> dict[str, dict[str, list[float]]]:
    from cai.preference_model import load_preference_scorer

    fn = functools.partial(pm_shard, batch_size=cfg.evaluate.judge.batch_size)
    model = ModelConfig(name=str(folder), system_prompt=cfg.policy.system_prompt)
    return _with_pool(model, cfg, lambda pool: {
        label: {name: [r["pm"] for r in _map(pool, fn, rows, out, f"pm_{i}_{name}", cfg)]
                for name, rows in by_set.items()}
        for i, (label, by_set) in enumerate(answers.items())}, load=load_preference_scorer)


def answer_ids(answers: dict) -> dict[str, dict[str, list[list[int]]]]:
    """The sampled token ids of every answer (EOS included when produced), as PPO's reward functions see them."""
    return {label: {name: [r["ids"] for r in rows] for name, rows in by_set.items()}
            for label, by_set in answers.items()}


def function_scores(fn, answers: dict, ids: dict) -> dict[str, dict[str, list[float]]]:
    return {label: {name: [float(x) for x in fn([r["prompt"] for r in rows], [r["answer"] for r in rows],
                                                ids[label][name])]
                    for name, rows in by_set.items()} for label, by_set in answers.items()}


def function_verdicts(fn, spec: str, pairs: dict[str, list[dict]], answers: dict, ids: dict,
                      labels: list[str]) -> dict[str, list[dict]]:
    """The comparisons judged by a rule: P(first better) as the verdict, with the two option log-probabilities
    it implies, so that they are counted exactly as the feedback model's verdicts are."""
    import math

    out = {}
    for name, rows in pairs.items():
        index = {r["id"]: n for n, r in enumerate(answers[labels[0]][name])}
        first = [ids[labels[r["first"]]][name][index[r["prompt_key"]]] for r in rows]
        second = [ids[labels[r["second"]]][name][index[r["prompt_key"]]] for r in rows]
        p = fn([r["prompt"] for r in rows], [r["r1"] for r in rows], [r["r2"] for r in rows], first, second)
        out[name] = [{**r, "principle": f"rule:{spec}", "p_r1": round(float(q), 5),
                      "logprobs": [[math.log(max(q, 1e-12)), math.log(max(1 - q, 1e-12))]]}
                     for r, q in zip(rows, map(float, p))]
    return out


def refusal_shard(generator, rows: list[dict], seed: int, *, max_tokens: int, batch_size: int):
    from cai.refusal import judge_refusals

    verdicts = judge_refusals(generator, rows, max_tokens=max_tokens, batch_size=batch_size)
    return [{"id": r["id"], **v} for r, v in zip(rows, verdicts)], 0


def comparisons_for(cfg, sets, answers, labels) -> dict[str, list[dict]]:
    """Per set: for each pair of checkpoints, the sampled prompts as pairs to judge (r1 = the first checkpoint)."""
    out = {}
    for s, rows in zip(cfg.evaluate.sets, sets):
        k = min(len(rows), cfg.evaluate.judge.max_prompts or len(rows))
        picked = sorted(random.Random(f"{cfg.seed}|judge|{s.name}").sample(range(len(rows)), k))
        out[s.name] = [{"id": f"{rows[p]['id']}|{i}|{j}", "prompt_key": rows[p]["id"], "prompt": rows[p]["prompt"],
                        "r1": answers[labels[i]][s.name][p]["answer"], "r2": answers[labels[j]][s.name][p]["answer"],
                        "first": i, "second": j, "aspect": ASPECT[s.kind]}
                       for p in picked for i, j in itertools.combinations(range(len(labels)), 2)]
    return out


def judge_shard(generator, rows: list[dict], seed: int, *, constitution, run_seed: int, judge):
    from cai.feedback import label_pairs

    labels, _ = label_pairs(generator, rows, constitution, seed=run_seed, both_orders=True, n_shots=judge.few_shot,
                            cot=False, cot_generation=None, cot_clamp=(0.0, 1.0), max_tokens=judge.max_prompt_tokens,
                            batch_size=judge.batch_size, shared_shots=True)
    return [{**r, **lab} for r, lab in zip(rows, labels)], 0


def judge_answers(cfg, constitution, sets, answers, out) -> tuple[dict, dict, dict]:
    """Steps 4-6 on one pool of the feedback model -> (judge check, refusal verdicts, comparisons)."""
    from cai.judge_check import check_judge

    judge = cfg.evaluate.judge
    refuse = functools.partial(refusal_shard, max_tokens=judge.max_prompt_tokens, batch_size=judge.batch_size)
    compare = functools.partial(judge_shard, constitution=constitution, run_seed=cfg.seed, judge=judge)
    labels = list(answers)

    def work(pool):
        report = check_judge(pool, cfg, constitution, out)
        refusals = {label: {s.name: _map(pool, refuse, answers[label][s.name], out, f"refusal_{i}_{s.name}", cfg)
                            for s in cfg.evaluate.sets if s.kind != "helpful"} for i, label in enumerate(labels)}
        pairs = comparisons_for(cfg, sets, answers, labels) if len(labels) > 1 else {}
        verdicts = {name: _map(pool, compare, rows, out, f"judge_{name}", cfg) for name, rows in pairs.items()}
        return report, refusals, verdicts

    return _with_pool(feedback_model(cfg), cfg, work)


# -- steps 7-8: numbers and report ----------------------------------------------------------------------
def numbers(cfg, checkpoints, sets, answers, pm, refusals, verdicts, report) -> dict:
    from cai import eval_metrics as m

    ev, labels = cfg.evaluate, [c.label for c in checkpoints]
    boot = m.Bootstrap(ev.confidence, ev.bootstrap_samples, cfg.seed)
    arrays = {label: {s.name: m.per_prompt(answers[label][s.name], pm[label][s.name] if pm else None,
                                           refusals.get(label, {}).get(s.name), ev.judge.min_option_mass)
                      for s in ev.sets} for label in labels}
    scores = {label: {s.name: m.answer_stats(answers[label][s.name], arrays[label][s.name], boot, label, s.name)
                      for s in ev.sets} for label in labels}
    kinds = {s.name: s.kind for s in ev.sets}
    steps = m.rl_steps(checkpoints, cfg.policy_optimization, cfg.ppo.steps)
    judged = {aspect: [c for name, rows in verdicts.items() if ASPECT[kinds[name]] == aspect for c in rows]
              for aspect in ("harmless", "helpful")}
    kept = {a: [c for c in rows if m.usable(c, ev.judge.min_option_mass)] for a, rows in judged.items()}
    elo = {a: m.elo_table(rows, labels, boot, a) for a, rows in kept.items() if rows}
    off = sum(len(judged[a]) - len(kept[a]) for a in judged)
    refusal_skips = sum(s["refusal"]["skipped"] for by in scores.values() for s in by.values() if s["refusal"])
    return {
        "scores": scores,
        "elo": {a: table for a, (table, _) in elo.items()} or None,
        "principles": {a: m.principle_verdicts(rows, labels) for a, rows in kept.items() if rows} or None,
        "differences": m.differences(arrays, labels, boot, elo),
        "reward_hacking": m.reward_hacking(steps, labels, answers, pm, verdicts, ev.judge.min_option_mass, boot),
        "skipped": {"judge_unparsed": off, "refusal_unparsed": refusal_skips,
                    "elo_needs_two_checkpoints": int(len(labels) < 2)},
    }


def samples(cfg, sets, answers) -> list[dict]:
    n = cfg.evaluate.samples_shown
    return [{"set": s.name, "prompt": rows[p]["prompt"],
             "answers": {label: by_set[s.name][p]["answer"] for label, by_set in answers.items()}}
            for s, rows in zip(cfg.evaluate.sets, sets) for p in range(min(n, len(rows)))]


def rule_functions(ev) -> tuple:
    """The rule-based scorer and judge the config names, imported and checked before any model loads."""
    from cai.rewards import load_function

    pm = ev.reward_function and load_function(ev.reward_function, "evaluate.reward_function",
                                              ("prompts", "responses", "response_ids"))
    judge = ev.judge.function and load_function(ev.judge.function, "evaluate.judge.function",
                                                ("prompts", "first", "second", "first_ids", "second_ids"))
    return pm or None, judge or None


def answer_rows(cfg, answers, pm, refusals) -> list[dict]:
    """One flat row per checkpoint, set and prompt: the answer, its preference-model score and its refusal verdict
    (null where not measured)."""
    rows = []
    for label, by_set in answers.items():
        for s in cfg.evaluate.sets:
            got = by_set[s.name]
            scores = pm[label][s.name] if pm else [None] * len(got)
            verdicts = refusals.get(label, {}).get(s.name) or [{}] * len(got)  # in the answers' order
            rows += [{"checkpoint": label, "set": s.name, "kind": s.kind, "id": a["id"], "prompt": a["prompt"],
                      "answer": a["answer"], "finished": a["finished"], "tokens": a["tokens"], "pm_score": score,
                      "p_refuse": v.get("p_refuse")} for a, score, v in zip(got, scores, verdicts)]
    return rows


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.progress import console
    from cai.report import write_report
    from cai.report_run import write_run_report
    from cai.shards import write_atomic, write_jsonl

    ev = cfg.evaluate
    # step 1: checkpoints and prompt sets, every one checked before a model loads
    checkpoints = resolve_checkpoints(cfg, constitution, out)
    sets = load_sets(cfg)
    pm_folder = reward_model_folder(cfg, out.parent)
    pm_fn, judge_fn = rule_functions(ev)
    if len(checkpoints) < 2:
        console.print(f"evaluate: Elo needs two checkpoints; {len(checkpoints)} given, so none are compared")
    # steps 2-6, each timed for the summary
    seconds, t0 = {}, time.time()
    answers = generate_answers(cfg, checkpoints, sets, out)
    seconds["answers"], t0 = round(time.time() - t0, 1), time.time()
    ids = answer_ids(answers) if pm_fn or judge_fn else None
    pm = function_scores(pm_fn, answers, ids) if pm_fn else score_answers(cfg, pm_folder, answers, out) \
        if pm_folder else None
    seconds["scores"], t0 = round(time.time() - t0, 1), time.time()
    if judge_fn and len(checkpoints) > 1:
        pairs = comparisons_for(cfg, sets, answers, list(answers))
        report, refusals, verdicts = None, {}, function_verdicts(judge_fn, ev.judge.function, pairs, answers, ids,
                                                                  list(answers))
    else:
        report, refusals, verdicts = judge_answers(cfg, constitution, sets, answers, out) \
            if ev.judge.enabled and not judge_fn else (None, {}, {})
    seconds["judging"], t0 = round(time.time() - t0, 1), time.time()
    # steps 7-8
    data = {"title": f"cai eval: {cfg.name}", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoints": [{"label": c.label, "model": c.model, "run": c.run, "constitution": c.constitution}
                            for c in checkpoints],
            "sets": [{"name": s.name, "kind": s.kind, "source": s.path, "prompts": len(rows)}
                     for s, rows in zip(ev.sets, sets)],
            "judge": report and {"model": feedback_model(cfg).name, **{k: report[k] for k in (
                "pairs", "accuracy", "position_bias", "chance_band", "ece")}},
            "reward_model": f"rule {ev.reward_function}" if pm_fn else str(pm_folder) if pm_folder else None,
            **numbers(cfg, checkpoints, sets, answers, pm, refusals, verdicts, report),
            "samples": samples(cfg, sets, answers)}
    write_atomic(out / "eval.json", json.dumps(data, indent=1, ensure_ascii=False))
    write_report(data, out)
    write_run_report(out.parent)  # <output_dir>/report.html: this and the run's audits
    write_jsonl(out / "answers.jsonl", answer_rows(cfg, answers, pm, refusals))
    seconds["numbers_and_report"] = round(time.time() - t0, 1)
    beyond = sum(d["beyond_noise"] for d in data["differences"])
    return {"checkpoints": len(checkpoints), "sets": len(sets), "answers": len(checkpoints) * sum(map(len, sets)),
            "comparisons": sum(map(len, verdicts.values())), "differences_beyond_noise": beyond,
            "answer_tokens": sum(r["tokens"] for by in answers.values() for rows in by.values() for r in rows),
            "step_seconds": seconds,
            "report": str(out / "report.html"), **{f"elo_{a}": {k: v["elo"] for k, v in t["ratings"].items()}
                                                   for a, t in (data["elo"] or {}).items()}}
