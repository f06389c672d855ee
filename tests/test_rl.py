"""PPO pieces without a cluster: the sampled distribution, step 4 on hand numbers, the skip guard."""
from __future__ import annotations

import math

import pytest
import torch

from cai.config import PpoConfig
from cai.errors import CaiError
from cai.rl.experience import Experience, pack
from cai.rl.models import response_logits


class Logits(torch.nn.Module):
    """A fake causal LM whose logits at every position are `table[token]`."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])


def test_log_probs_are_those_of_the_tempered_distribution_sampled_from():
    from cai.rl.math import logprobs_of

    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, 3.0, 0.0]])
    ids, attention, mask, P = pack([[0, 1]], [(2, 1)], pad_id=0, device=torch.device("cpu"))
    for T in (1.0, 0.7):
        logp = logprobs_of(response_logits(Logits(table), ids, attention, P, T), ids[:, P:])
        # token 2 follows token 1 (logits [0.5, 0.5, 0]); token 1 follows token 2 (logits [1, 3, 0])
        expected = [torch.log_softmax(table[1] / T, -1)[2], torch.log_softmax(table[2] / T, -1)[1]]
        assert torch.allclose(logp[0], torch.stack(expected))


def test_step_4_on_hand_numbers():
    """One response of 2 tokens, score 1, β 0.5, k1 KL [0.2, 0.4], values [0.5, 0.25], γ 1, λ 1, no whitening:
    rewards [-0.1, 1 - 0.2] = [-0.1, 0.8]; returns [0.7, 0.8]; advantages [0.2, 0.55]."""
    one = torch.ones(1, 2)
    exp = Experience(ids=torch.zeros(1, 3, dtype=torch.long), attention=torch.ones(1, 3), prompt_len=1, mask=one,
                     ref_logp=torch.tensor([[-1.2, -1.4]]), raw_score=torch.tensor([1.0]), score=torch.tensor([1.0]),
                     finished=torch.tensor([1.0]), prompts=["p"], texts=["t"], logp=torch.tensor([[-1.0, -1.0]]),
                     values=torch.tensor([[0.5, 0.25]]))
    cfg = PpoConfig(gamma=1.0, lam=1.0, whiten_advantages=False)
    exp.finish(cfg, kl_coef=0.5)
    assert torch.allclose(exp.kl, torch.tensor([[0.2, 0.4]]))
    assert torch.allclose(exp.returns, torch.tensor([[0.7, 0.8]]))
    assert torch.allclose(exp.advantages, torch.tensor([[0.2, 0.55]]))
    mb = exp.rows(torch.tensor([0]))
    assert torch.equal(mb.advantages, exp.advantages) and torch.equal(mb.logp, exp.logp)


def test_consecutive_non_finite_steps_stop_the_run():
    from cai.rl.worker import PPOWorker

    worker = PPOWorker.__new__(PPOWorker)  # the guard only: no models needed
    worker.cfg, worker.step, worker.skipped, worker.consecutive_skips = PpoConfig(max_skipped_steps=3), 7, 0, 0
    worker.note_skip()
    worker.record(False)
    assert (worker.skipped, worker.consecutive_skips) == (2, 2)
    worker.record(True)
    assert worker.consecutive_skips == 0
    worker.note_skip()
    worker.note_skip()
    with pytest.raises(CaiError, match="3 consecutive steps had non-finite"):
        worker.note_skip()
    assert math.isclose(worker.skipped, 5)


@pytest.mark.parametrize("backend", ["cai", "hf"])
def test_both_rollout_backends_sample_valid_responses_with_the_system_prompt(tiny_model, backend):
    from types import SimpleNamespace

    from cai.config import GenerationConfig
    from cai.models import load_causal_lm, load_tokenizer
    from cai.rl.rollout import RolloutGenerator, RolloutWeights, rollout_generator

    model, tok = load_causal_lm(tiny_model), load_tokenizer(tiny_model)
    weights = RolloutWeights(SimpleNamespace(module=model), 0, torch.float32, tiny_model, torch.device("cpu"))
    assert weights.copy is None  # same dtype: rollouts sample from the training weights themselves
    gen: RolloutGenerator = rollout_generator(backend, weights, tok, GenerationConfig(max_new_tokens=6, batch_size=2),
                                              "Be brief.", 256, torch.device("cpu"))
    ids = gen.prompt_ids(["Hi there", "What is rain?"])
    assert all(tok.decode(i).startswith("<|im_start|>system\nBe brief.<|im_end|>") for i in ids)
    outs = gen.generate(ids, seed=3)
    assert [o.prompt_tokens for o in outs] == [len(i) for i in ids]
    for o in outs:
        assert 1 <= o.new_tokens == len(o.ids) <= 6
        assert o.finished == (o.ids[-1] in {2}) and not any(t == 2 for t in o.ids[:-1])
    assert [o.ids for o in gen.generate(ids, seed=3)] == [o.ids for o in outs]  # seeded
    gen.release()
    gen.sync()
