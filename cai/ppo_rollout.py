"""PPO experience: generation, log-probs, values and scores for one batch.

Shapes: B responses, P prompt tokens (left-padded), A response tokens (right-padded), V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.config import GenerationConfig, PpoConfig
from cai.ppo_math import gae, kl_estimate, logprobs_of, token_rewards, whiten


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


class PolicyRolloutGenerator:
    """Samples with the training policy's own weights (gathered first under ZeRO-3).

    The seam for a vLLM engine: an object with the same `generate` and a `sync(policy)` that
    receives the updated weights after each PPO update.
    """

    def __init__(self, engine, tokenizer, zero_stage: int):
        from cai.generation import ChatGenerator

        self.engine, self.zero_stage = engine, zero_stage
        self.generator = ChatGenerator(engine.module, tokenizer)

    def sync(self, policy) -> None:
        """In-process: the generator reads the live weights, nothing to copy."""

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
    """(B, P+A) -> (B, A, V): the logits that predicted each response token."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, P - 1:-1]


def response_values(value_model, ids: torch.Tensor, attention: torch.Tensor, P: int) -> torch.Tensor:
    """(B, P+A) -> (B, A): V(s_t) for the state before each response token (scalar head on every position)."""
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = value_model.model(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
    return value_model.score(hidden[:, P - 1:-1]).squeeze(-1).float()


def finish_rollout(cfg: PpoConfig, kl_coef: float, ids, attention, P, mask, logp, ref_logp, values, raw_score,
                   score, finished, prompts, texts) -> Rollout:
    """Step 4 of PPO: per-token rewards (score on the last token, KL penalty on all), GAE, whitening."""
    kl = kl_estimate(logp, ref_logp, cfg.kl.estimator) * mask
    rewards = token_rewards(score, kl, mask, kl_coef)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Rollout(ids=ids, attention=attention, prompt_len=P, mask=mask, logp=logp, values=values,
                   advantages=advantages, returns=returns, score=score, raw_score=raw_score, kl=kl,
                   finished=finished, prompts=prompts, texts=texts)


def normalised_score(raw: torch.Tensor, finished: torch.Tensor, stats: dict, cfg: PpoConfig) -> torch.Tensor:
    """(raw - mean) / std from the preference model's saved stats, clipped; a penalty without EOS."""
    score = ((raw - stats["mean"]) / max(stats["std"], 1e-6)).clamp(-cfg.reward_clip, cfg.reward_clip)
    return score + cfg.missing_eos_penalty * (1 - finished)
