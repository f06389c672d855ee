"""Stage `dpo`: the cheaper alternative to PPO, trl's DPOTrainer on the AI preference labels.

Selected by `policy_optimization: dpo`. Steps:
  1. pairs from preferences.jsonl whose soft label is confident enough (p_chosen >= dpo.min_p_chosen);
  2. DPO (Rafailov et al. 2023) from the SFT model, with the SFT model as reference, on DeepSpeed inside
     Ray Train workers; trainer checkpoints in trainer/, resumed on a rerun;
  3. save the policy to model.tmp/, check it loads, rename to model/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cai.config import PipelineConfig, TrainConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.shards import write_jsonl


def cache_inputs(cfg: PipelineConfig, constitution: Constitution) -> dict:
    return {"dpo": cfg.dpo.model_dump(mode="json"), "seed": cfg.seed}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker (one DeepSpeed rank each)."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from cai.distributed import peak_rss_gb, train_hf, trainer_args, world

    train = TrainConfig(**config["train"])
    rank, _ = world()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    trainer_dir = config["trainer_dir"]
    args = trainer_args(DPOConfig, "dpo", train, trainer_dir, config["seed"], rank, beta=config["beta"])
    _, result, last = train_hf(DPOTrainer, args, config, "left", rank, train)
    return {"train_loss": round(result.training_loss, 4), "steps": result.global_step,
            "resumed_from": last, "peak_rss_gb": peak_rss_gb()}


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.distributed import run_training
    from cai.models import load_causal_lm
    from cai.stages.reward_model import check_preferences

    # step 1: confident pairs only
    rows = check_preferences(inputs["preferences"] / "preferences.jsonl")
    kept = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows if r["p_chosen"] >= cfg.dpo.min_p_chosen]
    if not kept:
        raise CaiError(f"dpo: no pair has p_chosen >= dpo.min_p_chosen={cfg.dpo.min_p_chosen} "
                       f"(of {len(rows)}); lower the threshold or improve the judge")
    if not (out / "train.jsonl").exists():
        write_jsonl(out / "train.jsonl", kept)
    # step 2: DPO on Ray Train + DeepSpeed
    model_tmp = out / "model.tmp"
    shutil.rmtree(model_tmp, ignore_errors=True)
    config = {"train": cfg.dpo.train.model_dump(), "beta": cfg.dpo.beta, "base_model": str(inputs["sft"] / "model"),
              "data": str(out / "train.jsonl"), "trainer_dir": str(out / "trainer"), "model_tmp": str(model_tmp),
              "seed": cfg.seed}
    summary = run_training(train_worker, config, cfg.dpo.train, cfg.ray, out / "ray", "dpo")
    # step 3: commit once it loads
    load_causal_lm(model_tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(model_tmp, out / "model")
    shutil.rmtree(out / "ray", ignore_errors=True)
    return {**summary, "pairs": len(kept), "dropped_unconfident": len(rows) - len(kept)}
