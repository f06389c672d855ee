"""PPO for language models: the maths, as pure torch functions.

Shapes: B responses, A response tokens; `mask` (B, A) is 1 on real response tokens (through EOS).
Sources: PPO, Schulman et al. 2017 (arXiv 1707.06347) eq. 7 (clipped surrogate) and eq. 9 (value and
entropy terms); GAE, Schulman et al. 2016 (arXiv 1506.02438) eq. 16; per-token KL penalty and the
adaptive KL controller, Ziegler et al. 2019 (arXiv 1909.08593) §2.2; KL estimators k1/k3, Schulman,
"Approximating KL divergence" (2020).
"""
from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked entries; with shift_mean=False the mean is kept (for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out + mean if not shift_mean else out) * mask


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π. (B, A) -> (B, A).

    k1 = log π - log π_ref (unbiased, can be negative); k3 = (r - 1) - log r with r = π_ref / π
    (unbiased, always >= 0, lower variance).
    """
    if kind == "k1":
        return logp - logp_ref
    if kind == "k3":
        log_r = logp_ref - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} (k1 or k3)")


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -β·KL_t on every response token, plus the sequence score on its last real token.

    score (B,), kl (B, A), mask (B, A) -> (B, A). Ziegler et al. 2019, eq. 2.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rewards[torch.arange(len(score), device=score.device), last] += score * (mask.sum(-1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation, eq. 16 of Schulman et al. 2016. -> (advantages, returns), (B, A).

    δ_t = r_t + γ V_{t+1} - V_t;  A_t = δ_t + γλ A_{t+1};  V after the last real token is 0.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m
        next_value = values[:, t] * m + next_value * (1 - m)  # padding keeps the next real value
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate, eq. 7 of Schulman et al. 2017 (as a loss: its negative). -> (loss, stats)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, {"clip_frac": clip_frac.item(), "approx_kl": approx_kl.item()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: ½·max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±clip)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        frac = masked_mean(((v_clipped - returns) ** 2 > (values - returns) ** 2).float(), mask)
    return loss, {"value_clip_frac": frac.item()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, A, V) -> (B, A) entropy of the softmax, in nats."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, A, V) logits, (B, A) tokens -> (B, A) log-probabilities of the tokens."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class FixedKL:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL:
    """Ziegler et al. 2019, §2.2: β ← β·(1 + K_β·e), e = clip(KL/KL_target - 1, ±0.2), K_β = n/horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
