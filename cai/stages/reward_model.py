"""Stage `reward_model`: the preference model, trained on soft AI labels (Bai et al. 2022, §1.2, §4.2).

Steps:
  1. read and check preferences.jsonl (AI harmlessness pairs and helpfulness pairs); split off a
     seeded held-out set; tokenise both sides once (cai/preference_model.py: how PPO will read them too);
  2. train a scalar head on the SFT model (or a configured base) with the soft Bradley-Terry loss
     (cai/losses.py) in our own DeepSpeed loop on Ray Train workers, with the configured learning-rate
     schedule; DeepSpeed checkpoints every `save_steps` steps, and a rerun resumes from the last one; logs in
     logs/ (cai/metrics_log.py);
  3. evaluate on the held-out set: agreement with the labels, calibration (ECE of σ(r_c - r_r)
     against the soft label); the card beside the model holds the truncation length and the score
     statistics in the training dtype, which PPO normalises with (cai/preference_model.py);
  4. commit the model with its card (cai/cards.py): model.tmp/ -> checked -> model/ (with `train.lora`: the
     adapter and the trained head merged into the base first, the adapter kept in adapter/).
trl's RewardTrainer takes only hard chosen/rejected (with an optional margin), hence our loop.
"""
from __future__ import annotations

import dataclasses
import math
import random
import shutil
from pathlib import Path

from cai.config import PipelineConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.jobs import RewardModelJob
from cai.metrics_log import Reporter, Reporting, metric_names
from cai.progress import STEPS
from cai.shards import read_jsonl, write_jsonl
from cai.stages import Reads

READS = Reads(stages=("sft", "preferences"))
WORKERS = "training"
REQUIRED = ("prompt", "chosen", "rejected", "p_chosen")


def settings(cfg: PipelineConfig) -> dict:
    return {"reward_model": cfg.reward_model.model_dump(mode="json"), "seed": cfg.seed}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {"base_model": cfg.reward_model.base_model} if cfg.reward_model.base_model else {}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def check_preferences(path: Path) -> list[dict]:
    """Every row needs the preference columns and a finite p_chosen in [0, 1]; else one clear line."""
    rows = read_jsonl(path)
    if not rows:
        raise CaiError(f"{path}: no preference rows")
    for n, row in enumerate(rows, 1):
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise CaiError(f"{path}: row {n}: missing column '{missing[0]}'")
        p = row["p_chosen"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p) or not 0 <= p <= 1:
            raise CaiError(f"{path}: row {n}: p_chosen must be a number in [0, 1], got {p!r}")
    return rows


