"""The HF Trainer stages (SFT, DPO): trl training arguments from our typed fields, DeepSpeed on, resumable
from the last complete HF checkpoint, the model saved for the driver to commit."""
from __future__ import annotations

import shutil
from pathlib import Path

from cai.cluster import Worker
from cai.config import TrainConfig
from cai.metrics_log import Reporting
from cai.train.deepspeed import deepspeed_config, lean_allreduce


def trainer_args(config_cls, train: TrainConfig, output_dir: Path, seed: int, worker: Worker, **extra):
    """HF/trl training arguments from our typed fields, DeepSpeed on, checkpoints every save_steps.

    use_cpu=True on CPU: without it every rank believes world_size=1 under DeepSpeed."""
    # HF's "constant" ignores warmup; ours warms up for `warmup_steps` whatever the schedule
    schedule = "constant_with_warmup" if train.lr_scheduler == "constant" and train.warmup_steps else train.lr_scheduler
    return config_cls(
        output_dir=str(output_dir), per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, learning_rate=train.learning_rate,
        lr_scheduler_type=schedule, warmup_steps=train.warmup_steps, num_train_epochs=train.epochs,
        max_steps=train.max_steps, max_grad_norm=train.max_grad_norm, max_length=train.max_length,
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=2, logging_steps=1, report_to="none",
        use_cpu=not worker.on_gpu, bf16=train.bf16,
        activation_checkpointing=train.activation_checkpointing > 0,
        activation_checkpointing_kwargs={"every_n_layers": train.activation_checkpointing}
        if train.activation_checkpointing > 1 else None,
        deepspeed=deepspeed_config(train), seed=seed, dataloader_pin_memory=False, disable_tqdm=worker.rank != 0,
        **extra)


def last_complete_checkpoint(folder: Path, rank: int = 0) -> Path | None:
    """The newest HF checkpoint-N that was fully written. HF writes a checkpoint in pieces and
    trainer_state.json last, so a kill mid-save leaves a folder without it: such folders are moved
    out of the way (resume would crash on them) and the previous checkpoint is used."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in found if (p / "trainer_state.json").exists()]
    for partial in (p for p in found if p not in complete):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
    return complete[-1] if complete else None


def train_hf(trainer_cls, args, rows: list[dict], base_model: Path, padding_side: str, model_tmp: Path,
             steps_log: Path, worker: Worker, train: TrainConfig, report: Reporting, epoch_scale: float = 1.0):
    """Build an HF/trl trainer on the base model and `rows` (read in this order when the trainer reads in
    sequence), train (resuming from its last checkpoint in args.output_dir), save to `model_tmp` (with
    `train.lora`: the adapter, which trl trains on the frozen base; DPO's reference is that base with the
    adapter off). Rank 0 writes the step records and the logs (`report`) from the trainer's log records; their
    epoch is the trainer's times `epoch_scale` (rows holding several passes over the data are one pass to the
    trainer). -> (trainer, train output or None when stopped for a stop request, the checkpoint resumed from)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    from cai import stopping
    from cai.metrics_log import Reporter, metric_names
    from cai.lora import peft_config
    from cai.models import load_tokenizer
    from cai.progress import StepLog

    class LeanTraining(TrainerCallback):
        stopped = False  # for a stop request, after a checkpoint

        def on_train_begin(self, args, state, control, **kw):
            lean_allreduce(trainer.model_wrapped, train)

        def on_log(self, args, state, control, logs=None, **kw):
            if steps and logs and "loss" in logs:
                steps.write(state.global_step, state.max_steps, **{k: logs[k] for k in (
                    "loss", "learning_rate", "grad_norm") if k in logs})
            if reporter and logs:
                epoch = {"epoch": logs["epoch"] * epoch_scale} if "epoch" in logs else {}
                reporter.log(metric_names({**logs, **epoch}), state.global_step)

        def on_step_end(self, args, state, control, **kw):
            self.stopped = stopping.agreed(worker.device)  # every rank, every step: a collective
            # HF saves a full checkpoint (weights + optimizer) after the last step; the model is
            # saved next anyway, and a finished run is never resumed
            if state.global_step >= state.max_steps:
                control.should_save, self.stopped = False, False
            elif self.stopped:  # preemption: a checkpoint now, then out
                control.should_save, control.should_training_stop = True, True

    tokenizer = load_tokenizer(base_model, padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    adapters = {"peft_config": peft_config(train.lora, "causal_lm")} if train.lora else {}
    trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[callback := LeanTraining()], **adapters)
    last = last_complete_checkpoint(Path(args.output_dir), worker.rank)
    steps = StepLog(steps_log, int(last.name.split("-")[-1]) if last else 0) if worker.rank == 0 else None
    reporter = Reporter(report) if worker.rank == 0 else None
    try:
        result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    finally:
        if reporter:
            reporter.close()
    if callback.stopped:
        return trainer, None, (last.name if last else None)
    trainer.save_model(str(model_tmp))  # every rank: ZeRO-3 gathers the shards collectively
    if worker.rank == 0:
        tokenizer.save_pretrained(model_tmp)
    return trainer, result, (last.name if last else None)
