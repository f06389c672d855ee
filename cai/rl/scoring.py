"""PPO's sequence score (step 3): the preference model read exactly as the reward_model stage trained it, or a
user's reward function; either way normalised, clipped and with the missing-EOS penalty.

Shapes: B responses.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cai.chat import assistant, conversation
from cai.config import PpoConfig
from cai.jobs import RewardFunction
from cai.rl.models import InferenceModel


class PreferenceModelScore:
    """The preference model in `dtype` (ppo.inference_dtype) on the worker's device; scores normalised with
    statistics measured in that dtype (the card's, or measured here on the stage's own pairs when it was trained
    in another) and clipped to ±reward_clip."""

    def __init__(self, path: Path, cfg: PpoConfig, dtype: str, system_prompt: str | None, device: torch.device,
                 park_at: Path | None, data: tuple[Path, ...]):
        from transformers import AutoModelForSequenceClassification

        from cai.models import load_tokenizer
        from cai.preference_model import PreferenceModelCard

        self.cfg, self.system_prompt, self.device = cfg, system_prompt, device
        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.card = PreferenceModelCard.load(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model = model.to(device).eval()
        self.stats = (self.card.mean, self.card.std) if dtype == self.card.dtype else self.measure(model, data)
        self.model = InferenceModel(model, park_at)

    def measure(self, model, data: tuple[Path, ...]) -> tuple[float, float]:
        """(mean, std) of the model's scores on the reward_model stage's pairs, in this model's dtype."""
        from cai.preference_model import STATS_PAIRS, mean_std, score_pairs
        from cai.shards import read_jsonl

        rows = [row for path in data for row in read_jsonl(path)][:STATS_PAIRS]
        chosen, rejected = score_pairs(model, rows, self.tokenizer.pad_token_id, 16, self.device)
        return mean_std(chosen + rejected)

    def __call__(self, prompts: list[str], texts: list[str], response_ids: list[list[int]],
                 finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (raw score (B,), score for the reward (B,))."""
        from cai.preference_model import rewards, right_pad

        ids, mask = right_pad(self.encode(prompts, texts, [bool(f) for f in finished.tolist()]),
                              self.tokenizer.pad_token_id, self.device)
        with self.model.use() as model:
            raw = rewards(model, ids, mask)
        mean, std = self.stats
        score = ((raw - mean) / max(std, 1e-6)).clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        return raw, score + self.cfg.missing_eos_penalty * (1 - finished)

    def encode(self, prompts: list[str], texts: list[str], finished: list[bool]) -> list[list[int]]:
        """The ids the model reads, as the reward_model stage encoded its pairs: the text is re-tokenised with
        the model's own chat template, so a preference model with another tokenizer reads the same conversation."""
        from cai.preference_model import encode

        return [encode(self.tokenizer, conversation(p, self.system_prompt) + [assistant(t)], f, self.card.max_length)
                for p, t, f in zip(prompts, texts, finished)]

    def delete(self) -> None:
        self.model.delete()


class FunctionScore:
    """A rule-based reward `fn(prompts, responses, response_ids)`, used as is (plus the missing-EOS penalty)."""

    def __init__(self, fn: RewardFunction, cfg: PpoConfig, device: torch.device):
        self.fn, self.cfg, self.device = fn, cfg, device

    def __call__(self, prompts: list[str], texts: list[str], response_ids: list[list[int]],
                 finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = torch.tensor(self.fn(prompts, texts, response_ids), dtype=torch.float32, device=self.device)
        return raw, raw + self.cfg.missing_eos_penalty * (1 - finished)

    def delete(self) -> None:
        pass
