"""Judge check: score a feedback model on labelled comparisons before trusting its labels.

Reports accuracy (order-averaged label on the better side), position bias (mean P(A) when the better
answer is shown as A, and when it is shown as B: an unbiased judge has them far apart around 0.5, a
position-biased one has both on the same side), and calibration (ECE of P(A) for "A is better").
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from cai.calibration import expected_calibration_error
from cai.errors import CaiError

BUILTIN = Path(__file__).parent / "data" / "judge_check" / "pairs.jsonl"
KEYS = ("prompt", "better", "worse")


def load_check_pairs(path: str) -> list[dict]:
    """{id, prompt, r1=better, r2=worse, aspect, kind} rows; a bad row is a one-line error."""
    from cai.prompt_files import check_text, jsonl_objects

    file = BUILTIN if path == "builtin:judge_check" else Path(path)
    if not file.exists():
        raise CaiError(f"{file}: judge-check pairs not found")
    if file.is_dir():
        raise CaiError(f"{file}: is a folder; judge-check pairs are one .jsonl file")
    pairs = []
    for n, row in jsonl_objects(file):
        missing = [k for k in KEYS if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise CaiError(f"{file}:{n}: missing or empty '{missing[0]}'")
        check_text(file, n, row, KEYS)
        pairs.append({"id": row.get("id", f"jc-{n}"), "prompt": row["prompt"], "r1": row["better"],
                      "r2": row["worse"], "aspect": row.get("aspect", "harmless"), "kind": row.get("kind", "")})
    if not pairs:
        raise CaiError(f"{file}: no judge-check pairs")
    return pairs


def sample_pairs(pairs: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded sample of `n` pairs in which every kind keeps its share (rounded, at least one each); all if
    `n` is None or not smaller. Pairs keep their file order."""
    if n is None or n >= len(pairs):
        return pairs
    kinds = sorted({p["kind"] for p in pairs})
    rng = random.Random(f"{seed}|judge-check")
    chosen: set[str] = set()
    for kind in kinds:
        of_kind = [p["id"] for p in pairs if p["kind"] == kind]
        chosen |= set(rng.sample(of_kind, max(1, round(n * len(of_kind) / len(pairs)))))
    return [p for p in pairs if p["id"] in chosen]


def judge_report(labels: list[dict], pairs: list[dict]) -> dict:
    """Metrics from both-order labels of pairs whose r1 is the better response."""
    kinds = {p["id"]: p["kind"] for p in pairs}
    rows = [r for r in labels if "p_r1" in r]
    if not rows:
        raise CaiError("judge check: every pair was skipped (prompts longer than the judge's limit?)")
    p_better = torch.tensor([r["p_r1"] for r in rows])
    p_a_better_first = torch.tensor([r["p_a"][0] for r in rows])   # better shown as (A)
    p_a_better_second = torch.tensor([r["p_a"][1] for r in rows])  # better shown as (B)
    all_p_a = torch.cat([p_a_better_first, p_a_better_second])
    a_is_better = torch.cat([torch.ones(len(rows)), torch.zeros(len(rows))])
    accuracy = (p_better > 0.5).double().mean().item()
    by_kind = {}
    for kind in sorted({kinds[r["id"]] for r in rows}):
        sel = torch.tensor([kinds[r["id"]] == kind for r in rows])
        by_kind[kind] = round((p_better[sel] > 0.5).double().mean().item(), 3)
    return {
        "pairs": len(rows),
        "accuracy": round(accuracy, 3),
        "accuracy_better_as_A": round((p_a_better_first > 0.5).double().mean().item(), 3),
        "accuracy_better_as_B": round((p_a_better_second < 0.5).double().mean().item(), 3),
        "mean_P(A)_better_as_A": round(p_a_better_first.mean().item(), 3),
        "mean_P(A)_better_as_B": round(p_a_better_second.mean().item(), 3),
        "position_bias": round(all_p_a.mean().item() - 0.5, 3),
        "ece": round(expected_calibration_error(all_p_a, a_is_better), 3),
        "chance_band": round(2 * math.sqrt(0.25 / len(rows)), 3),  # ±2 s.e. of a coin's accuracy
        "accuracy_by_kind": by_kind,
    }


def verdict(report: dict, warn_below: float) -> str | None:
    """A loud warning when the judge is near chance, else None."""
    near_chance = report["accuracy"] < max(warn_below, 0.5 + report["chance_band"])
    if not near_chance:
        return None
    return (f"JUDGE NEAR CHANCE: accuracy {report['accuracy']:.2f} on {report['pairs']} labelled pairs "
            f"(chance 0.50 ± {report['chance_band']:.2f}); position bias {report['position_bias']:+.2f}. "
            f"Its preference labels are close to noise: use a larger feedback model "
            f"(preferences.feedback_model.name) before trusting the reward model.")


def format_report(report: dict) -> str:
    lines = [f"  {k:24s} {v}" for k, v in report.items() if k != "accuracy_by_kind"]
    lines += [f"  accuracy[{k}]{' ' * max(1, 14 - len(k))}{v}" for k, v in report["accuracy_by_kind"].items()]
    return "\n".join(lines)


def check_judge(pool, cfg, constitution, out: Path) -> dict:
    """The judge check of a run's feedback model on `pool` (actors holding it): label the check pairs in both
    orders (sharded under out/shards/judge_check), write out/judge_check.json, print the report, and warn loudly
    near chance (or stop, with judge_check.stop_below)."""
    import functools
    import warnings

    from cai.config import feedback_model
    from cai.feedback import label_shard
    from cai.progress import console
    from cai.shards import ShardStore, chunk, write_atomic

    jc = cfg.preferences.judge_check
    pairs = sample_pairs(load_check_pairs(jc.pairs), jc.max_pairs, cfg.seed)
    shards = chunk(pairs, cfg.preferences.shard_size)
    store = ShardStore(out / "shards" / "judge_check", len(shards))
    # the same worked examples for every pair: their tokens run once per batch
    fn = functools.partial(label_shard, constitution=constitution, shared_shots=True,
                           pcfg=cfg.preferences.model_copy(update={"both_orders": True}), run_seed=cfg.seed)
    pool.map_shards(fn, shards, store, cfg.seed, "judge check")
    report = judge_report(store.rows(), pairs)
    write_atomic(out / "judge_check.json", json.dumps(report, indent=1))
    console.print(f"judge check of {feedback_model(cfg).name}:\n{format_report(report)}")
    warning = verdict(report, jc.warn_below)
    if warning:
        console.print(f"[bold red]WARNING: {warning}[/]")
        warnings.warn(warning, stacklevel=1)
        if jc.stop_below is not None and report["accuracy"] < jc.stop_below:
            raise CaiError(f"preferences.judge_check: accuracy {report['accuracy']:.2f} is below stop_below="
                           f"{jc.stop_below}; stopping before labelling")
    return report
