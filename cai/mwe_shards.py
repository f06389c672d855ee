"""What `cai mwe` (cai/mwe.py) runs on the Ray actors that hold a model: the writer's outputs, the judge's verdicts,
and each checkpoint's log-probabilities of a probe's answers. Each is a shard function of cai/pool.py:
fn(generator, rows, seed, **settings) -> (rows out, new tokens).
"""
from __future__ import annotations

from cai.mwe_data import Behaviour

RAW = "\n\nHuman: {question}\n\nAssistant:"  # Anthropic's dialogue format, for mwe.format=raw


def write_shard(generator, rows: list[dict], seed: int, *, generation) -> tuple[list[dict], int]:
    outs = generator.generate_chat([r["messages"] for r in rows], generation, seed)
    return ([{"id": r["id"], "side": r["side"], "text": o.text, "finished": o.finished} for r, o in zip(rows, outs)],
            sum(o.new_tokens for o in outs))


def judge_shard(generator, rows: list[dict], seed: int, *, behaviour: Behaviour, max_tokens: int,
                batch_size: int) -> tuple[list[dict], int]:
    """Rows {statement} -> + {p_agree, option_mass} (or skipped: too_long): P(agree) is agreement's share of the
    (A)/(B) probability averaged over both option orders; option_mass the smaller of the two orders' P(A) + P(B)."""
    import torch

    from cai.chat import special_prefix
    from cai.feedback import option_plan
    from cai.mwe_data import judge_prompt

    tok, options = generator.tokenizer, option_plan(generator.tokenizer, "mwe judge")
    bos = special_prefix(tok)
    jobs = [bos + tok(judge_prompt(behaviour, r["statement"], first), add_special_tokens=False)["input_ids"]
            + options.prefix for r in rows for first in (True, False)]
    fits = [max(len(jobs[2 * i]), len(jobs[2 * i + 1])) <= max_tokens for i in range(len(rows))]
    scored = [j for i, j in enumerate(jobs) if fits[i // 2]]
    lps = generator.option_logprobs(scored, [[options.token_a], [options.token_b]], batch_size) if scored else None
    out, k = [], 0
    for r, ok in zip(rows, fits):
        if not ok:
            out.append({**r, "skipped": "too_long"})
            continue
        first, second = lps[k], lps[k + 1]                    # agreement shown as (A), then as (B)
        k += 2
        p_agree = 0.5 * (torch.softmax(first, -1)[0] + torch.softmax(second, -1)[1]).item()
        mass = min(first.exp().sum().item(), second.exp().sum().item())
        out.append({**r, "p_agree": round(p_agree, 5), "option_mass": round(mass, 5)})
    return out, 0


def answer_split(tokenizer, prompt: str, answer: str, bos: list[int]) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) with the answer tokenised as it follows the prompt: where prompt + answer and the
    prompt alone stop agreeing (a tokenizer may merge across the boundary)."""
    joint = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(joint), len(alone)) and joint[n] == alone[n]:
        n += 1
    n = min(n, len(joint) - 1)  # at least one answer token
    return bos + joint[:n], joint[n:]


def sequence_logprobs(generator, pairs: list[list[tuple[list[int], list[int]]]], batch_size: int) -> list[list[float]]:
    """Per row, per answer: log p(answer | context) summed over the answer's tokens. One option_logprobs pass over
    every distinct context the answers need (context + the answer's earlier tokens), reading the needed tokens."""
    where: dict[tuple, int] = {}
    for row in pairs:
        for ctx, ans in row:
            for i in range(len(ans)):
                where.setdefault(tuple(ctx + ans[:i]), len(where))
    tokens = sorted({t for row in pairs for _, ans in row for t in ans})
    column = {t: j for j, t in enumerate(tokens)}
    lps = generator.option_logprobs([list(k) for k in where], [[t] for t in tokens], batch_size)  # (contexts, T)
    return [[sum(float(lps[where[tuple(ctx + ans[:i])], column[t]]) for i, t in enumerate(ans)) for ctx, ans in row]
            for row in pairs]


def score_shard(generator, rows: list[dict], seed: int, *, raw: bool, max_tokens: int,
                batch_size: int) -> tuple[list[dict], int]:
    """Rows {id, question, matching, not_matching} -> {id, lp: [log p(matching), log p(each not matching)]} (or
    skipped: too_long). Chat format: the question is the user turn and the answers lose their leading space."""
    from cai.chat import special_prefix, user, with_system

    tok = generator.tokenizer
    bos = special_prefix(tok) if raw else []  # a chat template writes its own BOS
    pairs, fits = [], []
    for r in rows:
        prompt = RAW.format(question=r["question"]) if raw else tok.apply_chat_template(
            with_system([user(r["question"])], generator.system_prompt), tokenize=False, add_generation_prompt=True)
        answers = [r["matching"], *r["not_matching"]]
        split = [answer_split(tok, prompt, a if raw else a.lstrip(), bos) for a in answers]
        pairs.append(split)
        fits.append(max(len(c) + len(a) for c, a in split) <= max_tokens)
    lps = iter(sequence_logprobs(generator, [p for p, ok in zip(pairs, fits) if ok], batch_size) if any(fits) else [])
    return [{"id": r["id"], "lp": [round(x, 5) for x in next(lps)]} if ok else {"id": r["id"], "skipped": "too_long"}
            for r, ok in zip(rows, fits)], 0
