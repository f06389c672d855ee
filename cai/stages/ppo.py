"""Stage `ppo`: RL-CAI, PPO against the preference model with a KL penalty to the SFT model (§4.2).

Steps:
  1. the RL prompts (red-team and/or helpfulness prompts from the prompts stage); context checks;
  2. the models: policy and reference from the SFT checkpoint, the preference model and its saved
     normalisation stats, the value model from the preference model (or the SFT model);
  3. the PPO loop (cai/ppo_worker.py) on Ray Train workers with DeepSpeed engines for policy and value,
     checkpoints committed every `train.save_steps` and resumed to the step; metrics.jsonl, samples.jsonl
     and TensorBoard (when installed) as it goes, with a progress bar read from metrics.jsonl;
  4. commit the final policy: model.tmp/ -> model/.
On 8 GPUs: `cai run x.yaml ppo.train.workers=8 ppo.train.gpus_per_worker=1 ppo.train.bf16=true
ppo.train.zero_stage=3`.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

from cai.config import PipelineConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.progress import console
from cai.shards import read_jsonl, write_jsonl


def cache_inputs(cfg: PipelineConfig, constitution: Constitution) -> dict:
    return {"ppo": cfg.ppo.model_dump(mode="json"), "seed": cfg.seed}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def rl_prompts(cfg: PipelineConfig, prompts_dir: Path) -> list[dict]:
    parts = ("red_team", "helpful") if cfg.ppo.prompts == "both" else (cfg.ppo.prompts,)
    rows = [r for part in parts for r in read_jsonl(prompts_dir / f"{part}.jsonl")]
    if not rows:
        raise CaiError(f"{prompts_dir}: no prompts for ppo (ppo.prompts={cfg.ppo.prompts})")
    return rows


def prompt_budget(cfg: PipelineConfig, policy: Path) -> int:
    """Prompt tokens that fit beside max_new_tokens in the policy's context; one line when none do."""
    context = json.loads((policy / "config.json").read_text()).get("max_position_embeddings", 2048)
    new = cfg.ppo.generation.max_new_tokens
    if new >= context:
        raise CaiError(f"ppo.generation.max_new_tokens={new} does not fit the policy's context of {context} tokens")
    return min(cfg.ppo.generation.max_prompt_tokens, context - new)


def _same_tokenizer(a: Path, b: Path) -> bool:
    files = ("tokenizer.json", "tokenizer_config.json")
    return all((a / f).exists() and (b / f).exists() and (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _follow(metrics: Path, total: int, stop: threading.Event) -> None:
    """Progress bar from the committed metrics file, while the workers train."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    seen = 0
    with Progress(TextColumn("[bold]ppo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("ppo", total=total, info="")
        while not stop.is_set():
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            for line in lines[seen:]:
                m = json.loads(line)
                info = (f"reward {m['reward_mean']:+.3f} kl {m['kl']:.3f} len {m['response_length']:.0f} "
                        f"{m['step_time']:.1f}s/step")
                bar.update(task, completed=m["step"], info=info)
                if not console.is_terminal:
                    console.print(f"ppo step {m['step']}/{total}: {info}")
                for w in m.get("warnings", []):
                    console.print(f"[bold yellow]ppo step {m['step']}: WARNING: {w}[/]")
            seen = len(lines)
            stop.wait(0.5)


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.distributed import run_training

    # step 1: prompts
    prompts = rl_prompts(cfg, inputs["prompts"])
    write_jsonl(out / "prompts.jsonl", prompts)
    # step 2: models
    policy = inputs["sft"] / "model"
    reward = inputs["reward_model"] / "model"
    budget = prompt_budget(cfg, policy)
    config = {"ppo": cfg.ppo.model_dump(), "seed": cfg.seed, "out": str(out), "policy": str(policy),
              "reward_model": str(reward), "value_init": str(reward if cfg.ppo.value_init == "reward_model" else policy),
              "prompts": str(out / "prompts.jsonl"), "max_prompt_tokens": budget,
              "reward_function": cfg.ppo.reward_function}
    # step 3: the PPO loop, with progress from its metrics file
    shutil.rmtree(out / "model.tmp", ignore_errors=True)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(out / "metrics.jsonl", cfg.ppo.steps, stop), daemon=True)
    follower.start()
    t0 = time.time()
    try:
        summary = run_training(_train_worker, config, cfg.ppo.train, cfg.ray, out / "ray", "ppo")
    finally:
        stop.set()
        follower.join()
    # step 4: commit the policy
    if not (out / "model.tmp" / "config.json").exists():
        raise CaiError(f"ppo: training ended without a saved policy in {out / 'model.tmp'}")
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(out / "model.tmp", out / "model")
    shutil.rmtree(out / "ray", ignore_errors=True)
    shutil.rmtree(out / "parked", ignore_errors=True)
    final = summary.pop("final", {})
    return {**summary, "wall_s": round(time.time() - t0, 1), "reward_tokenizer": "same" if _same_tokenizer(
        policy, reward) else "re-tokenised from text", **{f"last_{k}": final.get(k) for k in (
            "reward_mean", "kl", "response_length", "eos_rate", "step_time")}}


def _train_worker(config: dict) -> dict:
    from cai.ppo_worker import train_worker

    return train_worker(config)
