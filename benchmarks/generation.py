"""Generation throughput: our ChatGenerator against what a user would pick instead, in one process.

    .venv/bin/python benchmarks/generation.py [--prompts 64] [--new-tokens 128] [--stage-rows 16 32] [--dtype auto]

Prints one table. Every generator row generates for the same chat prompts (the first N shipped helpfulness
prompts) with sampling at temperature 1; tokens are counted up to and including EOS, never padding. The
baselines: HF `generate`, fp32 and bf16, batch 32; llama.cpp through `llama-cpp-python` on the embedded GGUF
(Q4_1), one prompt at a time as its chat API runs them, in a child process (skipped with a note when the package is
not installed or crashes: 0.3.36 built here did on its first completion, 0.3.16 ran).

`steps` counts our generator's decoding forwards (one token per live row each: a batch takes as many as its longest
row's tokens) and `prompt tok` the prompt tokens its forwards computed, padding included: what a line's time is spent on.

Then the stage lines, in `--dtype` (auto: bf16 where the CPU computes in it, as the pipeline picks):
- the critique_revise stage's shard function (answer + one critique/revision round, two few-shot conversations)
  on red-team prompts, one shard per `--stage-rows` (its rows decode as one batch): rows/s, new tok/s, and new tok/s
  as a ratio `N.NNx` of our generator's (same dtype, batch 32);
- preferences' labelling forwards (option_logprobs on judge-check pairs, both orders, two shots): prompt tok/s,
  and its ratio `N.NNx` to a plain batched forward of the same prompts (left padded, batch 16, last position).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from cai.config import CritiqueReviseConfig, GenerationConfig, PromptSource
from cai.constitution import load_constitution
from cai.generation import ChatGenerator
from cai.models import load_causal_lm, load_tokenizer, resolve_model
from cai.prompt_files import read_source
from cai.stages.critique_revise import revise_shard

SHORT = {"float32": "fp32", "bfloat16": "bf16"}


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


LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
convs = json.load(sys.stdin)
llm = Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)
total, start = 0, time.time()
for i, conv in enumerate(convs):
    out = llm.create_chat_completion(messages=conv, max_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                                     min_p=0.0, repeat_penalty=1.0, seed=i)
    total += out["usage"]["completion_tokens"] + (out["choices"][0]["finish_reason"] == "stop")
print(json.dumps([total, time.time() - start]))
"""


def llama_cpp(convs, new_tokens: int, threads: int) -> tuple[int, float] | str:
    """llama.cpp on the embedded GGUF, the same sampling (no top-k, min-p or repeat penalty), one prompt at a time
    in a child process (a broken build crashes it, not the benchmark); -> (new tokens, seconds), or why it was
    skipped. EOS is counted as our rows count it."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`pip install llama-cpp-python` compiles llama.cpp)"
    from cai.models import _gguf_file

    child = subprocess.run([sys.executable, "-c", LLAMA_CPP, str(_gguf_file("smollm2-135m-instruct")),
                            str(new_tokens), str(threads)], input=json.dumps(convs), capture_output=True, text=True)
    if child.returncode:
        return f"llama-cpp-python failed (exit {child.returncode}): {(child.stderr.strip().splitlines() or ['-'])[-1]}"
    total, seconds = json.loads(child.stdout.strip().splitlines()[-1])
    return total, seconds


def ours(gen: ChatGenerator, convs, new_tokens: int, batch: int) -> tuple[int, float]:
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, batch_size=batch)
    start = time.time()
    out = gen.generate_chat(convs, cfg, seed=0)
    return sum(o.new_tokens for o in out), time.time() - start


def stage_shard(gen: ChatGenerator, rows: int, new_tokens: int) -> tuple[float, int, float]:
    """-> (rows/s, new tokens, seconds) of one critique_revise shard."""
    constitution = load_constitution("constitutions/default.yaml")
    prompts = read_source(PromptSource(path="builtin:red_team"))[:rows]
    cfg = CritiqueReviseConfig(rounds=1, few_shot=2, generation=GenerationConfig(
        max_new_tokens=new_tokens, temperature=1.0, top_p=0.95, batch_size=rows))
    start = time.time()
    _, tokens = revise_shard(gen, prompts, 0, constitution=constitution, cfg=cfg, run_seed=0, model="bench")
    seconds = time.time() - start
    return rows / seconds, tokens, seconds


def labelling_prompts(gen: ChatGenerator, pairs: int) -> list[list[int]]:
    """The prompts preferences' labelling scores for `pairs` judge-check pairs (both orders, two shots)."""
    from cai.feedback import label_pairs
    from cai.judge_check import load_check_pairs

    class Recorder:  # label_pairs' view of a generator: keeps the prompts instead of scoring them
        tokenizer, prompts = gen.tokenizer, []

        def option_logprobs(self, prompts, options, batch_size):
            self.prompts = prompts
            return torch.zeros(len(prompts), len(options))

    rec = Recorder()
    rows = (load_check_pairs("builtin:judge_check") * 4)[:pairs]
    label_pairs(rec, rows, load_constitution("constitutions/default.yaml"), seed=0, both_orders=True, n_shots=2,
                cot=False, cot_generation=None, cot_clamp=(0, 1), max_tokens=4096, batch_size=16)
    return rec.prompts


