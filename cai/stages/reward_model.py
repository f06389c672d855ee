"""Stage `reward_model`: the preference model, trained on soft AI labels (Bai et al. 2022, §1.2, §4.2).

Steps:
  1. read and check preferences.jsonl (AI harmlessness pairs and helpfulness pairs); split off a
     seeded held-out set;
  2. train a scalar head on the SFT model (or a configured base) with the soft Bradley-Terry loss
     (cai/losses.py) in our own DeepSpeed loop on Ray Train workers; DeepSpeed checkpoints every
     `save_steps` steps, and a rerun resumes from the last one;
  3. evaluate on the held-out set: agreement with the labels, calibration (ECE of σ(r_c - r_r)
     against the soft label), reward mean and std; save the model with reward_stats.json (the
     normalisation the PPO stage uses) to model.tmp/, then rename to model/.
trl's RewardTrainer takes only hard chosen/rejected (with an optional margin), hence our loop.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from cai.config import PipelineConfig, TrainConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.shards import read_jsonl, write_jsonl

REQUIRED = ("prompt", "chosen", "rejected", "p_chosen")


def base_model_for(cfg: PipelineConfig, inputs: dict[str, Path]) -> str:
    return cfg.reward_model.base_model or str(inputs["sft"] / "model")


def cache_inputs(cfg: PipelineConfig, constitution: Constitution) -> dict:
    return {"reward_model": cfg.reward_model.model_dump(mode="json"), "seed": cfg.seed}


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


def encode(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Chat-formatted prompt+response ids for both sides; long ones keep their end (the reward token)."""
    def ids(messages):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return out[-max_length:]
    return [{"chosen": ids(r["prompt"] + r["chosen"]), "rejected": ids(r["prompt"] + r["rejected"]),
             "p": float(r["p_chosen"])} for r in rows]


def collate(batch: list[dict], pad_id: int):
    """-> (2B, T) ids and mask, chosen rows first, right-padded; (B,) soft labels."""
    import torch

    seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask, torch.tensor([b["p"] for b in batch])


def rewards(engine, ids, mask):
    """(2B, T) -> (2B,) scalar rewards, read at the last non-pad token (HF's sequence pooling)."""
    return engine(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1).float()


