"""SFT, reward-model and labelling throughput: our Ray Train + DeepSpeed path next to trl in-process.

    .venv/bin/python benchmarks/training.py [--rows 64] [--model smollm2-135m-instruct]

Every configuration runs in a fresh subprocess (clean peak memory), on the same data and model:
  - trl SFTTrainer / RewardTrainer in-process, no Ray, no DeepSpeed, with 1 and with 2 torch threads;
  - our sft / reward_model workers on Ray Train + DeepSpeed: 1 worker x 1 thread and 1 worker x
    2 threads (ZeRO-0), and 2 workers x 1 thread (data parallel over the 2 cores; ZeRO-0 and ZeRO-2);
  - AI labelling: pairs labelled per second (both orders), in-process.
Tokens/s counts the real (unpadded) tokens of one pass over the data, so batching that pads less
shows as more tokens/s; both sides use seed 42; time is the training loop only
(the trainers' own train_runtime; our loop's clock), start-up shown apart as wall seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANSWER = ("Here is a short, careful answer: start with the basics, check each step, and ask a "
          "professional if anything feels unsafe or unclear. I hope this helps you get it done.")


def make_data(folder: Path, rows: int) -> None:
    from cai.config import PromptSource
    from cai.prompt_files import read_source
    from cai.chat import assistant, user
    from cai.shards import write_jsonl

    prompts = [r["prompt"] for r in read_source(PromptSource(path="builtin:helpful"))][:rows]
    sft = [{"prompt": [user(p)], "completion": [assistant(ANSWER)]} for p in prompts]
    write_jsonl(folder / "sft_revisions.jsonl", sft)
    write_jsonl(folder / "sft_helpful.jsonl", [])
    prefs = [{"prompt": [user(p)], "chosen": [assistant(ANSWER)], "rejected": [assistant("No. " + p)],
              "p_chosen": 0.8} for p in prompts]
    write_jsonl(folder / "preferences.jsonl", prefs)


def trl_sft(folder: Path, model: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cai.cluster import peak_rss_gb
    from cai.models import load_tokenizer
    from cai.shards import read_jsonl

    torch.set_num_threads(threads)
    tok = load_tokenizer(model, padding_side="right")
    args = SFTConfig(output_dir=str(folder / "trl_sft"), per_device_train_batch_size=8, num_train_epochs=1,
                     learning_rate=1e-5, lr_scheduler_type="constant", max_length=512, use_cpu=True, bf16=False,
                     gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=1,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_pin_memory=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list(read_jsonl(folder / "sft_revisions.jsonl")))
    out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "tokens": int(trainer.state.num_input_tokens_seen),
            "peak_rss_gb": peak_rss_gb()}


def trl_rm(folder: Path, model: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai.cluster import peak_rss_gb
    from cai.models import load_tokenizer
    from cai.shards import read_jsonl
    from cai.stages.reward_model import encode_pairs

    torch.set_num_threads(threads)
    tok = load_tokenizer(model, padding_side="right")
    rows = read_jsonl(folder / "preferences.jsonl")
    tokens = sum(len(r["chosen"]) + len(r["rejected"]) for r in encode_pairs(tok, rows, 384))
    rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(output_dir=str(folder / "trl_rm"), per_device_train_batch_size=8, num_train_epochs=1,
                        learning_rate=1e-5, lr_scheduler_type="constant", max_length=384, use_cpu=True, bf16=False,
                        gradient_checkpointing=False, save_strategy="no", report_to="none", disable_tqdm=True,
                        dataloader_pin_memory=False)
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    out = RewardTrainer(model=rm, args=args, train_dataset=data, processing_class=tok).train()
    return {"seconds": out.metrics["train_runtime"], "tokens": tokens, "peak_rss_gb": peak_rss_gb()}


def cai_stage(folder: Path, model: str, stage: str, param: str) -> dict:
    """param: WORKERSxTHREADS, optionally zZERO_STAGE (default ZeRO-0), e.g. 2x1z2."""
    from cai.config import load_pipeline
    from cai.constitution import load_constitution
    from cai.stages import reward_model, sft

    shape, _, zero = param.partition("z")
    workers, threads = map(int, shape.split("x"))
    section = "sft" if stage == "sft" else "reward_model"
    cfg = load_pipeline(HERE.parent / "pipelines/default.yaml", [
        f"policy.name={model}", f"output_dir={folder}", f"{section}.train.workers={workers}",
        f"{section}.train.cpus_per_worker={threads}", f"{section}.train.save_steps=100000",
        f"{section}.train.zero_stage={zero or 0}", f"{section}.train.batch_size={8 // workers}",  # 8 a step, as trl's
        f"reward_model.base_model={model}", "reward_model.eval_fraction=0.0", "seed=42"])  # trl's default seed
    constitution = load_constitution(cfg.constitution)
    out = folder / f"{stage}-{param}"
    if stage == "sft":
        s = sft.run(cfg, constitution, {"critique_revise": folder}, out)
        return {"seconds": s["runtime_s"], "tokens": s["tokens"], "peak_rss_gb": s["peak_rss_gb"]}
    s = reward_model.run(cfg, constitution, {"preferences": folder, "sft": folder}, out)
    return {"seconds": s["train_seconds"], "tokens": s["train_tokens"], "peak_rss_gb": s["peak_rss_gb"]}


def labelling(model: str, pairs: int) -> dict:
    import torch

    from cai.constitution import load_constitution
    from cai.feedback import label_pairs
    from cai.generation import ChatGenerator
    from cai.judge_check import load_check_pairs
    from cai.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(2)
    judge = ChatGenerator(load_causal_lm(model, "bfloat16"), load_tokenizer(model))
    rows = (load_check_pairs("builtin:judge_check") * 4)[:pairs]
    start = time.time()
    label_pairs(judge, rows, load_constitution(HERE.parent / "constitutions/default.yaml"), seed=0,
                both_orders=True, n_shots=2, cot=False, cot_generation=None, cot_clamp=(0, 1), max_tokens=4096,
                batch_size=16)
    return {"seconds": time.time() - start, "tokens": 0, "pairs": len(rows), "labels": 2 * len(rows)}


def one(args) -> None:
    """Child process: run one configuration, print its JSON on the last line."""
    folder, model = Path(args.folder), args.model
    kind, _, param = args.one.partition(":")
    fn = {"trl-sft": lambda: trl_sft(folder, model, int(param)), "trl-rm": lambda: trl_rm(folder, model, int(param)),
          "cai-sft": lambda: cai_stage(folder, model, "sft", param),
          "cai-rm": lambda: cai_stage(folder, model, "rm", param),
          "label": lambda: labelling(model, int(param))}[kind]
    start = time.time()
    result = fn()
    result["wall"] = time.time() - start
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--one")
    ap.add_argument("--folder")
    ap.add_argument("--only", help="run only the configurations whose key contains this (e.g. z2)")
    args = ap.parse_args()
    if args.one:
        return one(args)
    from cai.models import resolve_model

    model = str(resolve_model(args.model))
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"cai-bench-{os.getpid()}"
    folder.mkdir(parents=True)
    make_data(folder, args.rows)
    plan = [("SFT", "trl SFTTrainer in-process, 1 thread", "trl-sft:1"),
            ("SFT", "trl SFTTrainer in-process, 2 threads", "trl-sft:2"),
            ("SFT", "cai Ray Train+DS ZeRO-0, 1 worker x 1 thr", "cai-sft:1x1"),
            ("SFT", "cai Ray Train+DS ZeRO-0, 1 worker x 2 thr", "cai-sft:1x2"),
            ("SFT", "cai Ray Train+DS ZeRO-0, 2 workers x 1 thr", "cai-sft:2x1"),
            ("SFT", "cai Ray Train+DS ZeRO-2, 2 workers x 1 thr", "cai-sft:2x1z2"),
            ("RM", "trl RewardTrainer in-process, 1 thread", "trl-rm:1"),
            ("RM", "trl RewardTrainer in-process, 2 threads", "trl-rm:2"),
            ("RM", "cai Ray Train+DS ZeRO-0, 1 worker x 1 thr", "cai-rm:1x1"),
            ("RM", "cai Ray Train+DS ZeRO-0, 1 worker x 2 thr", "cai-rm:1x2"),
            ("RM", "cai Ray Train+DS ZeRO-0, 2 workers x 1 thr", "cai-rm:2x1"),
            ("RM", "cai Ray Train+DS ZeRO-2, 2 workers x 1 thr", "cai-rm:2x1z2"),
            ("label", "AI labels, both orders, bf16, 2 shots", f"label:{args.rows}")]
    results = {}
    for task, name, key in [p for p in plan if not args.only or args.only in p[2]]:
        proc = subprocess.run([sys.executable, __file__, "--one", key, "--folder", str(folder), "--model", model],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[key] = (task, name, json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {name}", file=sys.stderr, flush=True)
    print(f"\n{args.rows} rows, SmolLM2-135M-Instruct, fp32 training, 8 rows per optimizer step, 1 epoch")
    print("goals: 1 worker within 1.2x of trl in-process on the same cores (x trl >= 0.83); 2 workers >= 1.7x "
          "the 1-core throughput (x trl 1thr and x cai 1x1)")
    print(f"{'task':5s} {'configuration':44s} {'tok/s':>7s} {'x trl 2thr':>10s} {'x trl 1thr':>10s} "
          f"{'x cai 1x1':>10s} {'loop s':>7s} {'wall s':>7s} {'peak GB':>8s}")
    for task, name, r in results.values():
        if task == "label":
            print(f"{task:5s} {name:44s} {r['pairs'] / r['seconds']:7.2f} pairs/s ({r['labels'] / r['seconds']:.2f} "
                  f"labels/s) {r['seconds']:7.1f}s")
            continue
        rate = r["tokens"] / r["seconds"]
        kind = "sft" if task == "SFT" else "rm"
        base2, base1, own1 = (results.get(k) for k in (f"trl-{kind}:2", f"trl-{kind}:1", f"cai-{kind}:1x1"))
        ratio = lambda b: f"{rate / (b[2]['tokens'] / b[2]['seconds']):9.2f}x" if b else "        -"
        print(f"{task:5s} {name:44s} {rate:7.0f} {ratio(base2):>10s} {ratio(base1):>10s} {ratio(own1):>10s} "
              f"{r['seconds']:7.1f} {r['wall']:7.1f} {r.get('peak_rss_gb', 0):8.2f}")


if __name__ == "__main__":
    main()
