"""What a training stage's driver hands its Ray Train workers: one frozen job per stage, built and checked in
the driver, so a worker reads named fields and never spells a key the driver also spells."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cai.config import PpoConfig, TrainConfig
from cai.metrics_log import Reporting

# fn(prompts, responses, response_ids) -> one float per response (see cai/rewards.py)
RewardFunction = Callable[[list[str], list[str], list[list[int]]], list[float]]


@dataclass(frozen=True)
class SftJob:
    train: TrainConfig
    seed: int
    base_model: Path
    data: Path              # jsonl of {input_ids, completion_mask}, tokenised once by the driver
    order: tuple[int, ...]  # row order for all passes, read in sequence by the trainer
    passes: int             # epochs held in `order`
    trainer_dir: Path       # HF checkpoints, resumed from
    model_tmp: Path         # the trained model, committed by the driver
    steps_log: Path         # rank 0's step records, followed by the driver
    report: Reporting       # rank 0's TensorBoard / W&B / trackio logs


@dataclass(frozen=True)
class DpoJob:
    train: TrainConfig
    seed: int
    beta: float
    base_model: Path
    data: Path              # jsonl of trl preference rows (prompt, chosen, rejected)
    trainer_dir: Path
    model_tmp: Path
    steps_log: Path
    report: Reporting


@dataclass(frozen=True)
class RewardModelJob:
    train: TrainConfig
    seed: int
    base_model: Path
    train_data: Path        # jsonl of encoded pairs {chosen, rejected, p}
    eval_data: Path
    group_by_length: bool
    checkpoint_dir: Path    # DeepSpeed checkpoints, resumed from
    model_tmp: Path         # the model and its card (cai/preference_model.py), committed by the driver
    steps_log: Path
    report: Reporting


@dataclass(frozen=True)
class PpoJob:
    ppo: PpoConfig
    seed: int
    out: Path
    policy: Path            # the SFT model: policy, reference and rollout copy
    value_init: Path        # the value model's start
    reward_model: Path | None           # None when `reward_function` scores instead
    reward_data: tuple[Path, ...]       # its encoded pairs (held-out first), to measure statistics in another dtype
    reward_function: RewardFunction | None
    prompts: tuple[str, ...]
    max_prompt_tokens: int
    system_prompt: str | None
    report: Reporting
