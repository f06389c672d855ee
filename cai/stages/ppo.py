"""Stage `ppo`: RL-CAI, PPO against the preference model with a KL penalty to the SFT model (§4.2).

Steps:
  1. the RL prompts (red-team and/or helpfulness prompts from the prompts stage); context checks; a
     user-named reward function is imported and checked here, before any model loads;
  2. the models: policy, reference and rollout copy from the SFT checkpoint, the preference model (read
     as the reward_model stage trained it, cai/preference_model.py), the value model from the preference
     model (or the SFT model); with `train.lora`, policy and value train adapters and the reference is the
     policy's frozen base with its adapters off (no second copy);
  3. the PPO loop (cai/rl/worker.py) on Ray Train workers with DeepSpeed engines for policy and value,
     checkpoints committed every `train.save_steps` and resumed to the step; metrics.jsonl, samples.jsonl
     and the logs in logs/ (cai/metrics_log.py) as it goes, with a progress bar read from metrics.jsonl;
  4. commit the final policy with its card (cai/cards.py): model.tmp/ -> checked -> model/ (a LoRA adapter
     merged first, kept in adapter/; and, every `keep_snapshots_every` steps, the policy so far in
     snapshots/step-NNNNNN/, which `cai eval` reads as ppo@N; each gets a card with that step's numbers).
On 8 GPUs: `cai run x.yaml ppo.train.workers=8 ppo.train.gpus_per_worker=1 ppo.train.bf16=true
ppo.train.zero_stage=3`.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from cai.config import PipelineConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.jobs import PpoJob, RewardFunction
from cai.metrics_log import Reporting
from cai.shards import read_jsonl, write_jsonl
from cai.stages import Reads

READS = Reads(stages=("prompts", "sft", "reward_model"))
WORKERS = "training"


def settings(cfg: PipelineConfig) -> dict:
    return {"ppo": cfg.ppo.model_dump(mode="json"), "seed": cfg.seed, "system_prompt": cfg.policy.system_prompt}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def reward_function(spec: str) -> RewardFunction:
    """'module:function' -> the function, which must take (prompts, responses, response_ids); one line if not."""
    from cai.rewards import load_function

    return load_function(spec, "ppo.reward_function", ("prompts", "responses", "response_ids"))


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


def step_info(m: dict) -> tuple[str, list[str]]:
    """A PPO metrics record as a progress line, and its warnings."""
    return (f"reward {m['reward_mean']:+.3f} kl {m['kl']:.3f} len {m['response_length']:.0f} "
            f"{m['step_time']:.1f}s/step", m.get("warnings", []))


def prepare(cfg: PipelineConfig, inputs: dict[str, Path], out: Path) -> PpoJob:
    """Steps 1-2: the prompts (written to prompts.jsonl), the reward function checked before anything loads,
    the models' folders and the prompt budget."""
    from cai.lora import check_targets

    prompts = rl_prompts(cfg, inputs["prompts"])
    write_jsonl(out / "prompts.jsonl", prompts)
    fn = reward_function(cfg.ppo.reward_function) if cfg.ppo.reward_function else None
    policy, reward = inputs["sft"] / "model", inputs["reward_model"] / "model"
    check_targets(cfg.ppo.train.lora, policy, "ppo.train.lora")
    return PpoJob(ppo=cfg.ppo, seed=cfg.seed, out=out, policy=policy,
                  value_init=reward if cfg.ppo.value_init == "reward_model" else policy,
                  reward_model=None if fn else reward, reward_function=fn,
                  reward_data=(inputs["reward_model"] / "eval.jsonl", inputs["reward_model"] / "train.jsonl"),
                  prompts=tuple(r["prompt"] for r in prompts), max_prompt_tokens=prompt_budget(cfg, policy),
                  system_prompt=cfg.policy.system_prompt, report=Reporting.of(cfg, "ppo", out, settings(cfg)))


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.cards import DataFile, model_card, write_snapshot_cards
    from cai.cluster import run_training
    from cai.models import commit_model
    from cai.rl.worker import train_worker

    # steps 1-2: prompts, reward function and models, in a job for the workers
    job = prepare(cfg, inputs, out)
    # step 3: the PPO loop, with progress from its metrics file
    shutil.rmtree(out / "model.tmp", ignore_errors=True)
    t0 = time.time()
    summary = run_training(train_worker, job, cfg.ppo.train, cfg.ray, out, "ppo", steps_log=out / "metrics.jsonl",
                           total=cfg.ppo.steps, info=step_info)
    final = summary.pop("final", {})
    summary |= {f"last_{k}": final.get(k) for k in ("reward_mean", "kl", "response_length", "eos_rate", "step_time")}
    # step 4: commit the policy, with its card (and one in each snapshot)
    card = model_card(cfg, constitution, "ppo", summary, settings(cfg), [
        DataFile.of(out, "ppo", "prompts.jsonl"), DataFile.of(inputs["reward_model"], "reward_model", "train.jsonl")])
    commit_model(out / "model.tmp", out / "model", card=card,
                 lora_base=job.policy if cfg.ppo.train.lora else None)
    write_snapshot_cards(out, card)
    shutil.rmtree(out / "ray", ignore_errors=True)
    shutil.rmtree(out / "parked", ignore_errors=True)
    snapshots = sorted(int(p.name.split("-")[1]) for p in (out / "snapshots").glob("step-??????"))
    return {**summary, "snapshots": snapshots, "wall_s": round(time.time() - t0, 1), "reward_tokenizer": "same" if _same_tokenizer(
        job.policy, inputs["reward_model"] / "model") else "re-tokenised from text"}
