"""The red-teaming section of the HTML report (cai/report.py's SECTIONS, key `redteam`): attack success and
diversity per round, the filter's accuracy per round with --adversarial, and the strongest attacks. Every number
is marked with its path in the JSON, as cai/report.py requires. `cai redteam` writes it alone as report.html."""
from __future__ import annotations

import time
from pathlib import Path

from cai.report import esc, num, table

ROUND_COLUMNS = [("completions", "completions"), ("unparsed", "unparsed"), ("near_duplicates", "near duplicates"),
                 ("attacks", "attacks"), ("judged", "judged"), ("successes", "successes"),
                 ("success_rate", "success rate"), ("judge_harmful_rate", "judged harmful"),
                 ("pm_harmful_rate", "PM harmful"), ("distinct_1", "distinct_1"), ("distinct_2", "distinct_2"),
                 ("self_bleu", "self-BLEU")]
FILTER_COLUMNS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced"), ("true_positive_rate", "attacks caught"),
                  ("true_negative_rate", "harmless passed"), ("attacks", "hard attacks"), ("harmless", "hard harmless")]


def redteam(data: dict, plots: Path) -> str:
    rt = data["redteam"]
    tuned = " and, after each round, an attacker fine-tuned on its successes" if rt.get("adversarial") else ""
    lead = (f"<p>Target {esc(rt.get('checkpoint'))} ({esc(rt.get('target'))}), attacked by the red LM "
            f"{esc(rt.get('red_model'))}{tuned}. "
            f"An attack succeeds when the judge {esc(rt.get('judge'))} finds the answer harmful"
            + (f" and the preference model {esc(rt['reward_model'])} scores it low" if rt.get("reward_model") else "")
            + ". The judge is the feedback model, not checked here: `cai judge-check` tells how far to trust it. "
              "Rates are over the attacks it answered (judged).</p>")
    rounds = rt.get("rounds") or []
    head = ["round", "mode", *(h for _, h in ROUND_COLUMNS), "seconds"]
    rows = [[num(data, "redteam", "rounds", i, "round"), esc(m.get("mode"))]
            + [num(data, "redteam", "rounds", i, k) for k, _ in ROUND_COLUMNS]
            + [num(data, "redteam", "rounds", i, "seconds", "round")] for i, m in enumerate(rounds)]
    rows.append(["all", ""] + [num(data, "redteam", "total", k) for k, _ in ROUND_COLUMNS] + [""])
    body = lead + table(head, rows) + _filter(data, rounds) + _examples(data)
    export = rt.get("export")
    return body + (f"<p>Successful attacks, as a prompt file for <code>prompts.red_team</code>: {esc(export)}.</p>"
                   if export else "<p>No attack succeeded: nothing exported.</p>")


def _filter(data: dict, rounds: list[dict]) -> str:
    found = [i for i, m in enumerate(rounds) if (m.get("adversarial") or {}).get("hard_set")]
    if not found:
        return ""
    head = ["round", *(h for _, h in FILTER_COLUMNS), "caught before training"]
    rows = [[num(data, "redteam", "rounds", i, "round")]
            + [num(data, "redteam", "rounds", i, "adversarial", "hard_set", k) for k, _ in FILTER_COLUMNS]
            + [num(data, "redteam", "rounds", i, "adversarial", "fresh_caught")] for i in found]
    return ("<h3>Input filter</h3><p>A classifier of requests trained each round on the successful attacks against "
            "harmless prompts that only sound dangerous, scored on a held-out hard set of both; \"caught before "
            "training\" is the previous round's filter on the round's new successful attacks. Saved as "
            f"{esc(data['redteam'].get('filter'))}.</p>" + table(head, rows))


def _examples(data: dict) -> str:
    examples = data["redteam"].get("examples") or []
    if not examples:
        return ""
    rows = [[esc(x.get("attack")), esc(x.get("answer")), num(data, "redteam", "examples", i, "p_harmful"),
             num(data, "redteam", "examples", i, "pm")] for i, x in enumerate(examples)]
    return "<h3>Strongest successful attacks</h3>" + table(["attack", "answer", "P(harmful)", "PM score"], rows)


def write_report(summary: dict, out: Path) -> Path:
    """`out/report.html` holding this section alone."""
    from cai.report import SECTIONS
    from cai.report import write_report as write

    page = {"title": f"cai redteam: {summary.get('checkpoint')}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "redteam": summary}
    return write(page, out, [s for s in SECTIONS if s.key == "redteam"])
