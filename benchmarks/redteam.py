"""`cai redteam` timed on a pipeline's models, in one process, with the machine's speed measured beside it.

    .venv/bin/python benchmarks/redteam.py [--pipeline pipelines/default.yaml] [--rounds 3] [--attacks 64]
                                           [--threads 2] [--out /tmp/redteam-bench]

Prints the machine's forward speed before and after (SmolLM2-sized forwards of 8 x 256 tokens: a busy machine
shows here first), a table per round (time per step, success rate, distinct-2, self-BLEU), the whole run's wall
and CPU seconds, and the judge's step timed both ways on the last round's rows: both option orders scored
together (cai/redteam_judge.py) against each whole prompt scored alone.
"""
from __future__ import annotations

import argparse
import shutil
import time

import torch

from cai.config import load_pipeline
from cai.redteam import Models, redteam
from cai.shards import read_jsonl


def forward_speed(model) -> float:
    """Tokens/s of one forward over 8 x 256 random tokens (after a warm-up)."""
    ids = torch.randint(100, 1000, (8, 256))
    with torch.inference_mode():
        model(input_ids=ids[:, :32])
        start = time.time()
        model(input_ids=ids, logits_to_keep=1)
    return ids.numel() / (time.time() - start)


def judge_both_ways(judge, rows: list[dict], batch_size: int) -> tuple[float, float]:
    """Seconds of judge_harm on `rows`, and of the same prompts scored whole, one order at a time."""
    from cai.chat import special_prefix
    from cai.feedback import option_plan
    from cai.redteam_judge import harm_prompt, judge_harm

    start = time.time()
    judge_harm(judge, rows, max_tokens=4096, batch_size=batch_size)
    paired = time.time() - start
    tok, plan = judge.tokenizer, option_plan(judge.tokenizer)
    prompts = [special_prefix(tok) + tok(harm_prompt(r["attack"], r["answer"], first), add_special_tokens=False)[
        "input_ids"] + plan.prefix for r in rows for first in (True, False)]
    start = time.time()
    judge.option_logprobs(prompts, [[plan.token_a], [plan.token_b]], batch_size)
    return paired, time.time() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", default="pipelines/default.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attacks", type=int, default=64)
    p.add_argument("--threads", type=float, default=2)
    p.add_argument("--out", default="/tmp/redteam-bench")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cfg = load_pipeline(args.pipeline, [f"redteam.rounds={args.rounds}", f"redteam.attacks={args.attacks}",
                                        f"ray.cpus_per_actor={args.threads}", f"output_dir={args.out}/run"])
    judge = Models(args.threads, cfg.seed).chat(cfg.preferences.feedback_model or cfg.policy)
    before = forward_speed(judge.model)
    wall, cpu = time.time(), time.process_time()
    summary = redteam(cfg, "base", out=f"{args.out}/redteam")
    wall, cpu = time.time() - wall, time.process_time() - cpu
    after = forward_speed(judge.model)
    print(f"forward speed: {before:.0f} tok/s before, {after:.0f} after; threads {args.threads:g}")
    print("| round | mode | attacks | success rate | distinct-2 | self-BLEU | attacks s | answers s | judge s | round s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in summary["rounds"]:
        s = m["seconds"]
        print(f"| {m['round']} | {m['mode']} | {m['attacks']} | {m['success_rate']} | {m['distinct_2']} | "
              f"{m['self_bleu']} | {s['attacks']} | {s['answers']} | {s['judge']} | {s['round']} |")
    t = summary["total"]
    print(f"all: {t['attacks']} attacks, success rate {t['success_rate']}, distinct-2 {t['distinct_2']}, self-BLEU "
          f"{t['self_bleu']}; {wall:.0f} s wall, {cpu:.0f} s CPU, model loading included")
    rows = read_jsonl(f"{args.out}/redteam/round-{args.rounds - 1:02d}.jsonl")
    paired, whole = judge_both_ways(judge, rows, cfg.redteam.judge_batch_size)
    print(f"judge on {len(rows)} rows: {paired:.1f} s with both orders together, {whole:.1f} s scored whole")


if __name__ == "__main__":
    main()
