"""Per-principle tables: which constitution lines do the work.

Critique principles: how much their revisions changed the answer (1 - word-level similarity).
Preference principles: agreement with the other principles' majority, and decisiveness |p - 0.5|.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from cai.shards import write_atomic


def text_change(before: str, after: str) -> float:
    """1 - difflib similarity of the word sequences: 0 unchanged, 1 nothing in common."""
    return 1.0 - difflib.SequenceMatcher(None, before.split(), after.split(), autojunk=False).ratio()


def critique_table(traces: list[dict]) -> list[dict]:
    stats: dict[str, list[tuple[float, int, int]]] = {}
    for t in traces:
        answer = t["initial"]
        for r in t["rounds"]:
            revision = r["revision"] or answer
            stats.setdefault(r["principle"], []).append(
                (text_change(answer, revision), len(answer.split()), len(revision.split())))
            answer = revision
    return [{"principle": pid, "revisions": len(v), "mean_change": round(sum(x[0] for x in v) / len(v), 3),
             "mean_words_before": round(sum(x[1] for x in v) / len(v), 1),
             "mean_words_after": round(sum(x[2] for x in v) / len(v), 1)} for pid, v in sorted(stats.items())]


def preference_table(rows_by_principle: dict[str, list[dict]]) -> list[dict]:
    """Per principle: agreement with the leave-one-out majority of the others, and decisiveness."""
    table = []
    for pid, rows in rows_by_principle.items():
        agree, decisive, n = 0, 0.0, 0
        for i, row in enumerate(rows):
            if "p_r1" not in row:
                continue
            others = [r[i]["p_r1"] for q, r in rows_by_principle.items() if q != pid and "p_r1" in r[i]]
            if not others:
                continue
            majority = sum(others) / len(others)
            agree += (row["p_r1"] > 0.5) == (majority > 0.5)
            decisive += abs(row["p_r1"] - 0.5)
            n += 1
        table.append({"principle": pid, "pairs": n, "agreement": round(agree / n, 3) if n else None,
                      "decisiveness": round(decisive / n, 3) if n else None})
    return table


def markdown(rows: list[dict], title: str) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    head = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(folder: Path, rows: list[dict], title: str) -> None:
    write_atomic(folder / "attribution.md", markdown(rows, title))
