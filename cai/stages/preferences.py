"""Stage `preferences`: RL-CAI data, AI soft preference labels (Bai et al. 2022, §4.1-4.3).

Steps:
  1. judge check: the feedback model labels shipped comparisons with a known better side; report
     accuracy, position bias and calibration; warn loudly (or stop, by config) near chance;
  2. response pairs: the SFT model samples two responses per red-team prompt (and per helpfulness
     prompt, unless a helpfulness comparison file is given), with the policy's system prompt; a pair
     with a response cut at max_new_tokens is dropped, or kept with that side marked unfinished
     (`unfinished: keep`);
  3. labels: the feedback model labels each pair under one sampled principle, in both orders,
     averaged (chain-of-thought mode: reason first, clamp the label);
  4. attribution: on a few pairs, every principle labels; per principle, agreement with the others'
     majority and decisiveness mean |p - 0.5|;
  5. write preferences.jsonl: trl's preference format (prompt, chosen, rejected) plus p_chosen,
     per-order probabilities, principle id and raw log-probs; skipped pairs are counted.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from cai.attribution import preference_table, write_table
from cai.config import PipelineConfig, PreferencesConfig, feedback_model
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.chat import assistant, conversation, user
from cai.prompting import clean_reply
from cai.shards import ShardStore, chunk, read_jsonl, write_atomic, write_jsonl
from cai.stages import Reads

READS = Reads(stages=("prompts", "sft"), constitution=("preference", "few_shot_labels"))
WORKERS = "generation"


def settings(cfg: PipelineConfig) -> dict:
    return {"preferences": cfg.preferences.model_dump(mode="json"), "seed": cfg.seed,
            "feedback_model": feedback_model(cfg).model_dump(mode="json"), "policy": cfg.policy.model_dump(mode="json")}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {"feedback_model": feedback_model(cfg).name}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    n = len(read_jsonl(inputs["prompts"] / "red_team.jsonl"))
    return {"responses_red_team": -(-n // cfg.preferences.shard_size), "labels_red_team": -(-n // cfg.preferences.shard_size)}


def respond_shard(generator, rows: list[dict], seed: int, *, generation) -> tuple[list[dict], int]:
    """Runs on a Ray actor holding the SFT model: two sampled responses per prompt."""
    outs = generator.generate_chat([[user(r["prompt"])] for r in rows for _ in (0, 1)], generation, seed)
    pairs = [{**r, "r1": clean_reply(outs[2 * i].text), "r2": clean_reply(outs[2 * i + 1].text),
              "r1_finished": outs[2 * i].finished, "r2_finished": outs[2 * i + 1].finished}
             for i, r in enumerate(rows)]
    return pairs, sum(o.new_tokens for o in outs)


def _pool(model, cfg: PipelineConfig):
    from cai.pool import GenerationPool

    return GenerationPool(model, cfg.ray)


def _judge_check(cfg: PipelineConfig, constitution, out: Path) -> dict:
    from cai.judge_check import check_judge  # torch: imported when run, so `cai plan` stays quick

    pool = _pool(feedback_model(cfg), cfg)
    try:
        return check_judge(pool, cfg, constitution, out)
    finally:
        pool.shutdown()


def given_helpful_pairs(pcfg: PreferencesConfig) -> list[dict]:
    """A user's helpfulness comparisons (prompt/chosen/rejected), taken as labels with P = 1."""
    from cai.prompt_files import read_rows

    path, rows = read_rows(pcfg.helpful_pairs, text_columns=("chosen", "rejected"))
    out = []
    for n, r in rows:
        bad = next((k for k in (pcfg.helpful_pairs.column, "chosen", "rejected")
                    if not isinstance(r.get(k), str) or not r[k].strip()), None)
        if bad:
            raise CaiError(f"{path}: row {n}: '{bad}' is missing or empty")
        out.append({"id": str(r.get("id") or f"given-{n:05d}"), "prompt": r[pcfg.helpful_pairs.column],
                    "r1": r["chosen"], "r2": r["rejected"], "aspect": "helpful", "p_r1": 1.0, "source": "given"})
    return out


def preference_row(pair: dict, system_prompt: str | None = None, keep_unfinished: bool = False) -> dict:
    """trl preference format plus our label fields; the side with P >= 0.5 is `chosen`. With
    `keep_unfinished`, each side says whether it finished (an unfinished one has no end-of-turn)."""
    first = pair["p_r1"] >= 0.5
    sides = ("r1", "r2") if first else ("r2", "r1")
    row = {"prompt": conversation(pair["prompt"], system_prompt), "chosen": [assistant(pair[sides[0]])],
           "rejected": [assistant(pair[sides[1]])], "p_chosen": pair["p_r1"] if first else round(1 - pair["p_r1"], 5),
           "id": pair["id"], "aspect": pair["aspect"], "principle": pair.get("principle"), "p_a": pair.get("p_a"),
           "logprobs": pair.get("logprobs"), "source": pair.get("source", "ai")}
    if keep_unfinished:
        row |= {"chosen_finished": pair.get(f"{sides[0]}_finished", True),
                "rejected_finished": pair.get(f"{sides[1]}_finished", True)}
    return row


