"""PPO maths against hand-derived numbers (worked in the comments)."""
import math

import torch

from cai.rl.math import (AdaptiveKL, FixedKL, entropy_from_logits, gae, kl_estimate, logprobs_of, policy_loss,
                          token_rewards, value_loss, whiten)

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_gamma_one():
    # δ2 = 1 - 0.7 = 0.3; δ1 = 0.7 - 0.6 = 0.1; δ0 = 0.6 - 0.5 = 0.1
    # A2 = 0.3; A1 = 0.1 + 0.95*0.3 = 0.385; A0 = 0.1 + 0.95*0.385 = 0.46575
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    assert close(adv, [[0.46575, 0.385, 0.3]]) and close(ret, [[0.96575, 0.985, 1.0]])


def test_gae_discount_and_padding():
    # γ=0.9, λ=0.5: A1 = 2; A0 = 1 + 0.45*2 = 1.9
    adv, _ = gae(T([[1.0, 2.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), gamma=0.9, lam=0.5)
    assert close(adv, [[1.9, 2.0]])
    # a padded last position (value 9.9 ignored): A1 = 1 - 0.6 = 0.4; A0 = 0.1 + 0.95*0.4 = 0.48
    adv, ret = gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.6, 9.9]]), T([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    assert close(adv, [[0.48, 0.4, 0.0]]) and close(ret, [[0.98, 1.0, 0.0]])


def test_kl_estimators():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert close(kl_estimate(logp, ref, "k1"), [0.693147])          # log 0.5 - log 0.25
    assert close(kl_estimate(logp, ref, "k3"), [0.193147])          # (0.5 - 1) - log 0.5
    assert close(kl_estimate(ref, ref, "k3"), [0.0])
    assert (kl_estimate(T([0.0, -3.0]), T([-2.0, 0.0]), "k3") >= 0).all()


def test_token_rewards_put_score_on_last_real_token():
    # -0.5 * [0.1, 0.2, 0.3] masked to [1, 1, 0], then +2 on position 1
    r = token_rewards(T([2.0]), T([[0.1, 0.2, 0.3]]), T([[1.0, 1.0, 0.0]]), kl_coef=0.5)
    assert close(r, [[-0.05, 1.9, 0.0]])


def test_clipped_policy_loss():
    mask = T([[1.0, 1.0, 1.0]])
    # ratio e on every token, advantage +1: clipped ratio 1.2 wins, loss = -1.2, all clipped
    loss, stats = policy_loss(T([[1.0, 1.0, 1.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 1.0]]), mask, clip=0.2)
    assert close(loss, -1.2) and stats["clip_frac"] == 1.0
    # ratio 2, advantage -1: the unclipped term 2 is larger, loss 2, nothing clipped
    loss, stats = policy_loss(T([[math.log(2)] * 3]), T([[0.0] * 3]), T([[-1.0] * 3]), mask, clip=0.2)
    assert close(loss, 2.0) and stats["clip_frac"] == 0.0
    # ratio 1: loss = -mean(advantage)
    loss, _ = policy_loss(T([[0.3, 0.1, 0.2]]), T([[0.3, 0.1, 0.2]]), T([[1.0, 2.0, 6.0]]), mask, clip=0.2)
    assert close(loss, -3.0)


def test_clipped_value_loss():
    # V=1, V_old=0, R=2, clip 0.2: V_clip=0.2; max((1-2)², (0.2-2)²) = 3.24; ½·3.24 = 1.62
    loss, stats = value_loss(T([[1.0]]), T([[0.0]]), T([[2.0]]), T([[1.0]]), clip=0.2)
    assert close(loss, 1.62) and stats["value_clip_frac"] == 1.0
    loss, _ = value_loss(T([[1.9]]), T([[2.0]]), T([[2.0]]), T([[1.0]]), clip=0.2)
    assert close(loss, 0.005)  # ½·0.1²


def test_whiten():
    # mean 2.5, unbiased var 5/3, std 1.290994
    assert close(whiten(T([1.0, 2.0, 3.0, 4.0]), T([1.0] * 4)), [-1.161895, -0.387298, 0.387298, 1.161895])
    kept = whiten(T([1.0, 2.0, 3.0, 4.0]), T([1.0] * 4), shift_mean=False)
    assert close(kept.mean(), 2.5)


def test_entropy_and_logprobs():
    assert close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]])
    logits = torch.log(T([[[0.1, 0.2, 0.7]]]))
    assert close(logprobs_of(logits, torch.tensor([[2]])), [[math.log(0.7)]])


def test_kl_controllers():
    # error clip(9/6 - 1) = +0.2: 0.1·(1 + 0.2·256/10000) = 0.100512
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)
    assert math.isclose(c.value, 0.100512, rel_tol=1e-9)
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(3.0, 256)  # error -0.2
    assert math.isclose(c.value, 0.099488, rel_tol=1e-9)
    c = AdaptiveKL(0.1, target=6.0, horizon=10000)
    c.update(6.6, 256)  # error +0.1: 0.1·(1 + 0.1·0.0256)
    assert math.isclose(c.value, 0.100256, rel_tol=1e-9)
    f = FixedKL(0.05)
    f.update(100.0, 256)
    assert f.value == 0.05
