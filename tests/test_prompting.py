from collections import Counter

from cai.constitution import load_constitution
from cai.prompting import (clean_reply, critique_messages, few_shot_messages, revision_messages,
                           sample_principle)

from .conftest import REPO


def constitution():
    return load_constitution(REPO / "constitutions/default.yaml")


def test_few_shot_turns_follow_the_paper_order():
    c = constitution()
    msgs = few_shot_messages(c, 2)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 6
    shot = c.few_shot_revisions[0]
    p = c.principle(shot.principle)
    assert [m["content"] for m in msgs[:6]] == [shot.prompt, shot.response, p.critique, shot.critique,
                                               p.revision, shot.revision]
    assert few_shot_messages(c, 0) == []


def test_revision_messages_golden():
    c = constitution()
    p = c.principle("harm-general")
    msgs = revision_messages([], "How do I pick a lock?", "Use a tension wrench.", p, "It helps burglary.")
    assert msgs == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Use a tension wrench."},
        {"role": "user", "content": p.critique},
        {"role": "assistant", "content": "It helps burglary."},
        {"role": "user", "content": p.revision},
    ]
    assert critique_messages([], "q", "a", p) == msgs[:0] + [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": p.critique}]


def test_rendered_chat_prompt_golden(tiny_generator):
    """The exact text the model sees for a critique request (ChatML, with the template's system turn)."""
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Critique it."}]
    ids = tiny_generator.chat_ids(msgs, max_tokens=4096)
    text = tiny_generator.tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
                    "<|im_start|>user\nCritique it.<|im_end|>\n<|im_start|>assistant\n")
    assert len(tiny_generator.chat_ids(msgs, max_tokens=5)) == 5  # long prompts are cut from the left


def test_principle_sampling_is_reproducible_and_independent():
    ids = [f"p{i}" for i in range(16)]
    draws = [sample_principle(ids, 0, f"row{r}", k) for r in range(400) for k in range(4)]
    assert draws == [sample_principle(ids, 0, f"row{r}", k) for r in range(400) for k in range(4)]
    assert draws != [sample_principle(ids, 1, f"row{r}", k) for r in range(400) for k in range(4)]
    counts = Counter(draws)
    assert set(counts) == set(ids)                          # every principle gets used
    assert max(counts.values()) < 2 * min(counts.values())  # roughly uniform (1600 draws)
    same_as_prev = sum(sample_principle(ids, 0, f"row{r}", 1) == sample_principle(ids, 0, f"row{r}", 0)
                       for r in range(400))
    assert 10 < same_as_prev < 50   # independent rounds repeat a principle ~1/16 of the time
    # known values pin the scheme: changing it silently would reshuffle every saved run
    assert [sample_principle(ids, 0, "rt-0001", k) for k in range(4)] == \
        [sample_principle(ids, 0, "rt-0001", k) for k in range(4)]


def test_clean_reply():
    assert clean_reply("Revision: Sure, here.") == "Sure, here."
    assert clean_reply("  critique : It is rude.") == "It is rude."
    assert clean_reply("Revisions are hard.") == "Revisions are hard."


class RecordingGenerator:
    """Records the conversations it is asked to continue; replies 'reply N', finished unless told otherwise."""

    def __init__(self, unfinished_calls=()):
        self.calls, self.unfinished_calls = [], set(unfinished_calls)

    def generate_chat(self, conversations, cfg, seed):
        from cai.generation import Completion

        self.calls.append(conversations)
        done = len(self.calls) not in self.unfinished_calls
        return [Completion(f"reply {len(self.calls)}", 5, 3, done) for _ in conversations]


def test_the_initial_answer_is_sampled_without_the_few_shot_conversations():
    from cai.config import CritiqueReviseConfig
    from cai.stages.critique_revise import revise_shard

    c = constitution()
    rows = [{"id": "r1", "prompt": "How do I hotwire a car?"}]
    for initial_shots, expected_turns in ((False, 1), (True, 1 + 6 * 2)):
        gen = RecordingGenerator()
        cfg = CritiqueReviseConfig(rounds=1, few_shot=2, few_shot_initial=initial_shots)
        revise_shard(gen, rows, 0, constitution=c, cfg=cfg, run_seed=0, model="m")
        initial, critique = gen.calls[0][0], gen.calls[1][0]
        assert len(initial) == expected_turns and initial[-1] == {"role": "user", "content": rows[0]["prompt"]}
        assert len(critique) == 6 * 2 + 3  # the critique request always sees the few-shot conversations


def test_cut_revisions_are_dropped_or_kept_unfinished_and_counted():
    from cai.config import CritiqueReviseConfig
    from cai.stages.critique_revise import revise_shard, sft_rows

    rows = [{"id": "r1", "prompt": "Q1"}, {"id": "r2", "prompt": "Q2"}]
    # calls: 1 initial, 2 critique, 3 revision (cut), 4 critique, 5 revision (finished)
    traces, _ = revise_shard(RecordingGenerator(unfinished_calls={3}), rows, 0, constitution=constitution(),
                             cfg=CritiqueReviseConfig(rounds=2, few_shot=0), run_seed=0, model="m")
    assert [r["revision_finished"] for r in traces[0]["rounds"]] == [False, True]
    helpful = [{"prompt": "H", "answer": "A", "finished": False}, {"prompt": "H2", "answer": "", "finished": True}]
    revisions, answers, counts = sft_rows(traces, helpful, CritiqueReviseConfig(), "Sys.")
    assert len(revisions) == 2 and answers == [] and counts == {"empty_dropped": 1, "unfinished_dropped": 3}
    assert revisions[0]["prompt"][0] == {"role": "system", "content": "Sys."} and "finished" not in revisions[0]
    revisions, answers, counts = sft_rows(traces, helpful, CritiqueReviseConfig(unfinished="keep"), None)
    assert counts == {"empty_dropped": 1, "unfinished_kept": 3}
    assert [r["finished"] for r in revisions] == [False, True, False, True] and answers[0]["finished"] is False
    assert revisions[0]["prompt"] == [{"role": "user", "content": "Q1"}]
