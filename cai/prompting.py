"""Chat messages for critique -> revision, built from the constitution (Bai et al. 2022, §3.1).

The paper's loop as chat turns: user prompt, assistant answer, user critique request, assistant
critique, user revision request, assistant revision. The prompt plus the revision has the shape
of the prompt plus the answer, so the next round starts from there. Few-shot conversations from the
constitution come first, as earlier turns, so a small model sees what a critique and a revision are.
"""
from __future__ import annotations

import random
import re

from cai.chat import assistant, user
from cai.constitution import Constitution, CritiqueRevisionPrinciple


def few_shot_messages(constitution: Constitution, n: int) -> list[dict]:
    """The first `n` few-shot critique/revision conversations as chat turns."""
    messages: list[dict] = []
    for shot in constitution.few_shot_revisions[:n]:
        p = constitution.principle(shot.principle)
        messages += [user(shot.prompt), assistant(shot.response), user(p.critique), assistant(shot.critique),
                     user(p.revision), assistant(shot.revision)]
    return messages


def critique_messages(few_shot: list[dict], prompt: str, answer: str, p: CritiqueRevisionPrinciple) -> list[dict]:
    return few_shot + [user(prompt), assistant(answer), user(p.critique)]


def revision_messages(few_shot: list[dict], prompt: str, answer: str, p: CritiqueRevisionPrinciple,
                      critique: str) -> list[dict]:
    return critique_messages(few_shot, prompt, answer, p) + [assistant(critique), user(p.revision)]


def sample_principle(ids: list[str], seed: int, row_id: str, round_index: int) -> str:
    """One principle per (row, round), drawn independently (§3.1) and reproducibly.

    Seeding by the row's id, not its position, keeps the draw the same however rows are sharded.
    """
    return random.Random(f"{seed}|{row_id}|{round_index}").choice(ids)


_LABEL = re.compile(r"^\s*(revision|revised response|critique|answer|response)\s*:\s*", re.IGNORECASE)


def clean_reply(text: str) -> str:
    """Strip a leading role label such as 'Revision:' that small models copy from the request."""
    return _LABEL.sub("", text, count=1).strip()


def answer_shard(generator, rows: list[dict], seed: int, *, generation, keep_ids: bool = False
                 ) -> tuple[list[dict], int]:
    """Runs on a Ray actor: one sampled answer per row's prompt -> the row with answer, finished (ended with an
    end-of-turn) and tokens (new tokens, the end-of-turn included); with `keep_ids`, ids (those tokens)."""
    outs = generator.generate_chat([[user(r["prompt"])] for r in rows], generation, seed)
    return ([{**r, "answer": clean_reply(o.text), "finished": o.finished, "tokens": o.new_tokens,
              **({"ids": list(o.ids)} if keep_ids else {})} for r, o in zip(rows, outs)],
            sum(o.new_tokens for o in outs))
