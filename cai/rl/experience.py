"""PPO experience: what one rollout measured, and step 4 (rewards, GAE, advantages) on top of it. Pure torch.

Shapes: B responses, P prompt tokens (left-padded), A response tokens (right-padded).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cai.config import PpoConfig
from cai.rl.math import gae, kl_estimate, token_rewards, whiten


@dataclass(frozen=True)
class Minibatch:
    """Rows of an experience for one gradient step."""
    ids: torch.Tensor          # (b, P+A)
    attention: torch.Tensor    # (b, P+A)
    mask: torch.Tensor         # (b, A)
    logp: torch.Tensor         # (b, A) log π_old(a_t | s_t)
    values: torch.Tensor       # (b, A) V_old(s_t)
    advantages: torch.Tensor   # (b, A)
    returns: torch.Tensor      # (b, A)


@dataclass
class Experience:
    ids: torch.Tensor          # (B, P+A) prompt then response tokens
    attention: torch.Tensor    # (B, P+A) 1 on real tokens
    prompt_len: int            # P
    mask: torch.Tensor         # (B, A) 1 on response tokens through EOS
    ref_logp: torch.Tensor     # (B, A) log π_ref(a_t | s_t)
    raw_score: torch.Tensor    # (B,) the preference model's (or reward function's) output
    score: torch.Tensor        # (B,) normalised and clipped, EOS penalty included
    finished: torch.Tensor     # (B,) 1 when the response ended with an end id
    prompts: list[str]
    texts: list[str]
    # None until known: the rollout measures them, or the update's first forward gives them (fused update)
    logp: torch.Tensor | None = None        # (B, A) log π_old(a_t | s_t)
    values: torch.Tensor | None = None      # (B, A) V_old(s_t)
    # step 4, by `finish`
    kl: torch.Tensor | None = None          # (B, A) per-token KL(π_old || π_ref) estimate
    advantages: torch.Tensor | None = None  # (B, A)
    returns: torch.Tensor | None = None     # (B, A)

    def finish(self, cfg: PpoConfig, kl_coef: float) -> None:
        """Step 4: per-token rewards (score on the last token, KL penalty on all), GAE, whitening."""
        assert self.logp is not None and self.values is not None, "the old log-probs and values come first"
        self.kl = kl_estimate(self.logp, self.ref_logp, cfg.kl.estimator) * self.mask
        rewards = token_rewards(self.score, self.kl, self.mask, kl_coef)
        advantages, self.returns = gae(rewards, self.values, self.mask, cfg.gamma, cfg.lam)
        self.advantages = whiten(advantages, self.mask) if cfg.whiten_advantages else advantages

    def rows(self, idx: torch.Tensor) -> Minibatch:
        return Minibatch(self.ids[idx], self.attention[idx], self.mask[idx], self.logp[idx], self.values[idx],
                         self.advantages[idx], self.returns[idx])


def pack(prompts: list[list[int]], responses: list[tuple[int, ...]], pad_id: int, device: torch.device):
    """-> ids (B, P+A), attention (B, P+A), response mask (B, A), P. Prompts left-, responses right-padded."""
    P, A = max(map(len, prompts)), max(1, max(map(len, responses)))
    rows = [[pad_id] * (P - len(p)) + list(p) + list(r) + [pad_id] * (A - len(r)) for p, r in zip(prompts, responses)]
    real = [[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (A - len(r)) for p, r in zip(prompts, responses)]
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    attention = torch.tensor(real, dtype=torch.long, device=device)
    return ids, attention, attention[:, P:].float(), P