def train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker: one DeepSpeed rank."""
    import deepspeed
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai import checkpointing
    from cai.batching import epoch_order
    from cai.calibration import expected_calibration_error, soft_agreement
    from cai.distributed import deepspeed_config, lean_engine, peak_rss_gb, require_bf16_support, world
    from cai.losses import soft_bradley_terry
    from cai.models import load_tokenizer

    train = TrainConfig(**config["train"])
    require_bf16_support(train, "reward_model")
    rank, size = world()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(config["seed"])
    tokenizer = load_tokenizer(config["base_model"], padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(config["base_model"], num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    checkpointing.enable(model, train.activation_checkpointing)
    train_rows = encode(tokenizer, read_jsonl(config["train_data"]), train.max_length)
    eval_rows = encode(tokenizer, read_jsonl(config["eval_data"]), train.max_length)
    per_step = train.batch_size * size
    steps_per_epoch = max(1, len(train_rows) // per_step)
    total = train.max_steps if train.max_steps > 0 else max(1, int(steps_per_epoch * train.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(train, hf_auto=False, world_size=size))
    lean_engine(engine, train)
    lengths = [max(len(r["chosen"]), len(r["rejected"])) for r in train_rows]
    start, ckpt = 0, config["checkpoint_dir"]
    if os.path.exists(os.path.join(ckpt, "latest")):
        _, client = engine.load_checkpoint(ckpt)
        start = client["step"]
    losses, tokens, t0 = [], 0, time.time()
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or step == start:
            order = epoch_order(lengths, per_step, f"{config['seed']}|epoch{epoch}", config["group_by_length"])
        batch = [train_rows[i] for i in order[k * per_step + rank:(k + 1) * per_step:size]]
        ids, mask, p = collate(batch, tokenizer.pad_token_id)
        with checkpointing.recomputing(engine.module):
            r = rewards(engine, ids, mask)
        loss = soft_bradley_terry(r[:len(batch)], r[len(batch):], p)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        tokens += int(mask.sum())
        if (step + 1) % train.save_steps == 0 and step + 1 < total:
            engine.save_checkpoint(ckpt, client_state={"step": step + 1})
    train_seconds = time.time() - t0
    tokens = _sum_over_ranks(tokens)
    # evaluation: every rank runs the same forward passes (ZeRO-3 needs all ranks); rank 0 reports
    engine.eval()
    scored = {"chosen": [], "rejected": [], "p": []}
    with torch.no_grad():
        for i in range(0, len(eval_rows + train_rows), train.batch_size):
            batch = (eval_rows + train_rows)[i:i + train.batch_size]
            ids, mask, p = collate(batch, tokenizer.pad_token_id)
            r = rewards(engine, ids, mask)
            scored["chosen"] += r[:len(batch)].tolist()
            scored["rejected"] += r[len(batch):].tolist()
            scored["p"] += p.tolist()
    all_r = torch.tensor(scored["chosen"] + scored["rejected"])
    n_eval = len(eval_rows)
    margin = torch.tensor(scored["chosen"][:n_eval]) - torch.tensor(scored["rejected"][:n_eval])
    p_eval = torch.tensor(scored["p"][:n_eval])
    stats = {"mean": all_r.mean().item(), "std": all_r.std().item() if len(all_r) > 1 else 1.0}
    _save(engine, model, tokenizer, config["model_tmp"], rank, train.zero_stage, stats)
    return {"steps": total, "resumed_from_step": start, "final_loss": round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4)
            if losses else None, "eval_pairs": n_eval,
            "eval_agreement": round(soft_agreement(torch.sigmoid(margin), p_eval), 3) if n_eval else None,
            "eval_ece": round(expected_calibration_error(torch.sigmoid(margin), p_eval), 3) if n_eval else None,
            "reward_mean": round(stats["mean"], 4), "reward_std": round(stats["std"], 4),
            "train_seconds": round(train_seconds, 2), "train_tokens": tokens, "peak_rss_gb": peak_rss_gb()}


def _sum_over_ranks(value: int) -> int:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


def _save(engine, model, tokenizer, out: str, rank: int, zero_stage: int, stats: dict) -> None:
    """HF folder loadable by from_pretrained; ZeRO-3 shards are gathered first (all ranks join)."""
    import contextlib

    import deepspeed

    gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None) \
        if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if rank == 0:
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            Path(out, "reward_stats.json").write_text(json.dumps(stats))


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.distributed import run_training

    # step 1: data
    rows = check_preferences(inputs["preferences"] / "preferences.jsonl")
    train_rows, eval_rows = split(rows, cfg.reward_model.eval_fraction, cfg.seed)
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    # step 2-3: train and evaluate on Ray Train + DeepSpeed
    model_tmp = out / "model.tmp"
    shutil.rmtree(model_tmp, ignore_errors=True)
    config = {"train": cfg.reward_model.train.model_dump(), "base_model": base_model_for(cfg, inputs),
              "train_data": str(out / "train.jsonl"), "eval_data": str(out / "eval.jsonl"),
              "checkpoint_dir": str(out / "checkpoints"), "model_tmp": str(model_tmp), "seed": cfg.seed,
              "group_by_length": cfg.reward_model.group_by_length}
    summary = run_training(train_worker, config, cfg.reward_model.train, cfg.ray, out / "ray", "reward_model")
    if not (model_tmp / "reward_stats.json").exists():
        raise CaiError(f"reward_model: training ended without a saved model in {model_tmp}")
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(model_tmp, out / "model")
    shutil.rmtree(out / "ray", ignore_errors=True)
    return {**summary, "train_pairs": len(train_rows), "workers": cfg.reward_model.train.workers,
            "zero_stage": cfg.reward_model.train.zero_stage}
