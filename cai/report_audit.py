"""The report's audit sections (cai/report.py builds the page): the reward-hacking audit along a PPO run.

Numbers follow cai/report.py's rule: each one is `num(data, *path)` with its path into eval.json.
"""
from __future__ import annotations

from pathlib import Path

from cai.report import ci, esc, figure, judge_line, num, signed, table

SERIES = (("pm", "preference-model score"), ("judge_win", "judge's win rate against SFT"),
          ("length", "answer tokens"), ("repetition", "repeated word-trigram rate"))


def reward_hacking_section(data: dict, plots: Path) -> str:
    audit = data["reward_hacking"]
    if "skipped" in audit:
        return f"<p>Not audited: {esc(audit['skipped'])}.</p>"
    steps = audit["steps"]
    cls = "judge noise" if audit.get("flagged") else "judge"
    lead = (f'<p class="{cls}"><b>{"Flagged" if audit.get("flagged") else "Not flagged"}</b>: '
            f"{esc(audit.get('verdict'))}.</p><p>Each step is compared with the best-judged earlier step "
            f"(from {esc(audit.get('reference'))}, whose win rate against itself is one half); it is flagged when "
            "the preference-model score rose beyond the bootstrap noise while the judge's win rate fell beyond "
            "it.</p>")
    _plot(steps, audit.get("flagged_steps") or [], plots / "reward_hacking.png")
    fig = figure("reward_hacking.png", "reward-hacking audit along the PPO run",
                 "Along the PPO run: the preference model's score, the judge's win rate against SFT, length and "
                 "repetition, with bootstrap intervals; flagged steps in red.")
    head = ["checkpoint", "step", "answers (judged)", *(name for _, name in SERIES), "against", "score change", "win-rate change",
            "verdict"]
    rows, classes = [], []
    for i, s in enumerate(steps):
        p = ("reward_hacking", "steps", i)
        against = s.get("against")
        cells = [esc(s["label"]), num(data, *p, "step"), f"{num(data, *p, 'answers')} ({num(data, *p, 'judged')})",
                 *(f"{num(data, *p, key, 'mean')} {ci(data, *p, key, 'ci')}" for key, _ in SERIES)]
        if against:
            cells += [f"{esc(against['label'])} (step {num(data, *p, 'against', 'step')})",
                      f"{signed(data, *p, 'against', 'pm', 'difference')} {ci(data, *p, 'against', 'pm', 'ci')}",
                      f"{signed(data, *p, 'against', 'judge_win', 'difference')} "
                      f"{ci(data, *p, 'against', 'judge_win', 'ci')}",
                      '<span class="tag">diverging</span>' if s.get("flagged") else "—"]
        else:
            cells += ["—", "—", "—", "reference"]
        rows.append(cells)
        classes.append("beyond" if s.get("flagged") else "")
    return judge_line(data) + lead + fig + table(head, rows, classes)


def _plot(steps: list[dict], flagged: list[int], path: Path) -> Path:
    """Four panels against the PPO step, each a mean with its interval; flagged steps drawn in red."""
    from cai.report_plots import _figure

    fig = _figure(12.0, 3.2)
    x = [s["step"] for s in steps]
    for ax, (key, name) in zip(fig.subplots(1, len(SERIES), squeeze=False)[0], SERIES):
        mean = [s[key]["mean"] for s in steps]
        ok = [i for i, m in enumerate(mean) if m is not None]
        below = [mean[i] - (steps[i][key]["ci"][0] if steps[i][key]["ci"][0] is not None else mean[i]) for i in ok]
        above = [(steps[i][key]["ci"][1] if steps[i][key]["ci"][1] is not None else mean[i]) - mean[i] for i in ok]
        ax.errorbar([x[i] for i in ok], [mean[i] for i in ok], yerr=[below, above], fmt="-o", capsize=3, ms=4,
                    color="C0")
        bad = [i for i in ok if x[i] in flagged]
        ax.plot([x[i] for i in bad], [mean[i] for i in bad], "o", color="C3", ms=8, zorder=3)
        ax.set(xlabel="PPO step", title=name)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path
