"""Stage `sft`: the SL-CAI model, fine-tuned on the revisions plus helpfulness samples (§3.1).

Steps:
  1. mix the data: every revision row from critique_revise, plus `helpful_ratio` helpfulness rows per
     revision row (seeded choice), shuffled (trl conversational prompt/completion rows, train.jsonl);
  2. tokenise once, in the driver: the loss falls on the completion only, a completion kept unfinished
     has no end-of-turn token, rows longer than `max_length` are cut (dropped, counted, when nothing of
     the completion is left); the row order groups similar lengths and deals each step's rows evenly
     across ranks;
  3. train with trl's SFTTrainer on DeepSpeed (ZeRO stage from config) inside Ray Train workers;
     trainer checkpoints go to trainer/, and a rerun resumes from the last one; logs in logs/ (cai/metrics_log.py);
  4. commit the model with its card (cai/cards.py): model.tmp/ (ZeRO-3 weights gathered) -> checked -> model/;
     with `train.lora`, model.tmp/ holds the adapter, merged into the base on commit and kept in adapter/.
On 8 GPUs: `cai run pipelines/x.yaml sft.train.workers=8 sft.train.gpus_per_worker=1 sft.train.bf16=true`.
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
from cai.jobs import SftJob
from cai.metrics_log import Reporting
from cai.progress import STEPS
from cai.shards import read_jsonl, write_jsonl
from cai.stages import Reads

READS = Reads(stages=("critique_revise",))
WORKERS = "training"


def base_model(cfg: PipelineConfig) -> str:
    return cfg.sft.base_model or cfg.policy.name


def settings(cfg: PipelineConfig) -> dict:
    return {"sft": cfg.sft.model_dump(mode="json"), "seed": cfg.seed}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {"base_model": base_model(cfg)}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def mix_rows(revisions: list[dict], helpful: list[dict], ratio: float, seed: int) -> list[dict]:
    """All revision rows plus round(ratio * len(revisions)) helpfulness rows, shuffled with `seed`."""
    rng = random.Random(f"{seed}|sft-mix")
    take = min(len(helpful), round(ratio * len(revisions)))
    rows = revisions + rng.sample(helpful, take)
    rng.shuffle(rows)
    return rows


def encode_rows(tokenizer, rows: list[dict], max_length: int) -> tuple[list[dict], int]:
    """Conversational rows -> {input_ids, completion_mask} cut to `max_length` (trl's pre-tokenised form);
    -> (rows, rows dropped because the prompt alone fills max_length)."""
    from cai.chat import prompt_completion_ids

    encoded, dropped = [], 0
    for r in rows:
        ids, n_prompt = prompt_completion_ids(tokenizer, r["prompt"], r["completion"], r.get("finished", True))
        ids = ids[:max_length]
        if n_prompt >= len(ids):
            dropped += 1
            continue
        encoded.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)})
    return encoded, dropped


def step_order(lengths: list[int], cfg: PipelineConfig) -> tuple[list[int], int]:
    """Row order for the trainer (read in sequence; cai/train/batching.py deals each step's rows across ranks,
    grouped by token length when `sft.group_by_length`) -> (order, passes over the data it holds)."""
    from cai.train.batching import dealt_order

    train, passes = cfg.sft.train, math.ceil(cfg.sft.train.epochs)
    return dealt_order(lengths, train.batch_size, train.workers, train.grad_accum, f"{cfg.seed}|sft",
                       cfg.sft.group_by_length, passes), passes


def train_worker(job: SftJob) -> dict:
    """Runs on every Ray Train worker (one DeepSpeed rank each)."""
    from trl import SFTConfig, SFTTrainer

    from cai.cluster import Resources, peak_rss_gb, worker_init
    from cai.lora import trainable_share
    from cai.train.hf import train_hf, trainer_args

    worker = worker_init(Resources.of_training(job.train, "sft"), job.seed)
    job = dataclasses.replace(job, train=worker.decided(job.train))  # bf16 auto decided here
    # the data holds `passes` epochs in our order (one shuffle per epoch), read once in sequence
    per_pass = job.train.model_copy(update={"epochs": job.train.epochs / job.passes})
    args = trainer_args(SFTConfig, per_pass, job.trainer_dir, job.seed, worker, completion_only_loss=True,
                        include_num_input_tokens_seen="non_padding", train_sampling_strategy="sequential")
    rows = read_jsonl(job.data)
    trainer, result, last = train_hf(SFTTrainer, args, [rows[i] for i in job.order], job.base_model, "right",
                                     job.model_tmp, job.steps_log, worker, job.train, job.report,
                                     epoch_scale=job.passes)
    if result is None:  # stopped for a stop request, checkpointed
        return {"stopped": True, "step": trainer.state.global_step}
    return {"train_loss": round(result.training_loss, 4), "steps": result.global_step,
            "resumed_from": last, "runtime_s": round(result.metrics["train_runtime"], 1),
            "tokens": int(trainer.state.num_input_tokens_seen), "device": str(trainer.args.device),
            "bf16": worker.bf16, "peak_rss_gb": peak_rss_gb(),
            **(trainable_share(trainer.model) if job.train.lora else {})}


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.cards import DataFile, model_card
    from cai.cluster import run_training
    from cai.lora import check_targets
    from cai.models import commit_model, load_tokenizer, resolve_model

    model = resolve_model(base_model(cfg))
    check_targets(cfg.sft.train.lora, model, "sft.train.lora")  # before any work
    # step 1: the data mix (a resumed run must see the very same rows)
    source = inputs["critique_revise"]
    rows = mix_rows(read_jsonl(source / "sft_revisions.jsonl"), read_jsonl(source / "sft_helpful.jsonl"),
                    cfg.sft.helpful_ratio, cfg.seed)
    if not rows:
        raise CaiError(f"{source / 'sft_revisions.jsonl'}: no training rows")
    write_jsonl(out / "train.jsonl", rows)
    # step 2: tokenise once; an order whose steps give every rank similar lengths
    encoded, too_long = encode_rows(load_tokenizer(model, padding_side="right"), rows, cfg.sft.train.max_length)
    if not encoded:
        raise CaiError(f"{out / 'train.jsonl'}: every row's prompt fills sft.train.max_length="
                       f"{cfg.sft.train.max_length}; raise it")
    write_jsonl(out / "train_ids.jsonl", encoded)
    order, passes = step_order([len(r["input_ids"]) for r in encoded], cfg)
    # step 3: train on Ray Train + DeepSpeed
    shutil.rmtree(out / "model.tmp", ignore_errors=True)
    job = SftJob(train=cfg.sft.train, seed=cfg.seed, base_model=model, data=out / "train_ids.jsonl", order=tuple(order),
                 passes=passes, trainer_dir=out / "trainer", model_tmp=out / "model.tmp",
                 steps_log=out / STEPS, report=Reporting.of(cfg, "sft", out, settings(cfg)))
    summary = {**run_training(train_worker, job, cfg.sft.train, cfg.ray, out, "sft"), "rows": len(encoded),
               "dropped_too_long": too_long, "workers": cfg.sft.train.workers, "zero_stage": cfg.sft.train.zero_stage}
    # step 4: commit the checkpoint, with its card, only once it loads (a LoRA adapter merged into the base first)
    data = [DataFile.of(source, "critique_revise", f) for f in ("sft_revisions.jsonl", "sft_helpful.jsonl")]
    card = model_card(cfg, constitution, "sft", summary, settings(cfg), [*data, DataFile.of(out, "sft", "train.jsonl")],
                      base_model=base_model(cfg), fine_tuned_from=base_model(cfg))
    commit_model(out / "model.tmp", out / "model", card=card, lora_base=model if cfg.sft.train.lora else None)
    shutil.rmtree(out / "ray", ignore_errors=True)
    return summary
