"""PPO experience: generation, log-probs, values and scores for one batch.

Shapes: B responses, P prompt tokens (left-padded), A response tokens (right-padded), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.config import GenerationConfig, PpoConfig
from cai.parked import drop_weights
from cai.ppo_math import gae, kl_estimate, token_rewards, whiten


@dataclass
class Rollout:
    ids: torch.Tensor          # (B, P+A) prompt then response tokens
    attention: torch.Tensor    # (B, P+A) 1 on real tokens
    prompt_len: int            # P
    mask: torch.Tensor         # (B, A) 1 on response tokens through EOS
    logp: torch.Tensor         # (B, A) log π_old(a_t | s_t)
    values: torch.Tensor       # (B, A) V_old(s_t)
    advantages: torch.Tensor   # (B, A)
    returns: torch.Tensor      # (B, A)
    score: torch.Tensor        # (B,) normalised preference score, EOS penalty included
    raw_score: torch.Tensor    # (B,) preference-model output before normalisation
    kl: torch.Tensor           # (B, A) per-token KL(π_old || π_ref) estimate
    finished: torch.Tensor     # (B,) 1 when the response ended with EOS
    prompts: list[str]
    texts: list[str]

    def rows(self, idx: torch.Tensor) -> dict:
        return {k: getattr(self, k)[idx] for k in ("ids", "attention", "mask", "logp", "values", "advantages",
                                                   "returns")}


@dataclass
class ScoredSamples:
    """Steps 2-3 of PPO: the samples, their reference log-probs, values and scores. `finish` adds the
    policy's own log-probs (from the rollout, or from the fused update's forward) and does step 4."""
    ids: torch.Tensor          # (B, P+A)
    attention: torch.Tensor    # (B, P+A)
    prompt_len: int            # P
    mask: torch.Tensor         # (B, A)
    ref_logp: torch.Tensor     # (B, A) log π_ref(a_t | s_t)
    values: torch.Tensor | None  # (B, A) V_old(s_t); None until the update's value forward gives it
    raw_score: torch.Tensor    # (B,)
    score: torch.Tensor        # (B,)
    finished: torch.Tensor     # (B,)
    prompts: list[str]
    texts: list[str]

    def finish(self, cfg: PpoConfig, kl_coef: float, logp: torch.Tensor) -> Rollout:
        """Step 4: per-token rewards (score on the last token, KL penalty on all), GAE, whitening."""
        kl = kl_estimate(logp, self.ref_logp, cfg.kl.estimator) * self.mask
        rewards = token_rewards(self.score, kl, self.mask, kl_coef)
        advantages, returns = gae(rewards, self.values, self.mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, self.mask)
        return Rollout(ids=self.ids, attention=self.attention, prompt_len=self.prompt_len, mask=self.mask, logp=logp,
                       values=self.values, advantages=advantages, returns=returns, score=self.score,
                       raw_score=self.raw_score, kl=kl, finished=self.finished, prompts=self.prompts, texts=self.texts)


class PolicyRolloutGenerator:
    """Samples responses from the current policy.

    With `dtype` below the training dtype (bf16 on CPU: 2-3x faster matmuls) it samples from a copy
    that `sync` refreshes after every update; log-probs for the PPO ratio still come from the
    training weights. Under ZeRO-3 it gathers the sharded weights instead. This is the seam for a
    vLLM engine: the same `generate`, and a `sync` that ships the updated weights to it.
    """

    def __init__(self, engine, tokenizer, zero_stage: int, dtype: torch.dtype, path: str):
        from transformers import AutoModelForCausalLM

        from cai.generation import ChatGenerator

        self.engine, self.zero_stage = engine, zero_stage
        train_dtype = next(engine.module.parameters()).dtype
        self.copy = None
        if zero_stage < 3 and dtype != train_dtype:
            # loaded in the target dtype (a deepcopy would hold a second fp32 copy first)
            self.copy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)
        self.generator = ChatGenerator(self.copy or engine.module, tokenizer)

    def release(self) -> None:
        """Free the copy's weights while the policy trains (they are stale then, and the update is the
        memory peak); `sync` brings them back from the updated policy."""
        if self.copy is not None:
            drop_weights(self.copy)

    @torch.no_grad()
    def sync(self, policy) -> None:
        if self.copy is not None:  # parameters() lists tied weights once, in the same order on both
            for dst, src in zip(self.copy.parameters(), policy.module.parameters()):
                dst.data = src.detach().to(dst.dtype, copy=True)

    def generate(self, prompt_ids: list[list[int]], cfg: GenerationConfig, seed: int):
        import contextlib

        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())) \
            if self.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            return self.generator.generate_ids(prompt_ids, cfg, seed)


def pack(prompts: list[list[int]], responses: list[tuple[int, ...]], pad_id: int):
    """-> ids (B, P+A), attention (B, P+A), response mask (B, A), P. Prompts left-, responses right-padded."""
    P, A = max(map(len, prompts)), max(1, max(map(len, responses)))
    ids = torch.full((len(prompts), P + A), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, P:P + len(r)] = 1
    return ids, attention, attention[:, P:].clone().float(), P


def response_logits(model, ids: torch.Tensor, attention: torch.Tensor, P: int) -> torch.Tensor:
    """(B, P+A) -> (B, A, V): the logits that predicted each response token (the lm_head runs on those
    positions only: over the prompt it would be a fifth of the forward's cost, thrown away)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    A = ids.shape[1] - P
    return model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=A + 1,
                 use_cache=False).logits[:, :-1]


def response_values(value_model, ids: torch.Tensor, attention: torch.Tensor, P: int) -> torch.Tensor:
    """(B, P+A) -> (B, A): V(s_t) for the state before each response token (scalar head on every position)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = value_model.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                               use_cache=False).last_hidden_state
    return value_model.score(hidden[:, P - 1:-1]).squeeze(-1).float()


def normalised_score(raw: torch.Tensor, finished: torch.Tensor, stats: dict, cfg: PpoConfig) -> torch.Tensor:
    """(raw - mean) / std from the preference model's saved stats, clipped; a penalty without EOS."""
    score = ((raw - stats["mean"]) / max(stats["std"], 1e-6)).clamp(-cfg.reward_clip, cfg.reward_clip)
    return score + cfg.missing_eos_penalty * (1 - finished)
