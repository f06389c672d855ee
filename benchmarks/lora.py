"""LoRA against full fine-tuning: trainable share, optimizer state and training step time on one model.

    .venv/bin/python benchmarks/lora.py [--model smollm2-135m-instruct] [--rounds 3] [--rows 4] [--tokens 128]

One process holds three copies of the model, trained as the stages train them (fp32, fused AdamW on what
requires grad, causal-LM loss on `--rows` x `--tokens` tokens of the shipped helpfulness prompts): full
fine-tuning, LoRA at `train.lora`'s defaults (rank 16, alpha 32, dropout 0.05, every linear layer but the output
head) and LoRA rank 16 on q_proj and v_proj only (the setting of Hu et al. 2021). After one warm-up step each,
every round times one step of each in turn, so that other load on the machine falls on all three alike; the
median over rounds is shown. The step runs without Ray or DeepSpeed: what changes is the model's own work
(no weight gradients for the frozen base, a small optimizer step, the adapters' extra matmuls).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def batch(tokenizer, rows: int, tokens: int):
    import torch

    from cai.chat import chat_ids, user
    from cai.config import PromptSource
    from cai.prompt_files import read_source

    prompts = [r["prompt"] for r in read_source(PromptSource(path="builtin:helpful"))]
    ids = []
    for p in prompts:
        ids += chat_ids(tokenizer, [user(p)])
        if len(ids) >= rows * tokens:
            break
    return torch.tensor(ids[:rows * tokens]).view(rows, tokens)


def trainer(model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    n = sum(p.numel() for p in params)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    def step(ids) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, n, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from cai.config import LoraConfig
    from cai.lora import wrap
    from cai.models import load_tokenizer, resolve_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    path = resolve_model(args.model)
    ids = batch(load_tokenizer(path), args.rows, args.tokens)
    configs = {"full fine-tuning": None, "LoRA r16 all-linear": LoraConfig(),
               "LoRA r16 q_proj,v_proj": LoraConfig(target_modules=["q_proj", "v_proj"])}
    runs = {}
    for name, lora in configs.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = wrap(model, lora, "causal_lm") if lora else model
        runs[name] = trainer(model.train())
        runs[name][0](ids)  # warm-up: allocations, Adam's state
    times = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, (step, _, _) in runs.items():
            times[name].append(step(ids))
        print(f"round {r + 1}: " + ", ".join(f"{name} {t[-1]:.2f} s" for name, t in times.items()), file=sys.stderr,
              flush=True)
    full = statistics.median(times["full fine-tuning"])
    print(f"{args.model}, fp32, {args.rows} x {args.tokens} tokens a step, 2 threads, median of {args.rounds} rounds")
    print(f"{'training':24s} {'trainable':>12s} {'share':>8s} {'Adam state':>11s} {'s/step':>7s} {'x full':>7s}")
    for name, (_, n, total) in runs.items():
        t = statistics.median(times[name])
        print(f"{name:24s} {n:12,d} {n / total:8.3%} {8 * n / 2**20:8.1f} MB {t:7.2f} {t / full:7.2f}")


if __name__ == "__main__":
    main()
