"""PPO's four models on the worker's device: the policy and value DeepSpeed engines, the reference model, and
the sequence score (preference model or reward function); and the forwards PPO runs on them.

Shapes: B responses, P prompt tokens, A response tokens, V vocabulary.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from cai.cluster import Worker
from cai.config import TrainConfig
from cai.jobs import PpoJob
from cai.rl.parked import ParkedWeights


class AdapterOffReference:
    """The reference when the policy trains LoRA adapters: the policy's own frozen base, its adapters switched off
    for the forward (peft's `disable_adapter`), so no second copy of the weights is held. Has InferenceModel's
    interface."""

    own_params = 0  # every tensor it reads is the policy's

    def __init__(self, policy_module):
        self.module = policy_module  # the peft model inside the policy engine

    @contextlib.contextmanager
    def use(self):
        # peft flips the adapters' requires_grad on the way in and out; under ZeRO-3 a weight released inside
        # generation's inference mode holds an inference tensor, whose flag torch lets change only in that mode
        adapters_off = self.module.disable_adapter()
        with torch.inference_mode():
            adapters_off.__enter__()
        try:
            yield self.module
        finally:
            with torch.inference_mode():
                adapters_off.__exit__(None, None, None)

    def delete(self) -> None:
        pass


class InferenceModel:
    """A model used only in inference; parked in a memory-mapped file between uses when `park_at` is given
    (cai/rl/parked.py), so that it is not resident during the update, which is the memory peak."""

    def __init__(self, model: torch.nn.Module, park_at: Path | None = None):
        self.model = model
        self.own_params = sum(p.numel() for p in model.parameters())  # counted before parking empties them
        self.parked = ParkedWeights(model, park_at) if park_at else None

    def use(self):
        return self.parked.loaded() if self.parked else contextlib.nullcontext(self.model)

    def delete(self) -> None:
        if self.parked:
            self.parked.delete()


@dataclass
class PPOModels:
    policy: object            # DeepSpeed engine of the causal LM
    value: object             # DeepSpeed engine of the scalar-head model
    reference: InferenceModel | AdapterOffReference
    score: object             # cai.rl.scoring.PreferenceModelScore or FunctionScore
    tokenizer: object
    inference_dtype: str      # ppo.inference_dtype on this device: of the preference model and the rollout copy


def load_models(job: PpoJob, train: TrainConfig, worker: Worker, optimizer_steps: int) -> PPOModels:
    """Step 0: load every model onto `worker.device`, build the engines (fused AdamW, a schedule over
    `optimizer_steps`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai import lora
    from cai.models import load_tokenizer
    from cai.rl.scoring import FunctionScore, PreferenceModelScore
    from cai.train import recompute
    from cai.train.deepspeed import build_engine

    cfg, dev = job.ppo, worker.device
    tokenizer = load_tokenizer(job.policy, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(job.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(job.value_init, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tokenizer.pad_token_id
    if train.lora:  # adapters on both; the value model's scalar head trains whole
        policy, value = lora.wrap(policy, train.lora, "causal_lm"), lora.wrap(value, train.lora, "reward_model")
    for model in (policy, value):
        recompute.enable(model, train.activation_checkpointing)
    policy_engine = build_engine(policy.to(dev), train, worker.world, optimizer_steps)
    value_engine = build_engine(value.to(dev), train, worker.world, optimizer_steps, learning_rate=cfg.value_lr)
    park = (lambda name: job.out / "parked" / f"{name}-{worker.rank}.pt") if cfg.offload_inference_models \
        else (lambda name: None)
    # the reference matches the policy unless told otherwise (then the KL at step 1 is exactly 0)
    if train.lora:
        reference = AdapterOffReference(policy_engine.module)
    else:
        ref_dtype = getattr(torch, cfg.reference_dtype or ("bfloat16" if train.bf16 else "float32"))
        reference = InferenceModel(AutoModelForCausalLM.from_pretrained(job.policy, dtype=ref_dtype).to(dev).eval(),
                                   park("ref"))
    fast = worker.resolve_dtype(cfg.inference_dtype)
    score = FunctionScore(job.reward_function, cfg, dev) if job.reward_function else \
        PreferenceModelScore(job.reward_model, cfg, fast, job.system_prompt, dev, park("rm"), job.reward_data)
    return PPOModels(policy_engine, value_engine, reference, score, tokenizer, fast)


def response_logits(model, ids: torch.Tensor, attention: torch.Tensor, P: int, temperature: float) -> torch.Tensor:
    """(B, P+A) -> (B, A, V): the logits, divided by the sampling temperature, that predicted each response
    token (the lm_head runs on those positions only: over the prompt its cost would be thrown away)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    A = ids.shape[1] - P
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=A + 1,
                   use_cache=False).logits[:, :-1]
    return logits if temperature == 1.0 else logits / temperature


def response_values(value_model, ids: torch.Tensor, attention: torch.Tensor, P: int) -> torch.Tensor:
    """(B, P+A) -> (B, A): V(s_t) for the state before each response token (scalar head on every position)."""
    from cai.lora import hf_model

    value_model = hf_model(value_model)  # a LoRA model's adapters and trained head stay in place
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = value_model.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                               use_cache=False).last_hidden_state
    return value_model.score(hidden[:, P - 1:-1]).squeeze(-1).float()
