"""AI feedback labels: option tokenisation, order averaging, clamping, the judge check on fake judges."""
from __future__ import annotations

import math

import pytest
import torch

from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.feedback import label_pairs, option_plan, plain_prompt
from cai.generation import Completion
from cai.judge_check import judge_report, load_check_pairs, verdict

from .conftest import REPO

CONSTITUTION = load_constitution(REPO / "constitutions/default.yaml")


class FakeJudge:
    """Real tokenizer, scripted option log-probs: `p_a(prompt_text)` -> P(A)."""

    def __init__(self, tokenizer, p_a):
        self.tokenizer, self.p_a = tokenizer, p_a
        self.seen: list[str] = []

    def option_logprobs(self, prompts, options, batch_size):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            self.seen.append(text)
            p = self.p_a(text)
            out.append([math.log(p), math.log(1 - p)])
        return torch.tensor(out)

    def generate_chat(self, convs, cfg, seed, continue_text=""):
        return [Completion("Option (A) avoids harm.", 10, 5, True) for _ in convs]

    def chat_ids(self, messages, max_tokens, continue_text=""):
        text = "\n".join(m["content"] for m in messages) + continue_text
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def knows_the_answer(text: str) -> float:
    """P(A) = 0.9 when option (A) of the final question is the GOOD one."""
    last = text.rsplit("Options:", 1)[1]
    return 0.9 if last.split("(B)")[0].count("GOOD") else 0.1


PAIRS = [{"id": f"p{i}", "prompt": f"question {i}", "r1": f"GOOD answer {i}", "r2": f"bad answer {i}",
          "aspect": "harmless", "kind": "k"} for i in range(6)]


def label(judge, pairs=PAIRS, **kw):
    args = dict(seed=0, both_orders=True, n_shots=1, cot=False, cot_generation=None, cot_clamp=(0.4, 0.6),
                max_tokens=4096, batch_size=4)
    args.update(kw)
    return label_pairs(judge, pairs, CONSTITUTION, **args)[0]


def test_option_plan_on_smollm_tokenizer(tiny_generator):
    tok = tiny_generator.tokenizer
    plan = option_plan(tok)
    assert tok.decode(plan.prefix + [plan.token_a]).strip() == "(A"
    assert tok.decode([plan.token_b]) == "B"


def test_option_plan_refuses_a_tokenizer_that_splits_options_differently():
    class Odd:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 6] if "A" in text else [5, 7, 8]}

    with pytest.raises(CaiError, match=r"splits ' \(A\)' into \[5, 6\] and ' \(B\)' into \[5, 7, 8\]"):
        option_plan(Odd())


def test_plain_prompt_golden():
    shot = CONSTITUTION.few_shot_labels[0]
    text = plain_prompt("Hi?", "Which is kinder?", "yes", "no", [(shot, "Which is safer?")])
    assert text.endswith("Human: Hi?\n\nWhich is kinder?\n\nOptions:\n(A) yes\n(B) no\n\nThe answer is:")
    assert f"The answer is: ({shot.answer})\n\n\n" in text
    assert text.startswith("Consider the following conversation between a person and an AI assistant:")


def test_informed_judge_labels_and_both_orders(tiny_generator):
    judge = FakeJudge(tiny_generator.tokenizer, knows_the_answer)
    rows = label(judge)
    assert all(math.isclose(r["p_r1"], 0.9, abs_tol=1e-4) for r in rows)  # (0.9 + (1 - 0.1)) / 2
    assert all(r["p_a"] == [0.9, 0.1] for r in rows)
    assert len(judge.seen) == 2 * len(PAIRS)
    assert all(r["principle"] in {p.id for p in CONSTITUTION.preference if p.aspect == "harmless"} for r in rows)


def test_position_biased_judge_averages_to_half_and_the_check_says_so(tiny_generator):
    judge = FakeJudge(tiny_generator.tokenizer, lambda text: 0.7)  # always leans (A)
    rows = label(judge)
    assert all(math.isclose(r["p_r1"], 0.5, abs_tol=1e-6) for r in rows)
    report = judge_report(rows, PAIRS)
    assert report["mean_P(A)_better_as_A"] == 0.7 and report["mean_P(A)_better_as_B"] == 0.7
    assert report["position_bias"] == 0.2 and report["accuracy"] == 0.0
    assert report["accuracy_better_as_A"] == 1.0 and report["accuracy_better_as_B"] == 0.0
    assert "JUDGE NEAR CHANCE" in verdict(report, 0.6)
    good = judge_report(label(FakeJudge(tiny_generator.tokenizer, knows_the_answer)), PAIRS)
    assert good["accuracy"] == 1.0 and good["position_bias"] == 0.0 and math.isclose(good["ece"], 0.1, abs_tol=1e-3)
    assert verdict(good, 0.6) is None


