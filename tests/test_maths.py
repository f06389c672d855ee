"""Pure maths against hand-derived numbers."""
import math

import torch

from cai.calibration import expected_calibration_error, soft_agreement
from cai.labels import average_orders, clamp_label, prob_first
from cai.losses import soft_bradley_terry


def test_soft_bradley_terry_hand_values():
    # p=1, margin 1: -log σ(1) = log(1 + e^-1) = 0.313262
    assert math.isclose(soft_bradley_terry(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0])).item(),
                        0.313262, abs_tol=1e-6)
    # p=0.5, margin 0: log 2
    assert math.isclose(soft_bradley_terry(torch.tensor([3.0]), torch.tensor([3.0]), torch.tensor([0.5])).item(),
                        math.log(2), abs_tol=1e-6)
    # p=0.25, margin 2: -(0.25 log σ(2) + 0.75 log σ(-2)) = 0.25*0.126928 + 0.75*2.126928 = 1.626928
    r_a = torch.tensor([2.0], requires_grad=True)
    loss = soft_bradley_terry(r_a, torch.tensor([0.0]), torch.tensor([0.25]))
    assert math.isclose(loss.item(), 1.626928, abs_tol=1e-6)
    loss.backward()  # d loss / d r_A = σ(m) - p = 0.880797 - 0.25
    assert math.isclose(r_a.grad.item(), 0.630797, abs_tol=1e-6)
    # a batch is the mean of its rows
    batch = soft_bradley_terry(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.5]))
    assert math.isclose(batch.item(), (0.313262 + math.log(2)) / 2, abs_tol=1e-6)


def test_soft_label_order_average_and_clamp():
    assert math.isclose(prob_first(torch.tensor(math.log(0.3)), torch.tensor(math.log(0.1))).item(), 0.75,
                        abs_tol=1e-6)
    assert math.isclose(average_orders(torch.tensor(0.8), torch.tensor(0.6)).item(), 0.6, abs_tol=1e-6)
    # a judge that always answers (A) with 0.7 carries no information once both orders are averaged
    assert math.isclose(average_orders(torch.tensor(0.7), torch.tensor(0.7)).item(), 0.5, abs_tol=1e-6)
    assert torch.allclose(clamp_label(torch.tensor([0.02, 0.5, 0.97]), 0.4, 0.6), torch.tensor([0.4, 0.5, 0.6]))


def test_ece_and_agreement_hand_values():
    p, y = torch.tensor([0.9, 0.9, 0.1, 0.1]), torch.tensor([1, 0, 0, 0])
    # bin 9: |0.5 - 0.9| * 2/4 = 0.2; bin 1: |0 - 0.1| * 2/4 = 0.05
    assert math.isclose(expected_calibration_error(p, y), 0.25, abs_tol=1e-6)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])) == 0.0
    assert soft_agreement(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([0.7, 0.6, 0.5])) == 0.5


def test_learning_rate_schedules_hand_values():
    from cai.train.schedule import lr_multiplier

    def f(kind, warmup=2):
        return [round(lr_multiplier(s, total=6, warmup=warmup, kind=kind), 6) for s in range(7)]

    assert f("constant") == [0.0, 0.5, 1, 1, 1, 1, 1]
    assert f("constant", warmup=0) == [1] * 7
    assert f("linear") == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]           # (6 - s) / (6 - 2) after warmup
    assert f("cosine") == [0.0, 0.5, 1.0, 0.853553, 0.5, 0.146447, 0.0]   # ½(1 + cos(π (s - 2) / 4))
