"""PPO step time and peak memory: our PPO (Ray Train + DeepSpeed) next to trl 1.12's PPOTrainer.

    .venv/bin/python benchmarks/ppo.py [--steps 6]

Both sides run SmolLM2-135M-Instruct as policy and reference, and a SmolLM2 scalar-head model as
reward and value model (4 models), batch 4 prompts, 32 new tokens, 1 PPO epoch, 1 minibatch, on
the same prompts: in fp32, and in bf16 mixed precision (ours: DeepSpeed bf16 with fp32 master weights
and the reference in bf16; trl: accelerate's bf16 autocast). trl 1.12 (the last release with
PPOTrainer) is installed only into benchmarks/.venv-trl112, never into the package's environment.
"offloaded": the reference and preference models wait in a memory-mapped file between rollouts
(`ppo.offload_inference_models=true`; by default they stay in memory). "recompute all layers": every
decoder layer of the policy and value model recomputes its activations in backward
(`ppo.train.activation_checkpointing=1`), and the update's value forward also gives the old values.
Each configuration runs in its own process (its peak RSS is that process's; ours is the training
worker's). Step time is the mean over steps after the first (warm-up shown apart).
`--only TEXT` runs only our configurations whose label contains TEXT; `--ours-only` skips trl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_ENV = HERE / ".venv-trl112"
TRL_SCRIPT = r'''
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
policy_path, rm_path, prompts_path, steps, out, bf16 = sys.argv[1:7]
steps = int(steps)
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
prompts = [json.loads(l)["prompt"] for l in open(prompts_path)]
ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                               return_dict=True)["input_ids"] for p in prompts]
data = Dataset.from_dict({"input_ids": ids})
times = []
class Clock(TrainerCallback):  # PPOTrainer calls on_step_end only: time between consecutive ends
    def on_train_begin(self, args, state, control, **kw): self.t = time.time()
    def on_step_end(self, args, state, control, **kw):
        now = time.time(); times.append(now - self.t); self.t = now
args = PPOConfig(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=1, num_mini_batches=1,
                 num_ppo_epochs=1, total_episodes=4 * steps, response_length=32, learning_rate=1e-6,
                 use_cpu=True, bf16=bf16 == "bf16", report_to="none", save_strategy="no", num_sample_generations=0,
                 missing_eos_penalty=-1.0, stop_token="eos", kl_coef=0.05, logging_steps=1)
trainer = PPOTrainer(args=args, processing_class=tok, model=AutoModelForCausalLM.from_pretrained(policy_path),
                     ref_model=AutoModelForCausalLM.from_pretrained(policy_path),
                     reward_model=AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1),
                     value_model=AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1),
                     train_dataset=data, callbacks=[Clock()])
start = time.time()
trainer.train()
wall = time.time() - start
if not times:  # older trainers call no step callbacks: fall back to wall time per update
    times = [wall / steps] * steps
print(json.dumps({"step_times": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


def ensure_trl_env() -> Path:
    python = TRL_ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate", "datasets"],
                       check=True)
    return python


def make_models(folder: Path) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_tokenizer, resolve_model
    from cai.preference_model import CARD, PreferenceModelCard

    policy = resolve_model("smollm2-135m-instruct")
    rm = folder / "reward_model"
    if not (rm / CARD).exists() or '"dtype"' not in (rm / CARD).read_text():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
        tok = load_tokenizer(policy)
        model.config.pad_token_id = tok.pad_token_id
        model.save_pretrained(rm)
        tok.save_pretrained(rm)
        PreferenceModelCard(max_length=2048, dtype="float32", mean=0.0, std=1.0).save(rm)
    return policy, rm


def write_reward_pairs(stage: Path, rm: Path) -> None:
    """The reward-model stage's encoded pairs, which PPO reads to measure the preference model's statistics in the
    dtype it scores in: 8 red-team prompts, a refusal against a compliance."""
    from cai.config import PromptSource
    from cai.models import load_tokenizer
    from cai.prompt_files import read_source
    from cai.shards import write_jsonl
    from cai.stages.reward_model import encode_pairs

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "p_chosen": 0.7,
             "chosen": [{"role": "assistant", "content": "I can't help with that."}],
             "rejected": [{"role": "assistant", "content": "Sure, here is how."}]}
            for r in read_source(PromptSource(path="builtin:red_team"))[:8]]
    pairs = encode_pairs(load_tokenizer(rm), rows, 256)
    write_jsonl(stage / "eval.jsonl", pairs[:4])
    write_jsonl(stage / "train.jsonl", pairs[4:])


def ours(folder: Path, policy: Path, rm: Path, steps: int, overrides: list[str]) -> dict:
    """Our PPO stage on 1 Ray Train worker with 2 CPUs, DeepSpeed ZeRO-0 (one rank: nothing to shard)."""
    import shutil

    from cai.config import load_pipeline
    from cai.constitution import load_constitution
    from cai.stages import ppo

    for name, src in (("sft", policy), ("reward_model", rm)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        if not (folder / name / "model").exists():
            shutil.copytree(src, folder / name / "model")
    write_reward_pairs(folder / "reward_model", rm)
    cfg = load_pipeline(HERE.parent / "pipelines/default.yaml", [
        f"output_dir={folder}", f"ppo.steps={steps}", "ppo.rollout_batch=4", "ppo.minibatch=4", "ppo.ppo_epochs=1",
        "ppo.generation.max_new_tokens=32", "ppo.train.workers=1", "ppo.train.cpus_per_worker=2",
        "ppo.train.zero_stage=0", "ppo.train.save_steps=100000", "ppo.prompts=red_team",
        *overrides])
    out = folder / "ppo"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    summary = ppo.run(cfg, load_constitution(cfg.constitution), {"prompts": folder / "prompts", "sft": folder / "sft",
                                                                 "reward_model": folder / "reward_model"}, out)
    times = [json.loads(line)["step_time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"step_times": times, "peak_rss_gb": summary["peak_rss_gb"], "setup_peak_rss_gb": summary.get("setup_peak_rss_gb")}


OURS = {  # label -> overrides of the default pipeline
    "cai PPO, default (train.bf16: auto)": [],
    "cai PPO, fp32": ["ppo.train.bf16=false"],
    "cai PPO, fp32, offloaded": ["ppo.train.bf16=false", "ppo.offload_inference_models=true"],
    "cai PPO, fp32, bf16 reference, offloaded": ["ppo.train.bf16=false", "ppo.reference_dtype=bfloat16",
                                                 "ppo.offload_inference_models=true"],
    "cai PPO, fp32, bf16 reference, offloaded, recompute all layers": [
        "ppo.train.bf16=false", "ppo.reference_dtype=bfloat16", "ppo.offload_inference_models=true",
        "ppo.train.activation_checkpointing=1"],
    "cai PPO, bf16 mixed precision, offloaded": ["ppo.train.bf16=true", "ppo.offload_inference_models=true"],
}
TRL = {"trl 1.12 PPOTrainer, fp32": "fp32", "trl 1.12 PPOTrainer, bf16 (autocast)": "bf16"}
BASE = "trl 1.12 PPOTrainer, fp32"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ours-only", action="store_true")
    ap.add_argument("--only", help="run our configurations whose label contains this")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "cai-bench-ppo"
    if args.child:
        policy, rm = make_models(folder)
        print(json.dumps(ours(folder, policy, rm, args.steps, OURS[args.child])))
        return
    from cai.config import PromptSource
    from cai.prompt_files import read_source
    from cai.shards import write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    policy, rm = make_models(folder)
    prompts = read_source(PromptSource(path="builtin:red_team"))[:4 * args.steps]
    write_jsonl(folder / "prompts" / "red_team.jsonl", prompts)
    write_jsonl(folder / "prompts" / "helpful.jsonl", [])
    results = {}
    for label in [k for k in OURS if not args.only or args.only in k]:
        proc = subprocess.run([sys.executable, __file__, "--child", label, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"{label}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"done: {label}", file=sys.stderr, flush=True)
    for label, precision in ({} if args.ours_only else TRL).items():
        python = ensure_trl_env()
        proc = subprocess.run([str(python), "-c", TRL_SCRIPT, str(policy), str(rm), str(folder / "prompts" /
                               "red_team.jsonl"), str(args.steps), str(folder / "trl_out"), precision],
                              capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
        if proc.returncode:
            print(f"{label}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"done: {label}", file=sys.stderr, flush=True)
    import torch
    from fault_injection import cpu_name

    print(f"\nSmolLM2-135M x 4 models, batch 4, 32 new tokens, 1 PPO epoch, {args.steps} steps, 2 cores of "
          f"{cpu_name()} (torch CPU capability {torch.backends.cpu.get_cpu_capability()}); ours on 1 Ray Train "
          f"worker, DeepSpeed ZeRO-0")
    print("goal: step time <= 0.7x and peak memory <= 0.8x of trl 1.12 fp32")
    print(f"{'implementation':66s} {'step s':>7s} {'first s':>8s} {'peak GB':>8s} {'x trl time':>11s} "
          f"{'x trl mem':>10s}")
    for r in results.values():
        t = r["step_times"]
        r["mean"] = sum(t[1:]) / max(1, len(t) - 1) if len(t) > 1 else t[0]
    base = results.get(BASE)
    for name, r in results.items():
        ratios = f"{r['mean'] / base['mean']:10.2f}x {r['peak_rss_gb'] / base['peak_rss_gb']:9.2f}x" if base else ""
        print(f"{name:66s} {r['mean']:7.2f} {r['step_times'][0]:8.2f} {r['peak_rss_gb']:8.2f} {ratios}")


if __name__ == "__main__":
    main()