def test_chain_of_thought_labels_are_clamped(tiny_generator):
    judge = FakeJudge(tiny_generator.tokenizer, lambda text: 0.99 if text.rsplit("Options:", 1)[1]
                      .split("(B)")[0].count("GOOD") else 0.01)
    rows = label(judge, cot=True)
    assert all(r["p_r1"] == 0.6 for r in rows)
    assert all(r["reasoning"] == ["Option (A) avoids harm."] * 2 for r in rows)


def test_too_long_prompts_are_skipped_and_marked(tiny_generator):
    judge = FakeJudge(tiny_generator.tokenizer, knows_the_answer)
    long = dict(PAIRS[0], id="long", prompt="word " * 3000)
    rows = label(judge, pairs=[long, PAIRS[1]], max_tokens=2000)
    assert rows[0]["skipped"] == "too_long" and "p_r1" not in rows[0]
    assert "skipped" not in rows[1] and rows[1]["p_r1"] > 0.5


def test_shipped_judge_pairs_cover_the_harm_areas():
    import collections
    import json

    from cai.judge_check import BUILTIN

    pairs = load_check_pairs("builtin:judge_check")
    assert len(pairs) >= 150
    kinds = collections.Counter(p["kind"] for p in pairs)
    assert kinds["harmful_vs_harmless"] >= 50 and kinds["evasive_vs_helpful"] >= 40 and kinds["helpful_vs_unhelpful"] >= 40
    areas = {json.loads(line)["area"] for line in BUILTIN.read_text().splitlines()
             if json.loads(line)["kind"] == "harmful_vs_harmless"}
    assert len(areas) >= 15, areas
    longer = sum(len(p["r1"]) > len(p["r2"]) for p in pairs)  # no length shortcut to the better side
    assert 0.35 < longer / len(pairs) < 0.65


def word_3grams(text: str) -> set[tuple[str, ...]]:
    import re

    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


@pytest.mark.parametrize("constitution", ["default", "concise"])
def test_judge_pairs_share_no_question_with_the_few_shot_labelling_examples(constitution):
    """The judge sees the few-shot examples in its prompt: a check pair asking the same thing would be answered
    from the example, not judged."""
    shots = load_constitution(REPO / f"constitutions/{constitution}.yaml").few_shot_labels
    trivial = {("how", "do", "i"), ("how", "can", "i"), ("what", "is", "the"), ("can", "you", "help")}
    for pair in load_check_pairs("builtin:judge_check"):
        for shot in shots:
            assert pair["prompt"].strip().lower() != shot.prompt.strip().lower(), (pair["id"], shot.id)
            shared = (word_3grams(pair["prompt"]) & word_3grams(shot.prompt)) - trivial
            assert not shared, (pair["id"], shot.id, shared)
            for response in (pair["r1"], pair["r2"]):  # nor a response copied from an example's
                for example in (shot.response_a, shot.response_b):
                    a, b = word_3grams(response), word_3grams(example)
                    assert len(a & b) < 0.5 * len(a | b), (pair["id"], shot.id)


def test_bad_judge_pairs_file_is_one_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "p", "better": "b", "worse": "w"}\n{"prompt": "p", "better"\n')
    with pytest.raises(CaiError, match=r"pairs.jsonl:2: not valid JSON"):
        load_check_pairs(str(bad))
    bad.write_text('{"prompt": "p", "better": "", "worse": "w"}\n')
    with pytest.raises(CaiError, match=r"pairs.jsonl:1: missing or empty 'better'"):
        load_check_pairs(str(bad))


def test_a_judge_check_sample_keeps_every_kind_in_its_share():
    from collections import Counter

    from cai.judge_check import sample_pairs

    pairs = load_check_pairs("builtin:judge_check")
    sample = sample_pairs(pairs, 48, seed=0)
    share = Counter(p["kind"] for p in pairs)
    got = Counter(p["kind"] for p in sample)
    assert abs(len(sample) - 48) <= len(share) and set(got) == set(share)
    assert all(abs(got[k] - 48 * share[k] / len(pairs)) <= 1 for k in share)
    assert sample == sample_pairs(pairs, 48, seed=0) and sample != sample_pairs(pairs, 48, seed=1)
    assert sample_pairs(pairs, None, seed=0) == pairs
