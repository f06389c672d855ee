"""Stage `dpo`: the cheaper alternative to PPO, trl's DPOTrainer on the AI preference labels.

Selected by `policy_optimization: dpo`. Steps:
  1. pairs from preferences.jsonl whose soft label is confident enough (p_chosen >= dpo.min_p_chosen) and
     whose responses both finished (trl closes every turn with an end-of-turn token, so a response cut at
     the token limit would be taught as a finished answer);
  2. DPO (Rafailov et al. 2023) from the SFT model, with the SFT model as reference (with `train.lora`: the
     frozen SFT weights with the adapter off, no second copy), on DeepSpeed inside Ray Train workers; trainer
     checkpoints in trainer/, resumed on a rerun; logs in logs/ (cai/metrics_log.py);
  3. commit the policy with its card (cai/cards.py): model.tmp/ -> checked -> model/ (a LoRA adapter merged
     first, kept in adapter/).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from cai.config import PipelineConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.jobs import DpoJob
from cai.metrics_log import Reporting
from cai.progress import STEPS
from cai.shards import read_jsonl, write_jsonl
from cai.stages import Reads

READS = Reads(stages=("sft", "preferences"))
WORKERS = "training"


def settings(cfg: PipelineConfig) -> dict:
    return {"dpo": cfg.dpo.model_dump(mode="json"), "seed": cfg.seed}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def train_worker(job: DpoJob) -> dict:
    """Runs on every Ray Train worker (one DeepSpeed rank each)."""
    from trl import DPOConfig, DPOTrainer

    from cai.cluster import Resources, peak_rss_gb, worker_init
    from cai.lora import trainable_share
    from cai.train.hf import train_hf, trainer_args

    worker = worker_init(Resources.of_training(job.train, "dpo"), job.seed)
    job = dataclasses.replace(job, train=worker.decided(job.train))  # bf16 auto decided here
    args = trainer_args(DPOConfig, job.train, job.trainer_dir, job.seed, worker, beta=job.beta)
    trainer, result, last = train_hf(DPOTrainer, args, read_jsonl(job.data), job.base_model, "left", job.model_tmp,
                                     job.steps_log, worker, job.train, job.report)
    if result is None:  # stopped for a stop request, checkpointed
        return {"stopped": True, "step": trainer.state.global_step}
    logged = [h for h in trainer.state.log_history if "rewards/accuracies" in h][-5:]  # trl's implicit rewards
    return {"train_loss": round(result.training_loss, 4), "steps": result.global_step,
            "train_accuracy": round(sum(h["rewards/accuracies"] for h in logged) / len(logged), 4) if logged else None,
            "train_margin": round(sum(h["rewards/margins"] for h in logged) / len(logged), 4) if logged else None,
            "resumed_from": last, "device": str(trainer.args.device), "bf16": worker.bf16, "peak_rss_gb": peak_rss_gb(),
            **(trainable_share(trainer.model) if job.train.lora else {})}


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.cards import DataFile, model_card
    from cai.cluster import run_training
    from cai.lora import check_targets
    from cai.models import commit_model
    from cai.stages.reward_model import check_preferences

    # step 1: confident, finished pairs only
    rows = check_preferences(inputs["preferences"] / "preferences.jsonl")
    finished = [r for r in rows if r.get("chosen_finished", True) and r.get("rejected_finished", True)]
    kept = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in finished
            if r["p_chosen"] >= cfg.dpo.min_p_chosen]
    if not kept:
        raise CaiError(f"dpo: no finished pair has p_chosen >= dpo.min_p_chosen={cfg.dpo.min_p_chosen} "
                       f"(of {len(rows)}); lower the threshold or improve the judge")
    write_jsonl(out / "train.jsonl", kept)
    # step 2: DPO on Ray Train + DeepSpeed
    base = inputs["sft"] / "model"
    check_targets(cfg.dpo.train.lora, base, "dpo.train.lora")
    shutil.rmtree(out / "model.tmp", ignore_errors=True)
    job = DpoJob(train=cfg.dpo.train, seed=cfg.seed, beta=cfg.dpo.beta, base_model=base,
                 data=out / "train.jsonl", trainer_dir=out / "trainer", model_tmp=out / "model.tmp",
                 steps_log=out / STEPS, report=Reporting.of(cfg, "dpo", out, settings(cfg)))
    summary = {**run_training(train_worker, job, cfg.dpo.train, cfg.ray, out, "dpo"), "pairs": len(kept),
               "dropped_unconfident": len(finished) - len(kept), "dropped_unfinished": len(rows) - len(finished)}
    # step 3: commit once it loads, with its card (a LoRA adapter merged into the base first)
    data = [DataFile.of(inputs["preferences"], "preferences", "preferences.jsonl"),
            DataFile.of(out, "dpo", "train.jsonl")]
    card = model_card(cfg, constitution, "dpo", summary, settings(cfg), data)
    commit_model(out / "model.tmp", out / "model", card=card, lora_base=base if cfg.dpo.train.lora else None)
    shutil.rmtree(out / "ray", ignore_errors=True)
    return summary
