"""How the preference model reads a conversation, and the card saved beside it, so that PPO scores exactly what
the reward_model stage trained on: the same chat rendering (an unfinished response keeps its last turn open),
the same truncation (the end kept: the score is read at the last token), and normalisation statistics
measured in the dtype PPO runs the model in."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cai.chat import chat_ids
from cai.errors import CaiError

CARD = "reward_stats.json"


def encode(tokenizer, messages: list[dict], finished: bool, max_length: int) -> list[int]:
    """A conversation ending in the scored response -> the ids the model reads (the last `max_length`)."""
    return chat_ids(tokenizer, messages, open_last=not finished)[-max_length:]


@dataclass(frozen=True)
class PreferenceModelCard:
    max_length: int                  # tokens kept from the end of each conversation
    mean: float                      # of its scores on its data, in float32 (for reading by eye)
    std: float
    by_dtype: dict[str, list[float]]  # dtype name -> [mean, std] of the scores with the weights in that dtype

    def save(self, folder: Path) -> None:
        Path(folder, CARD).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> PreferenceModelCard:
        path = Path(folder, CARD)
        try:
            return cls(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError) as e:
            raise CaiError(f"{path}: not a preference model card ({type(e).__name__}); rerun the reward_model stage"
                           ) from None

    def normalise(self, raw, dtype: str):
        """(raw - mean) / std with the statistics of the dtype the scores were computed in."""
        if dtype not in self.by_dtype:
            raise CaiError(f"preference model card: no statistics for {dtype} (has {', '.join(self.by_dtype)})")
        mean, std = self.by_dtype[dtype]
        return (raw - mean) / max(std, 1e-6)