@torch.inference_mode()
def plain_forward(model, prompts: list[list[int]], pad_id: int, batch: int) -> torch.Tensor:
    """What a user writes: batches in order, left padded, the last position's log-probs."""
    from cai.generation import left_pad

    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i:i + batch], pad_id)
        out.append(torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, -1].float(), -1))
    return torch.cat(out)


def labelling(gen: ChatGenerator, pairs: int) -> tuple[int, float, float]:
    """-> (prompt tokens, seconds of option_logprobs, seconds of the plain forward) on the same prompts."""
    prompts = labelling_prompts(gen, pairs)
    from cai.feedback import option_plan

    plan = option_plan(gen.tokenizer)
    options = [[plan.token_a], [plan.token_b]]
    start = time.time()
    ours_lp = gen.option_logprobs(prompts, options, 16)
    mid = time.time()
    plain = plain_forward(gen.model, prompts, gen.pad_id, 16)[:, [o[0] for o in options]]
    end = time.time()
    # bf16 rounds differently under different padding (both differ from an unpadded forward by ~0.2)
    tolerance = 0.05 if gen.model.dtype == torch.float32 else 0.5
    assert torch.allclose(ours_lp, plain, atol=tolerance), "labelling log-probs differ from the plain forward's"
    return sum(map(len, prompts)), mid - start, end - mid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stage-rows", type=int, nargs="+", default=[16, 32],
                    help="shard sizes (one batch each); 32 is the generator line's batch")
    ap.add_argument("--label-pairs", type=int, default=16)
    ap.add_argument("--dtype", default="auto", help="the stage lines' dtype; auto: as the pipeline picks")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from cai.cluster import Worker

    torch.set_num_threads(args.threads)
    dtype = Worker(torch.device("cpu"), 0, 1, 0).resolve_dtype(args.dtype)
    path = resolve_model("smollm2-135m-instruct")
    tok = load_tokenizer(path)
    convs = [[{"role": "user", "content": r["prompt"]}] for r in read_source(PromptSource(path="builtin:helpful"))]
    convs = convs[:args.prompts]
    models = {d: load_causal_lm(path, d) for d in ("float32", "bfloat16")}
    results = [("HF generate (baseline)", "fp32", 32, *hf_generate(models["float32"], tok, convs, args.new_tokens, 32)),
               ("HF generate", "bf16", 32, *hf_generate(models["bfloat16"], tok, convs, args.new_tokens, 32))]
    cpp = llama_cpp(convs, args.new_tokens, args.threads)
    if not isinstance(cpp, str):
        results.append(("llama.cpp (GGUF)", "q4_1", 1, *cpp))
    for d, batch in (("float32", 32), ("bfloat16", 32), ("bfloat16", 64)):
        gen = ChatGenerator(models[d], tok)
        results.append(("cai ChatGenerator", SHORT[d], batch, *ours(gen, convs, args.new_tokens, batch),
                        gen.decode_steps, gen.computed_tokens))
    base = results[0][3] / results[0][4]
    print(f"\nSmolLM2-135M-Instruct, {len(convs)} prompts, {args.new_tokens} new tokens max, sampling T=1, "
          f"{args.threads} threads")
    print(f"{'generator':26s} {'dtype':5s} {'batch':>5s} {'new tok':>8s} {'seconds':>8s} {'tok/s':>7s} {'x base':>7s}"
          f" {'steps':>6s} {'prompt tok':>10s}")
    for name, d, batch, tokens, seconds, *work in results:
        print(f"{name:26s} {d:5s} {batch:5d} {tokens:8d} {seconds:8.1f} {tokens / seconds:7.0f} "
              f"{tokens / seconds / base:6.2f}x {work[0] if work else '-':>6} {work[1] if work else '-':>10}")
    if isinstance(cpp, str):
        print(f"llama.cpp: skipped, {cpp}")
    plain = next(r[3] / r[4] for r in results if r[0] == "cai ChatGenerator" and r[1] == SHORT[dtype] and r[2] == 32)
    for rows in args.stage_rows:  # a generator kept per shard as an actor keeps it, with its keys/values
        gen = ChatGenerator(models[dtype], tok, reuse_kv=True)
        rate, tokens, seconds = stage_shard(gen, rows, 96)
        print(f"critique_revise shard ({rows} red-team rows, 1 round, 2 shots, {SHORT[dtype]}): {rate:.3f} "
              f"rows/s, {tokens / seconds:.0f} new tok/s, {tokens / seconds / plain:.2f}x cai ChatGenerator "
              f"{SHORT[dtype]} batch 32, {seconds:.1f}s; {tokens} new tokens in {gen.decode_steps} steps, "
              f"{gen.computed_tokens} prompt tokens computed, {gen.reused_tokens} reused")
    tokens, ours_s, plain_s = labelling(ChatGenerator(models[dtype], tok), args.label_pairs)
    print(f"preferences labelling ({args.label_pairs} pairs, both orders, 2 shots, {SHORT[dtype]}, batch 16): "
          f"{tokens / ours_s:.0f} prompt tok/s, {plain_s / ours_s:.2f}x a plain batched forward "
          f"({tokens / plain_s:.0f} tok/s), {ours_s:.1f}s")
    print(f"peak RSS {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
