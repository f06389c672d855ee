"""Stage `sft`: the SL-CAI model, fine-tuned on the revisions plus helpfulness samples (§3.1).

Steps:
  1. mix the data: every revision row from critique_revise, plus `helpful_ratio` helpfulness rows per
     revision row (seeded choice), shuffled; trl conversational prompt/completion rows, so the loss
     falls on the completion only;
  2. train with trl's SFTTrainer on DeepSpeed (ZeRO stage from config) inside Ray Train workers, the
     rows in our order (grouped by length, each step's rows dealt evenly across ranks); trainer
     checkpoints go to trainer/, and a rerun resumes from the last one;
  3. save an HF checkpoint (ZeRO-3 weights gathered) to model.tmp/, check it loads, rename to model/.
On 8 GPUs: `cai run pipelines/x.yaml sft.train.workers=8 sft.train.gpus_per_worker=1 sft.train.bf16=true`.
"""
from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

from cai.config import PipelineConfig, TrainConfig
from cai.constitution import Constitution
from cai.errors import CaiError
from cai.shards import read_jsonl, write_jsonl


def base_model(cfg: PipelineConfig) -> str:
    return cfg.sft.base_model or cfg.policy.name


def cache_inputs(cfg: PipelineConfig, constitution: Constitution) -> dict:
    return {"sft": cfg.sft.model_dump(mode="json"), "base_model": base_model(cfg), "seed": cfg.seed}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    return {}


def mix_rows(revisions: list[dict], helpful: list[dict], ratio: float, seed: int) -> list[dict]:
    """All revision rows plus round(ratio * len(revisions)) helpfulness rows, shuffled with `seed`."""
    rng = random.Random(f"{seed}|sft-mix")
    take = min(len(helpful), round(ratio * len(revisions)))
    rows = revisions + rng.sample(helpful, take)
    rng.shuffle(rows)
    return rows


def step_order(rows: list[dict], cfg: PipelineConfig, model: str) -> tuple[list[int], int]:
    """Row order for the trainer (read in sequence; cai/batching.py deals each step's rows across ranks,
    grouped by token length when `sft.group_by_length`) -> (order, passes over the data it holds)."""
    from cai.batching import dealt_order
    from cai.models import load_tokenizer

    tok = load_tokenizer(model)
    lengths = [len(tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    train, passes = cfg.sft.train, math.ceil(cfg.sft.train.epochs)
    return dealt_order(lengths, train.batch_size, train.workers, train.grad_accum, f"{cfg.seed}|sft",
                       cfg.sft.group_by_length, passes), passes


def train_worker(config: dict) -> dict:
    """Runs on every Ray Train worker (one DeepSpeed rank each)."""
    import torch
    from trl import SFTConfig, SFTTrainer

    from cai.distributed import peak_rss_gb, train_hf, trainer_args, world

    train = TrainConfig(**config["train"])
    rank, _ = world()
    torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    trainer_dir = config["trainer_dir"]
    # the data holds `passes` epochs in our order (one shuffle per epoch), read once in sequence
    per_pass = train.model_copy(update={"epochs": train.epochs / config["passes"]})
    args = trainer_args(SFTConfig, "sft", per_pass, trainer_dir, config["seed"], rank,
                        include_num_input_tokens_seen="non_padding", train_sampling_strategy="sequential")
    trainer, result, last = train_hf(SFTTrainer, args, config, "right", rank, train)
    metrics = result.metrics
    return {"train_loss": round(result.training_loss, 4), "steps": result.global_step,
            "resumed_from": last, "runtime_s": round(metrics["train_runtime"], 1),
            "tokens": int(trainer.state.num_input_tokens_seen), "peak_rss_gb": peak_rss_gb()}


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    from cai.distributed import run_training
    from cai.models import load_causal_lm, resolve_model

    # step 1: the data mix
    source = inputs["critique_revise"]
    rows = mix_rows(read_jsonl(source / "sft_revisions.jsonl"), read_jsonl(source / "sft_helpful.jsonl"),
                    cfg.sft.helpful_ratio, cfg.seed)
    if not rows:
        raise CaiError(f"{source / 'sft_revisions.jsonl'}: no training rows")
    if not (out / "train.jsonl").exists():  # a resumed run must see the very same data
        write_jsonl(out / "train.jsonl", rows)
    # step 2: train on Ray Train + DeepSpeed, in an order whose steps give every rank similar lengths
    model = str(resolve_model(base_model(cfg)))
    order, passes = step_order(rows, cfg, model)
    model_tmp = out / "model.tmp"
    shutil.rmtree(model_tmp, ignore_errors=True)
    config = {"train": cfg.sft.train.model_dump(), "base_model": model, "data": str(out / "train.jsonl"),
              "order": order, "passes": passes, "trainer_dir": str(out / "trainer"), "model_tmp": str(model_tmp),
              "seed": cfg.seed}
    summary = run_training(train_worker, config, cfg.sft.train, cfg.ray, out / "ray", "sft")
    # step 3: commit the checkpoint only once it loads
    if not (model_tmp / "config.json").exists() or not list(model_tmp.glob("*.safetensors")):
        raise CaiError(f"sft: training ended without a saved model in {model_tmp}")
    load_causal_lm(model_tmp)
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(model_tmp, out / "model")
    shutil.rmtree(out / "ray", ignore_errors=True)
    return {**summary, "rows": len(rows), "workers": cfg.sft.train.workers, "zero_stage": cfg.sft.train.zero_stage}
