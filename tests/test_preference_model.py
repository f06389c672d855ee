"""PPO scores with the preference model exactly what the reward_model stage trained it on."""
from __future__ import annotations

import pytest
import torch

from cai.config import PpoConfig
from cai.errors import CaiError
from cai.preference_model import PreferenceModelCard
from cai.rl.scoring import PreferenceModelScore
from cai.stages.preferences import preference_row
from cai.stages.reward_model import encode_pairs


@pytest.fixture(scope="module")
def reward_model_folder(tiny_model, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_tokenizer

    folder = tmp_path_factory.mktemp("rm") / "model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = 0
    model.save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    PreferenceModelCard(max_length=24, mean=0.5, std=2.0,
                        by_dtype={"float32": [0.5, 2.0], "bfloat16": [-1.0, 0.25]}).save(folder)
    return folder


def test_ppo_reads_a_response_as_the_reward_model_was_trained_on_it(reward_model_folder):
    pair = {"id": "x", "prompt": "How do I stay safe online?", "aspect": "harmless", "p_r1": 0.8,
            "r1": "Use long passwords and a password manager for every account you have.", "r2": "No.",
            "r1_finished": False, "r2_finished": True}
    row = preference_row(pair, system_prompt="Be careful.", keep_unfinished=True)
    assert row["prompt"][0] == {"role": "system", "content": "Be careful."}
    assert (row["chosen_finished"], row["rejected_finished"]) == (False, True)
    scorer = PreferenceModelScore(reward_model_folder, PpoConfig(), "float32", "Be careful.", torch.device("cpu"), None)
    trained = encode_pairs(scorer.tokenizer, [row], max_length=24)[0]
    scored = scorer.encode([pair["prompt"]] * 2, [pair["r1"], pair["r2"]], [False, True])
    assert scored == [trained["chosen"], trained["rejected"]]
    assert len(scored[0]) == 24  # the card's truncation, from the end
    assert scorer.tokenizer.decode(scored[0]).endswith("every account you have.")      # left open: no end of turn
    assert scorer.tokenizer.decode(scored[1]).endswith("No.<|im_end|>\n")


@pytest.mark.parametrize("dtype, mean, std", [("float32", 0.5, 2.0), ("bfloat16", -1.0, 0.25)])
def test_scores_are_normalised_with_the_statistics_of_their_dtype(reward_model_folder, dtype, mean, std):
    cfg = PpoConfig(reward_clip=100.0, missing_eos_penalty=-1.0)
    scorer = PreferenceModelScore(reward_model_folder, cfg, dtype, None, torch.device("cpu"), None)
    raw, score = scorer(["q", "q"], ["an answer", "another"], [[], []], torch.tensor([1.0, 0.0]))
    assert raw.dtype == torch.float32 and torch.allclose(score, (raw - mean) / std + torch.tensor([0.0, -1.0]))
    with pytest.raises(CaiError, match="no statistics for float16"):
        scorer.card.normalise(raw, "float16")
