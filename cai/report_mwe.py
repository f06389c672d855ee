"""The report's section for model-written evaluations (`cai mwe`, cai/mwe.py): the probes and what filtering left of
them, each checkpoint's matching rate with its interval in training order (a plot and a table, split by the
matching answer), and the changes between consecutive checkpoints, beyond or within the bootstrap noise.

Its numbers follow cai/report.py's rule: each is `num(data, *path)`, marked with its path in mwe.json.
"""
from __future__ import annotations

from pathlib import Path


def _plot(path: Path, m: dict, order: list[str]) -> None:
    """Matching rate per checkpoint in training order with its CI, joined by a line; the rates on the probes of
    each matching answer as faint markers (apart, they show a bias towards one answer)."""
    from matplotlib.figure import Figure

    from cai.report_plots import palette

    fig = Figure(figsize=(min(max(6.4, 1.2 * len(order) + 3.0), 14.0), 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(order)))
    rates = [m["scores"][k]["matching_rate"] for k in order]
    cis = [m["scores"][k]["matching_rate_ci"] for k in order]
    shown = [i for i in xs if rates[i] is not None]
    below = [max(0.0, rates[i] - (cis[i][0] if cis[i][0] is not None else rates[i])) for i in shown]
    above = [max(0.0, (cis[i][1] if cis[i][1] is not None else rates[i]) - rates[i]) for i in shown]
    ax.errorbar(shown, [rates[i] for i in shown], yerr=[below, above], fmt="o-", color="C0", capsize=4, lw=1.5,
                label="all probes")
    colors = palette(list(m["probes_by_answer"]))
    for answer in m["probes_by_answer"]:
        ys = [(i, (m["scores"][k]["by_answer"].get(answer) or {}).get("matching_rate")) for i, k in enumerate(order)]
        ys = [(i, y) for i, y in ys if y is not None]
        if ys:
            ax.plot([i for i, _ in ys], [y for _, y in ys], "x", ms=7, alpha=0.6, color=colors[answer],
                    label=f"probes matching with {answer.strip()!r}")
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xticks(xs, order, rotation=20, ha="right")
    ax.set_ylim(-0.03, 1.03)
    ax.set(ylabel="answers matching the behaviour", title=m["behaviour"])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=8, frameon=False)
    fig.savefig(path)


def mwe(data: dict, plots: Path) -> str:
    from cai.report import ci, esc, figure, judge_line, num, signed, table

    m = data["mwe"]
    order = [k for k in m.get("order") or [] if k in (m.get("scores") or {})]
    about = f": an assistant that {esc(m['description'])}" if m.get("description") else ""
    source = "written by " + esc(m["writer"]) + ", labels checked by " + esc(m["judge"]) if m.get("writer") \
        else "from " + esc(m.get("probes_source"))
    by_answer = ", ".join(f"{num(data, 'mwe', 'probes_by_answer', a)} matching with “{esc(a.strip())}”"
                          for a in m.get("probes_by_answer") or {})
    parts = [f"<p>Behaviour <b>{esc(m.get('behaviour'))}</b>{about}. {num(data, 'mwe', 'probes')} probes {source} "
             f"({by_answer}); format {esc(m.get('format'))}. Intervals: bootstrap over probes at level "
             f"{num(data, 'mwe', 'confidence')}.</p>"]
    if data.get("judge"):  # the header's line again, with what its pairs are here
        parts.append(judge_line(data) + "<p>The judge's labelled pairs here are the behaviour's own examples that it "
                     "is not shown; it is right when it gives a statement's side more than half of the probability.</p>")
    if m.get("steps"):
        parts.append(table(["step", "count"], [[esc(k.replace("_", " ")), num(data, "mwe", "steps", k)]
                                               for k in m["steps"]]))
    if order and any(m["scores"][k]["matching_rate"] is not None for k in order):
        _plot(plots / "mwe.png", m, order)
        parts.append(figure("mwe.png", "matching rate per checkpoint",
                            "Share of probes on which the checkpoint's likelier answer is the one matching the "
                            "behaviour, with its interval, checkpoints in training order; crosses: the same on the "
                            "probes of each matching answer. Lower is better for an unwanted behaviour."))
    answers = list(m.get("probes_by_answer") or {})
    head = ["checkpoint", "matching rate", "CI", "mean P(match)", "CI", "option mass", "scored", "skipped"] + \
        [f"on “{a.strip()}” probes" for a in answers]
    rows = [[esc(k)] + [cell(data, "mwe", "scores", k, f) for cell, f in (
        (num, "matching_rate"), (ci, "matching_rate_ci"), (num, "mean_p_match"), (ci, "mean_p_match_ci"),
        (num, "mean_option_mass"), (num, "n"), (num, "skipped"))]
        + [num(data, "mwe", "scores", k, "by_answer", a, "matching_rate") for a in answers] for k in order]
    parts.append(table(head, rows))
    if m.get("differences"):
        diff = [[esc(d["from"]), esc(d["to"]), signed(data, "mwe", "differences", i, "difference"),
                 ci(data, "mwe", "differences", i, "ci"), num(data, "mwe", "differences", i, "n"),
                 '<span class="tag">beyond noise</span>' if d.get("beyond_noise") else "within noise"]
                for i, d in enumerate(m["differences"])]
        parts.append("<h3>Changes in matching rate</h3>" + table(
            ["from", "to", "change", "CI", "probes", "verdict"], diff,
            ["beyond" if d.get("beyond_noise") else "" for d in m["differences"]]))
    return "".join(parts)
