"""Generation throughput: our ChatGenerator against plain `model.generate`, in one process.

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--new-tokens 128] [--stage-rows 16]

Prints one table. Every row generates for the same chat prompts (the first N shipped helpfulness
prompts) with sampling at temperature 1; tokens are counted up to and including EOS, never padding.
The baseline is HF `generate`, fp32, batch 32 (the figure the issue names). The last row times the
critique_revise stage's shard function (answer + one critique/revision round, two few-shot
conversations) on red-team prompts, in rows/s.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from cai.config import CritiqueReviseConfig, GenerationConfig, PromptSource
from cai.constitution import load_constitution
from cai.generation import ChatGenerator
from cai.models import load_causal_lm, load_tokenizer, resolve_model
from cai.prompt_files import read_source
from cai.stages.critique_revise import revise_shard


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def hf_generate(model, tok, convs, new_tokens: int, batch: int) -> tuple[int, float]:
    """Plain `model.generate` with the same sampling settings; returns (new tokens, seconds)."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    tok.padding_side = "left"
    total, start = 0, time.time()
    torch.manual_seed(0)
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            total += next((k + 1 for k, t in enumerate(row) if t == eos), len(row))
    return total, time.time() - start


def ours(gen: ChatGenerator, convs, new_tokens: int, batch: int) -> tuple[int, float]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, batch_size=batch)
    start = time.time()
    out = gen.generate_chat(convs, cfg, seed=0)
    return sum(o.new_tokens for o in out), time.time() - start


def stage_rows_per_s(gen: ChatGenerator, rows: int, new_tokens: int) -> tuple[float, int, float]:
    constitution = load_constitution("constitutions/default.yaml")
    prompts = read_source(PromptSource(path="builtin:red_team"))[:rows]
    cfg = CritiqueReviseConfig(rounds=1, few_shot=2, generation=GenerationConfig(
        max_new_tokens=new_tokens, temperature=1.0, top_p=0.95, batch_size=rows))
    start = time.time()
    _, tokens = revise_shard(gen, prompts, 0, constitution=constitution, cfg=cfg, run_seed=0, model="bench")
    seconds = time.time() - start
    return rows / seconds, tokens, seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stage-rows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    convs = [[{"role": "user", "content": r["prompt"]}] for r in read_source(PromptSource(path="builtin:helpful"))]
    convs = convs[:args.prompts]
    fp32 = load_causal_lm(path, "float32")
    bf16 = load_causal_lm(path, "bfloat16")
    results = []
    tokens, seconds = hf_generate(fp32, tok, convs, args.new_tokens, 32)
    base = tokens / seconds
    results.append(("HF generate (baseline)", "fp32", 32, tokens, seconds))
    for model, dtype, batch in ((fp32, "fp32", 32), (bf16, "bf16", 32), (bf16, "bf16", 64)):
        results.append(("cai ChatGenerator", dtype, batch, *ours(ChatGenerator(model, tok), convs, args.new_tokens,
                                                                    batch)))
    print(f"\nSmolLM2-135M-Instruct, {len(convs)} prompts, {args.new_tokens} new tokens max, sampling T=1, "
          f"{args.threads} threads")
    print(f"{'generator':26s} {'dtype':5s} {'batch':>5s} {'new tok':>8s} {'seconds':>8s} {'tok/s':>7s} {'x base':>7s}")
    for name, dtype, batch, tokens, seconds in results:
        print(f"{name:26s} {dtype:5s} {batch:5d} {tokens:8d} {seconds:8.1f} {tokens / seconds:7.0f} "
              f"{tokens / seconds / base:6.2f}x")
    rate, tokens, seconds = stage_rows_per_s(ChatGenerator(bf16, tok), args.stage_rows, 96)
    print(f"critique_revise shard ({args.stage_rows} red-team rows, 1 round, 2 shots, bf16): {rate:.3f} rows/s, "
          f"{tokens / seconds:.0f} new tok/s, {seconds:.1f}s")
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
