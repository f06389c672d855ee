"""Rule-based rewards for `ppo.reward_function` and `evaluate.reward_function` ('cai.rewards:NAME'), in place of
the preference model, and the loader of any user-named function ('module:function').

Each is called as fn(prompts, responses, response_ids) with the texts and the policy's token ids (sampled ids
with EOS when produced in PPO; the answer re-tokenised in evaluation), and returns one float per response.
`mean_token_id` is synthetic, with a known optimum (always emit the highest token ids): it tells
whether an RL run can climb a reward at all, in tests and benchmarks.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from cai.errors import CaiError


def load_function(spec: str, key: str, params: tuple[str, ...]) -> Callable:
    """'module:function' -> the function, checked to take `params`; one line naming `key` if not."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise CaiError(f"{key} '{spec}': expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise CaiError(f"{key} '{spec}': cannot import {module_name} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CaiError(f"{key} '{spec}': {module_name} has no function '{name}'")
    try:
        inspect.signature(fn).bind(*([[]] * len(params)))
    except (TypeError, ValueError):
        raise CaiError(f"{key} '{spec}': must take ({', '.join(params)})") from None
    return fn


def brevity(prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """1 for an empty response, falling as 1/(1 + words/20)."""
    return [1.0 / (1.0 + len(r.split()) / 20.0) for r in responses]


def mean_token_id(prompts: list[str], responses: list[str], response_ids: list[list[int]]) -> list[float]:
    """Mean sampled token id over 50,000, in [0, 1): higher ids score more."""
    return [sum(ids) / len(ids) / 50_000 if ids else 0.0 for ids in response_ids]
