"""Rule-based rewards for `ppo.reward_function` ('cai.rewards:NAME'), in place of the preference model.

Each is called as fn(prompts, responses, response_ids) with the texts and the policy's sampled token
ids (EOS included when produced), and returns one float per response.
`mean_token_id` is synthetic, with a known optimum (always emit the highest token ids): it tells
whether an RL run can climb a reward at all, in tests and benchmarks.
"""
from __future__ import annotations


def brevity(prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """1 for an empty response, falling as 1/(1 + words/20)."""
    return [1.0 / (1.0 + len(r.split()) / 20.0) for r in responses]


def mean_token_id(prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """Mean sampled token id over 50,000, in [0, 1): higher ids score more."""
    return [sum(ids) / len(ids) / 50_000 if ids else 0.0 for ids in response_ids]