def _usable(pair: dict, counts: dict, unfinished: str, cut: str) -> bool:
    """Whether a sampled pair can be labelled; each reason not is counted (`cut`: the key for cut responses)."""
    if not pair["r1"].strip() or not pair["r2"].strip():
        counts["skipped_empty_response"] += 1
        return False
    if pair["r1"].strip() == pair["r2"].strip():
        counts["skipped_identical"] += 1
        return False
    if not (pair["r1_finished"] and pair["r2_finished"]):
        counts[cut] += 1
        return unfinished == "keep"
    return True


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.feedback import label_shard  # torch: imported when run, so `cai plan` stays quick

    pcfg = cfg.preferences
    cut = f"unfinished_{'kept' if pcfg.unfinished == 'keep' else 'dropped'}"
    counts = {"skipped_empty_response": 0, "skipped_identical": 0, "skipped_too_long": 0, cut: 0}
    # step 1: judge check
    report = _judge_check(cfg, constitution, out) if pcfg.judge_check.enabled else None
    # step 2: response pairs from the SFT model
    parts = {"red_team": "harmless"}
    given = given_helpful_pairs(pcfg) if pcfg.helpful_pairs else []
    if not given and pcfg.label_helpful:
        parts["helpful"] = "helpful"
    sft_model = cfg.policy.model_copy(update={"name": str(inputs["sft"] / "model")})
    pool = _pool(sft_model, cfg)
    pairs: dict[str, list[dict]] = {}
    try:
        for part, aspect in parts.items():
            prompts = [{"id": r["id"], "prompt": r["prompt"], "aspect": aspect}
                       for r in read_jsonl(inputs["prompts"] / f"{part}.jsonl")]
            shards = chunk(prompts, pcfg.shard_size)
            store = ShardStore(out / "shards" / f"responses_{part}", len(shards))
            pool.map_shards(functools.partial(respond_shard, generation=pcfg.response_generation), shards, store,
                            cfg.seed, f"responses {part}")
            pairs[part] = [p for p in store.rows() if _usable(p, counts, pcfg.unfinished, cut)]
    finally:
        pool.shutdown()
    # steps 3-4: labels, then per-principle attribution on a few pairs
    pool = _pool(feedback_model(cfg), cfg)
    labelled, table = [], []
    try:
        label = functools.partial(label_shard, constitution=constitution, pcfg=pcfg, run_seed=cfg.seed)
        for part, rows in pairs.items():
            shards = chunk(rows, pcfg.shard_size)
            store = ShardStore(out / "shards" / f"labels_{part}", len(shards))
            pool.map_shards(label, shards, store, cfg.seed, f"labels {part}")
            labelled += store.rows()
        sample = pairs["red_team"][:pcfg.attribution_pairs]
        by_principle = {}
        for p in (p for p in constitution.preference if p.aspect == "harmless" and sample):
            store = ShardStore(out / "shards" / f"attribution_{p.id}", 1)
            fn = functools.partial(label_shard, constitution=constitution, pcfg=pcfg, run_seed=cfg.seed,
                                   principle_id=p.id)
            pool.map_shards(fn, [sample], store, cfg.seed, f"attribution {p.id}")
            by_principle[p.id] = store.rows()
        table = preference_table(by_principle) if sample else []
    finally:
        pool.shutdown()
    # step 5: the preference dataset
    rows = []
    for pair in labelled + given:
        if pair.get("skipped") == "too_long":
            counts["skipped_too_long"] += 1
        else:
            rows.append(preference_row(pair, cfg.policy.system_prompt, pcfg.unfinished == "keep"))
    write_jsonl(out / "preferences.jsonl", rows)
    write_atomic(out / "attribution.json", json.dumps(table, indent=1))
    write_table(out, table, "preference principles: agreement with the others' majority, decisiveness")
    mean_conf = sum(r["p_chosen"] for r in rows) / max(1, len(rows))
    return {"pairs": len(rows), "given_helpful": len(given), **counts, "mean_p_chosen": round(mean_conf, 3),
            "judge_accuracy": report["accuracy"] if report else None,
            "judge_position_bias": report["position_bias"] if report else None}