def split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(f"{seed}|rm-split").shuffle(order)
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows)))) if fraction > 0 else 0
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def encode_pairs(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Both sides as the model reads them -> {chosen, rejected, p}."""
    from cai.preference_model import encode

    return [{side: encode(tokenizer, r["prompt"] + r[side], r.get(f"{side}_finished", True), max_length)
             for side in ("chosen", "rejected")} | {"p": float(r["p_chosen"])} for r in rows]


def train_worker(job: RewardModelJob) -> dict:
    """Runs on every Ray Train worker (one DeepSpeed rank): train, evaluate, save with the card."""
    import contextlib
    import time

    import torch
    from transformers import AutoModelForSequenceClassification

    from cai import lora
    from cai.cluster import Resources, peak_rss_gb, worker_init
    from cai.models import load_tokenizer
    from cai.train import recompute
    from cai.train.deepspeed import build_engine

    worker = worker_init(Resources.of_training(job.train, "reward_model"), job.seed)
    job = dataclasses.replace(job, train=worker.decided(job.train))  # bf16 auto decided here
    tokenizer = load_tokenizer(job.base_model, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(job.base_model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if job.train.lora:  # the base frozen; the adapters and the new scalar head train
        model = lora.wrap(model, job.train.lora, "reward_model")
    recompute.enable(model, job.train.activation_checkpointing)
    train_rows, eval_rows = read_jsonl(job.train_data), read_jsonl(job.eval_data)
    per_step = job.train.batch_size * worker.world
    steps_per_epoch = max(1, len(train_rows) // per_step)
    total = job.train.max_steps if job.train.max_steps > 0 else max(1, int(steps_per_epoch * job.train.epochs))
    engine = build_engine(model.to(worker.device), job.train, worker.world, total)
    t0 = time.time()
    with Reporter(job.report) if worker.rank == 0 else contextlib.nullcontext() as reporter:
        start, losses, tokens, lrs = _train(engine, job, worker, train_rows, tokenizer.pad_token_id, total, reporter)
        train_seconds = time.time() - t0
        if start + len(losses) < total:  # stopped for a stop request, checkpointed
            return {"stopped": True, "step": start + len(losses)}
        metrics, stats = _evaluate(engine, eval_rows, train_rows, tokenizer.pad_token_id, job.train.batch_size,
                                   worker.device)
        if reporter:  # the held-out figures, under the HF Trainer's eval/ names, at the last step
            reporter.log(metric_names({"eval_accuracy": metrics["eval_agreement"], "eval_ece": metrics["eval_ece"],
                                       "eval_reward_mean": stats[0], "eval_reward_std": stats[1]}), total)
    _save(engine, tokenizer, job, worker, stats)
    return {"steps": total, "resumed_from_step": start, "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4)
            if losses else None, **metrics, "first_lr": lrs[0] if lrs else None, "last_lr": lrs[-1] if lrs else None,
            "device": str(worker.device), "bf16": worker.bf16, "train_seconds": round(train_seconds, 2),
            "train_tokens": _sum_over_ranks(tokens, worker.device), "peak_rss_gb": peak_rss_gb(),
            **(lora.trainable_share(model) if job.train.lora else {})}


def _train(engine, job: RewardModelJob, worker, rows: list[dict], pad_id: int, total: int,
           reporter: Reporter | None):
    """The soft Bradley-Terry loop from the last checkpoint -> (start step, losses, tokens seen here, the
    learning rate of each step); fewer steps than `total` when a stop was requested (checkpointed). Rank 0
    writes the step records and, through `reporter`, the logs."""
    import os

    from cai import stopping
    from cai.losses import soft_bradley_terry
    from cai.progress import StepLog
    from cai.preference_model import collate, rewards
    from cai.train import recompute
    from cai.train.batching import epoch_order
    from cai.train.deepspeed import grad_norm
    from cai.train.deepspeed import frozen_weights

    per_step = job.train.batch_size * worker.world
    steps_per_epoch = max(1, len(rows) // per_step)
    lengths = [max(len(r["chosen"]), len(r["rejected"])) for r in rows]
    start, ckpt = 0, str(job.checkpoint_dir)
    if os.path.exists(os.path.join(ckpt, "latest")):
        _, client = engine.load_checkpoint(ckpt, load_module_strict=not frozen_weights(engine))
        start = client["step"]
    losses, tokens, lrs = [], 0, []
    steps = StepLog(job.steps_log, start) if worker.rank == 0 else None
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or step == start:
            order = epoch_order(lengths, per_step, f"{job.seed}|epoch{epoch}", job.group_by_length)
        batch = [rows[i] for i in order[k * per_step + worker.rank:(k + 1) * per_step:worker.world]]
        ids, mask, p = collate(batch, pad_id, worker.device)
        lrs.append(engine.get_lr()[0])
        with recompute.recomputing(engine.module):
            r = rewards(engine, ids, mask)
        loss = soft_bradley_terry(r[:len(batch)], r[len(batch):], p)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        tokens += int(mask.sum())
        if steps:
            steps.write(step + 1, total, loss=losses[-1], learning_rate=lrs[-1])
            figures = {"loss": losses[-1], "learning_rate": lrs[-1], "grad_norm": grad_norm(engine),
                       "epoch": (step + 1) / steps_per_epoch, **pair_figures(r[:len(batch)], r[len(batch):], p)}
            reporter.log(metric_names(figures), step + 1)
        stop = stopping.agreed(worker.device) and step + 1 < total
        if stop or ((step + 1) % job.train.save_steps == 0 and step + 1 < total):
            engine.save_checkpoint(ckpt, client_state={"step": step + 1},
                                   exclude_frozen_parameters=frozen_weights(engine))
        if stop:
            break
    return start, losses, tokens, lrs


def pair_figures(chosen, rejected, p) -> dict[str, float]:
    """A batch's (B,) rewards of the chosen and rejected sides and (B,) soft labels -> accuracy (the share of pairs
    whose reward margin prefers the label's side, ties excluded, as the held-out agreement) and mean margin."""
    import torch

    from cai.calibration import soft_agreement

    margin = (chosen - rejected).detach().float()
    return {"accuracy": soft_agreement(torch.sigmoid(margin), p), "margin": margin.mean().item()}


def _evaluate(engine, eval_rows: list[dict], train_rows: list[dict], pad_id: int, batch_size: int, device):
    """Held-out agreement and ECE, and score statistics over the held-out pairs then training pairs (up to
    STATS_PAIRS); every rank runs the same forwards (ZeRO-3 needs all ranks). -> (metrics, (mean, std))."""
    import torch

    from cai.calibration import expected_calibration_error, soft_agreement
    from cai.preference_model import STATS_PAIRS, mean_std, score_pairs

    engine.eval()
    rows = (eval_rows + train_rows)[:max(STATS_PAIRS, len(eval_rows))]
    chosen, rejected = score_pairs(engine, rows, pad_id, batch_size, device)
    mean, std = mean_std(chosen + rejected)
    n = len(eval_rows)
    margin = torch.tensor(chosen[:n], device=device) - torch.tensor(rejected[:n], device=device)
    p_eval = torch.tensor([r["p"] for r in eval_rows], device=device)
    metrics = {"eval_pairs": n,
               "eval_agreement": round(soft_agreement(torch.sigmoid(margin), p_eval), 3) if n else None,
               "eval_ece": round(expected_calibration_error(torch.sigmoid(margin), p_eval), 3) if n else None,
               "reward_mean": round(mean, 4), "reward_std": round(std, 4)}
    return metrics, (mean, std)


def _save(engine, tokenizer, job: RewardModelJob, worker, stats: tuple[float, float]) -> None:
    """The HF folder (ZeRO-3 shards gathered, every rank joins; with LoRA, the adapter and the scalar head) and
    its card, with the statistics measured in the training dtype."""
    from cai.preference_model import PreferenceModelCard
    from cai.train.deepspeed import gathered

    with gathered(engine.module, job.train.zero_stage):
        if worker.rank == 0:
            engine.module.save_pretrained(job.model_tmp, safe_serialization=True)
            tokenizer.save_pretrained(job.model_tmp)
            PreferenceModelCard(max_length=job.train.max_length, dtype="bfloat16" if job.train.bf16 else "float32",
                                mean=stats[0], std=stats[1]).save(job.model_tmp)


def _sum_over_ranks(value: int, device) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def prepare(cfg: PipelineConfig, inputs: dict[str, Path], out: Path) -> RewardModelJob:
    """Step 1: check and split the pairs, tokenise both sides once (train.jsonl, eval.jsonl), name the base."""
    from cai.lora import check_targets
    from cai.models import load_tokenizer, resolve_model

    rows = check_preferences(inputs["preferences"] / "preferences.jsonl")
    train_rows, eval_rows = split(rows, cfg.reward_model.eval_fraction, cfg.seed)
    base = resolve_model(cfg.reward_model.base_model) if cfg.reward_model.base_model else inputs["sft"] / "model"
    check_targets(cfg.reward_model.train.lora, base, "reward_model.train.lora")
    tokenizer = load_tokenizer(base, padding_side="right")
    write_jsonl(out / "train.jsonl", encode_pairs(tokenizer, train_rows, cfg.reward_model.train.max_length))
    write_jsonl(out / "eval.jsonl", encode_pairs(tokenizer, eval_rows, cfg.reward_model.train.max_length))
    return RewardModelJob(train=cfg.reward_model.train, seed=cfg.seed, base_model=base, train_data=out / "train.jsonl",
                          eval_data=out / "eval.jsonl", group_by_length=cfg.reward_model.group_by_length,
                          checkpoint_dir=out / "checkpoints", model_tmp=out / "model.tmp",
                          steps_log=out / STEPS, report=Reporting.of(cfg, "reward_model", out, settings(cfg)))


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.cards import DataFile, lineage_root, model_card
    from cai.cluster import run_training
    from cai.models import commit_model
    from cai.preference_model import CARD

    # step 1: data, split and tokenised once
    job = prepare(cfg, inputs, out)
    # steps 2-3: train and evaluate on Ray Train + DeepSpeed
    shutil.rmtree(out / "model.tmp", ignore_errors=True)
    summary = {**run_training(train_worker, job, cfg.reward_model.train, cfg.ray, out, "reward_model"),
               "train_pairs": len(read_jsonl(job.train_data)), "workers": cfg.reward_model.train.workers,
               "zero_stage": cfg.reward_model.train.zero_stage}
    # step 4: commit, with the model card
    base = cfg.reward_model.base_model
    data = [DataFile.of(inputs["preferences"], "preferences", "preferences.jsonl"),
            *(DataFile.of(out, "reward_model", f) for f in ("train.jsonl", "eval.jsonl"))]
    card = model_card(cfg, constitution, "reward_model", summary, settings(cfg), data, head="reward_model",
                      base_model=base or lineage_root(cfg), fine_tuned_from=base or "sft/model")
    commit_model(out / "model.tmp", out / "model", head="reward_model", required=(CARD,), card=card,
                 lora_base=job.base_model if cfg.reward_model.train.lora else None)
    shutil.rmtree(out / "ray", ignore_errors=True)
    return summary
