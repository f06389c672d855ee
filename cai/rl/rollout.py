"""What samples PPO's rollouts: a `RolloutGenerator`, chosen by `ppo.rollout_backend`.

Both backends sample from the same weights (`RolloutWeights`): a copy in `ppo.inference_dtype` that `sync`
refreshes after each update (bf16 matmuls are faster on CPUs that have them), or the training weights themselves
(gathered under ZeRO-3). A vLLM engine would be a third backend: the same four methods, with `sync`
shipping the updated weights to it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch

from cai.chat import generation_prompt_ids, user
from cai.config import GenerationConfig, LoraConfig
from cai.generation import ChatGenerator, Completion, end_ids
from cai.rl.parked import drop_weights
from cai.train.deepspeed import gathered


class RolloutGenerator(Protocol):
    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """The policy's chat prompt for each request, as token ids."""

    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[Completion]:
        """One sampled response per prompt, in order."""

    def sync(self) -> None:
        """After an update: sample from the updated policy from now on."""

    def release(self) -> None:
        """Before an update: drop what sampling holds that the update does not need (stale until `sync`)."""


class RolloutWeights:
    """The module rollouts sample from: a copy in `dtype` when that differs from the training dtype (below
    ZeRO-3), else the engine's own module. A LoRA policy's copy carries the same adapters (what `sync` refreshes);
    either way `module` is the transformers model, adapters active."""

    def __init__(self, engine, zero_stage: int, dtype: torch.dtype, path: Path, device: torch.device,
                 lora: LoraConfig | None = None):
        from transformers import AutoModelForCausalLM

        from cai.lora import hf_model, wrap

        self.engine, self.zero_stage = engine, zero_stage
        self.copy = None
        if zero_stage < 3 and dtype != next(engine.module.parameters()).dtype:
            # loaded in the target dtype (a deepcopy would hold a second fp32 copy first)
            copy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            copy = wrap(copy, lora, "causal_lm", adapter_dtype_follows_base=True) if lora else copy
            self.copy = copy.to(device).eval().requires_grad_(False)
        self.module = hf_model(self.copy or engine.module)

    def sampling(self):
        """A block in which `module` holds whole weights (ZeRO-3 gathers them on every rank)."""
        return gathered(self.engine.module, self.zero_stage) if self.copy is None else contextlib.nullcontext()

    def release(self) -> None:
        if self.copy is not None:
            drop_weights(self.copy)

    @torch.no_grad()
    def sync(self) -> None:
        # parameters() lists tied weights once, in the same order on both (peft wraps both alike)
        if self.copy is not None:
            for dst, src in zip(self.copy.parameters(), self.engine.module.parameters()):
                dst.data = src.detach().to(dst.dtype, copy=True)


class CaiRollouts:
    """Our generator (cai/generation.py): finished rows leave the batch, preallocated KV cache."""

    def __init__(self, weights: RolloutWeights, tokenizer, generation: GenerationConfig, system_prompt: str | None,
                 max_prompt_tokens: int, device: torch.device):
        self.weights, self.generation, self.max_prompt = weights, generation, max_prompt_tokens
        self.chat = ChatGenerator(weights.module, tokenizer, system_prompt, device)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [self.chat.chat_ids([user(p)], self.max_prompt) for p in prompts]

    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[Completion]:
        with self.weights.sampling():
            return self.chat.generate_ids(prompt_ids, self.generation, seed)

    def sync(self) -> None:
        self.weights.sync()

    def release(self) -> None:
        self.weights.release()


class HfRollouts:
    """transformers' `generate`, for models our generator does not cover; seeded through torch's global RNG."""

    def __init__(self, weights: RolloutWeights, tokenizer, generation: GenerationConfig, system_prompt: str | None,
                 max_prompt_tokens: int, device: torch.device):
        self.weights, self.tokenizer, self.generation = weights, tokenizer, generation
        self.system_prompt, self.max_prompt, self.device = system_prompt, max_prompt_tokens, device
        self.end_ids = end_ids(weights.module, tokenizer)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return [generation_prompt_ids(self.tokenizer, [user(p)], self.system_prompt, self.max_prompt) for p in prompts]

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[Completion]:
        from cai.generation import left_pad

        from transformers import GenerationConfig as HfGenerationConfig

        g, out = self.generation, []
        # exactly softmax(logits / T): no top-k, repetition penalty or other defaults from the model's files
        sampling = HfGenerationConfig(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0,
                                      max_new_tokens=g.max_new_tokens, eos_token_id=sorted(self.end_ids),
                                      pad_token_id=self.tokenizer.pad_token_id)
        torch.manual_seed(seed)
        with self.weights.sampling():
            for start in range(0, len(prompt_ids), g.batch_size):
                rows = prompt_ids[start:start + g.batch_size]
                ids, mask = left_pad(rows, self.tokenizer.pad_token_id, self.device)
                new = self.weights.module.generate(input_ids=ids, attention_mask=mask, generation_config=sampling
                                                   )[:, ids.shape[1]:].tolist()
                out += [self._completion(len(r), tokens) for r, tokens in zip(rows, new)]
        return out

    def _completion(self, prompt_tokens: int, tokens: list[int]) -> Completion:
        end = next((i for i, t in enumerate(tokens) if t in self.end_ids), None)
        kept = tokens if end is None else tokens[:end + 1]
        text = self.tokenizer.decode(kept if end is None else kept[:-1], skip_special_tokens=True).strip()
        return Completion(text, prompt_tokens, len(kept), end is not None, tuple(kept))

    def sync(self) -> None:
        self.weights.sync()

    def release(self) -> None:
        self.weights.release()


def rollout_generator(backend: str, weights: RolloutWeights, tokenizer, generation: GenerationConfig,
                      system_prompt: str | None, max_prompt_tokens: int, device: torch.device) -> RolloutGenerator:
    kind = {"cai": CaiRollouts, "hf": HfRollouts}[backend]
    return kind(weights, tokenizer, generation, system_prompt, max_prompt_tokens, device)
