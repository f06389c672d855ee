"""Offloaded inference models: same outputs, no weights held between uses."""
from __future__ import annotations

import pytest
import torch

from cai.rl.parked import ParkedWeights


def test_parked_model_gives_the_same_logits_and_holds_no_weights_between_uses(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    parked = ParkedWeights(model, tmp_path / "parked" / "ref.pt")
    assert all(p.numel() == 0 for p in model.parameters())
    for _ in range(2):  # a second use maps the same file again
        with parked.loaded() as m, torch.no_grad():
            assert m is model and m.get_input_embeddings().weight.dtype == torch.bfloat16
            assert (m.get_input_embeddings().weight is m.get_output_embeddings().weight) == tied
            assert torch.equal(m(input_ids=ids).logits, expected)
        assert all(p.numel() == 0 for p in model.parameters())
    parked.delete()
    assert not (tmp_path / "parked" / "ref.pt").exists()


def test_parked_weights_are_released_when_the_block_raises(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    parked = ParkedWeights(model, tmp_path / "rm.pt")
    with pytest.raises(RuntimeError, match="forward failed"), parked.loaded():
        assert all(p.numel() > 0 for p in model.parameters())
        raise RuntimeError("forward failed")
    assert all(p.numel() == 0 for p in model.parameters())
