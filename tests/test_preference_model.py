"""PPO scores with the preference model exactly what the reward_model stage trained it on."""
from __future__ import annotations

import pytest
import torch

from cai.config import PpoConfig
from cai.preference_model import PreferenceModelCard, mean_std, score_pairs
from cai.rl.scoring import PreferenceModelScore
from cai.shards import write_jsonl
from cai.stages.preferences import preference_row
from cai.stages.reward_model import encode_pairs

PAIR = {"id": "x", "prompt": "How do I stay safe online?", "aspect": "harmless", "p_r1": 0.8,
        "r1": "Use long passwords and a password manager for every account you have.", "r2": "No.",
        "r1_finished": False, "r2_finished": True}


@pytest.fixture(scope="module")
def reward_model_folder(tiny_model, tmp_path_factory):
    """A preference model as the reward_model stage leaves it: the model, its card, and its encoded pairs."""
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_tokenizer

    folder = tmp_path_factory.mktemp("rm") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = 0
    model.save_pretrained(folder)
    tok = load_tokenizer(tiny_model)
    tok.save_pretrained(folder)
    PreferenceModelCard(max_length=24, dtype="float32", mean=0.5, std=2.0).save(folder)
    rows = encode_pairs(tok, [preference_row({**PAIR, "id": f"x{i}", "r2": f"No {i}."}) for i in range(6)], 24)
    write_jsonl(folder.parent / "eval.jsonl", rows[:2])
    write_jsonl(folder.parent / "train.jsonl", rows[2:])
    return folder


def scorer(folder, dtype: str, system_prompt=None, **cfg) -> PreferenceModelScore:
    data = (folder.parent / "eval.jsonl", folder.parent / "train.jsonl")
    return PreferenceModelScore(folder, PpoConfig(**cfg), dtype, system_prompt, torch.device("cpu"), None, data)


def test_ppo_reads_a_response_as_the_reward_model_was_trained_on_it(reward_model_folder):
    row = preference_row(PAIR, system_prompt="Be careful.", keep_unfinished=True)
    assert row["prompt"][0] == {"role": "system", "content": "Be careful."}
    assert (row["chosen_finished"], row["rejected_finished"]) == (False, True)
    ppo = scorer(reward_model_folder, "float32", "Be careful.")
    trained = encode_pairs(ppo.tokenizer, [row], max_length=24)[0]
    scored = ppo.encode([PAIR["prompt"]] * 2, [PAIR["r1"], PAIR["r2"]], [False, True])
    assert scored == [trained["chosen"], trained["rejected"]]
    assert len(scored[0]) == 24  # the card's truncation, from the end
    assert ppo.tokenizer.decode(scored[0]).endswith("every account you have.")      # left open: no end of turn
    assert ppo.tokenizer.decode(scored[1]).endswith("No.<|im_end|>\n")


def test_scores_are_normalised_with_statistics_of_the_dtype_they_are_computed_in(reward_model_folder):
    same = scorer(reward_model_folder, "float32", reward_clip=100.0, missing_eos_penalty=-1.0)
    assert same.stats == (0.5, 2.0)  # the card's: measured in the dtype PPO runs the model in
    raw, score = same(["q", "q"], ["an answer", "another"], [[], []], torch.tensor([1.0, 0.0]))
    assert raw.dtype == torch.float32 and torch.allclose(score, (raw - 0.5) / 2.0 + torch.tensor([0.0, -1.0]))
    other = scorer(reward_model_folder, "bfloat16")  # trained in float32: PPO measures bfloat16's itself
    from transformers import AutoModelForSequenceClassification

    from cai.shards import read_jsonl

    bf16 = AutoModelForSequenceClassification.from_pretrained(reward_model_folder, dtype=torch.bfloat16).eval()
    rows = read_jsonl(reward_model_folder.parent / "eval.jsonl") + read_jsonl(reward_model_folder.parent / "train.jsonl")
    chosen, rejected = score_pairs(bf16, rows, 0, 4, torch.device("cpu"))
    assert other.stats == pytest.approx(mean_std(chosen + rejected)) and other.stats != (0.5, 2.0)
