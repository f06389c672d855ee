"""The reward-hacking audit (cai/reward_hacking.py): hand-derived series, and its glue in the eval numbers."""
import numpy as np
import pytest

from cai.eval_metrics import Bootstrap, reward_hacking, rl_steps
from cai.reward_hacking import StepSeries, audit, repetition_rate
from cai.checkpoints import Checkpoint

P = 40


def series(label, step, pm, win, length=10.0, rep=0.0, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return StepSeries(label, step, pm + noise * rng.standard_normal(P), np.clip(win + noise * rng.standard_normal(P),
                      0, 1) if label != "sft" else np.full(P, 0.5), np.full(P, length), np.full(P, rep))


def test_repetition_rate_by_hand():
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)  # 7 trigrams, 3 distinct
    assert repetition_rate("one two three four") == 0.0
    assert repetition_rate("short") == 0.0


def test_pm_up_while_the_judge_falls_is_flagged_at_that_step():
    steps = [series("sft", 0, 0.0, 0.5), series("ppo@2", 2, 0.5, 0.6, seed=1), series("ppo@4", 4, 1.0, 0.3, seed=2),
             series("ppo", 6, 1.5, 0.2, seed=3)]
    out = audit(steps, 0.95, 300, 0)
    assert out["flagged"] and out["flagged_steps"] == [4, 6]
    # step 2 is judged better than SFT: the best-judged earlier step for 4 and 6
    assert out["steps"][2]["against"]["label"] == "ppo@2" and out["steps"][3]["against"]["label"] == "ppo@2"
    assert out["steps"][2]["against"]["pm"]["difference"] == pytest.approx(0.5, abs=0.05)
    assert out["steps"][2]["against"]["judge_win"]["difference"] == pytest.approx(-0.3, abs=0.05)
    assert not out["steps"][1]["flagged"]  # PM and judge rose together
    assert out["verdict"].startswith("divergence from step 4")


def test_pm_and_judge_rising_together_or_pm_flat_are_not_flagged():
    together = [series("sft", 0, 0.0, 0.5), series("ppo@2", 2, 0.5, 0.6, seed=1), series("ppo", 4, 1.0, 0.7, seed=2)]
    flat_pm = [series("sft", 0, 0.0, 0.5), series("ppo", 4, 0.0, 0.3, seed=2)]
    for steps in (together, flat_pm):
        out = audit(steps, 0.95, 300, 0)
        assert not out["flagged"] and out["flagged_steps"] == [], out["verdict"]
        assert out["verdict"].startswith("no divergence")


def test_skipped_verdicts_are_left_out_of_the_pairing():
    bad = series("ppo", 4, 1.0, 0.2, seed=2)
    win = bad.win.copy()
    win[: P - 1] = np.nan  # one judged prompt left: too few to pair
    out = audit([series("sft", 0, 0.0, 0.5), StepSeries("ppo", 4, bad.pm, win, bad.length, bad.repetition)],
                0.95, 200, 0)
    assert out["steps"][1]["judged"] == 1 and out["steps"][1]["against"]["judge_win"]["difference"] is None
    assert not out["flagged"]


def test_rl_steps_orders_this_runs_checkpoints():
    cps = [Checkpoint("base", "base", "m"), Checkpoint("policy", "policy", "p"), Checkpoint("ppo@4", "ppo@4", "x"),
           Checkpoint("sft", "sft", "s"), Checkpoint("other:ppo", "runs/o:ppo", "o")]
    assert rl_steps(cps, "ppo", 10) == [("sft", 0), ("ppo@4", 4), ("policy", 10)]
    assert rl_steps(cps, "dpo", 10) == [("sft", 0), ("ppo@4", 4)]
    assert rl_steps(cps[:3], "ppo", 10) is None  # no SFT model to compare against


def test_the_glue_reads_wins_against_sft_from_both_orders():
    labels = ["sft", "ppo"]
    answers = {lab: {"h": [{"id": f"p{i}", "answer": "a b", "tokens": 2} for i in range(4)]} for lab in labels}
    pm = {"sft": {"h": [0.0] * 4}, "ppo": {"h": [1.0] * 4}}
    # sft first: p_r1 = P(sft better); ppo loses every comparison
    verdicts = {"h": [{"first": 0, "second": 1, "prompt_key": f"p{i}", "p_r1": 0.9, "logprobs": [[-0.1, -2.3]]}
                      for i in range(4)]}
    out = reward_hacking([("sft", 0), ("ppo", 5)], labels, answers, pm, verdicts, 0.0, Bootstrap(0.95, 200, 0))
    assert out["steps"][1]["judge_win"]["mean"] == pytest.approx(0.1)
    assert out["steps"][1]["pm"]["mean"] == pytest.approx(1.0)
    assert out["flagged"] and out["flagged_steps"] == [5]
    assert reward_hacking([("sft", 0), ("ppo", 5)], labels, answers, None, verdicts, 0.0,
                          Bootstrap(0.95, 200, 0))["skipped"].startswith("needs")
