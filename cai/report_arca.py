"""The ARCA section of the HTML report (cai/report.py's SECTIONS, key `arca`): what `cai audit arca` found
(cai/audit.py, cai/arca.py), ARCA against random search given the same forwards, one row per restart. Every number
is marked with its path in arca.json, as cai/report.py requires. `cai audit arca --out DIR` writes it alone as
DIR/report.html beside arca.json.
"""
from __future__ import annotations

import time
from pathlib import Path

from cai.report import esc, figure, num, table

METHODS = {"arca": "ARCA", "random_search": "random search"}


def arca(data: dict, plots: Path) -> str:
    a = data["arca"]
    runs = a.get("runs") or []
    framing = "inside the chat template's user turn" if a.get("chat") else "as raw text, no chat template"
    prefix = f', after the fixed text <span class="text">{esc(a["prefix"])}</span>' if a.get("prefix") else ""
    lead = (f"<p>Checkpoint {esc(a.get('checkpoint'))}. Target output: "
            f'<span class="text">{esc(a.get("target"))}</span>. Searched: {num(data, "arca", "prompt_tokens")} '
            f"prompt tokens {framing}{prefix}. Each search stops when the greedy continuation is the target or after "
            f"{num(data, 'arca', 'budget_forwards')} sequence forwards (a backward counts as one). ARCA (Jones et "
            "al., “Automatically Auditing Large Language Models via Discrete Optimization”) against random "
            "single-token substitutions given the same forwards.</p>")
    rates = table(["method", "share of restarts emitting the target within the budget"],
                  [[esc(METHODS.get(m, m)), num(data, "arca", "success_rate", m)] for m in a.get("success_rate") or {}])
    head = ["method", "seed", "target emitted", "forwards", "steps", "log p(target)", "seconds", "prompt found",
            "token ids"]
    rows = [[esc(METHODS.get(r.get("method"), r.get("method"))), num(data, *p, "seed"),
             "yes" if r.get("success") else "no", num(data, *p, "forwards"), num(data, *p, "steps"),
             num(data, *p, "objective"), num(data, *p, "seconds"), f'<span class="text">{esc(r.get("prompt"))}</span>',
             " ".join(num(data, *p, "prompt_ids", j) for j in range(len(r.get("prompt_ids") or [])))]
            for i, r in enumerate(runs) for p in [("arca", "runs", i)]]
    emitted = ["beyond" if r.get("success") else "" for r in runs]
    return lead + rates + _plot(a, runs, plots) + table(head, rows, emitted)


def _plot(a: dict, runs: list[dict], plots: Path) -> str:
    """Each restart's end point: forwards spent (x) against the log-probability of the target reached (y), one
    colour per method, filled where the target was emitted; the budget as a dashed line."""
    from cai.report_plots import _figure, palette

    drawn = [r for r in runs if all(isinstance(r.get(k), (int, float)) for k in ("forwards", "objective"))]
    if not drawn:
        return ""
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    colors = palette([r["method"] for r in drawn])
    for method, color in colors.items():
        mine = [r for r in drawn if r["method"] == method]
        for hit in (True, False):
            pts = [r for r in mine if bool(r.get("success")) == hit]
            if pts:
                ax.scatter([r["forwards"] for r in pts], [r["objective"] for r in pts], s=45, edgecolors=color,
                           facecolors=color if hit else "none", label=f"{METHODS.get(method, method)}"
                           + (": target emitted" if hit else ": not emitted"))
    if isinstance(a.get("budget_forwards"), (int, float)):
        ax.axvline(a["budget_forwards"], color="0.5", ls="--", lw=0.8, label="budget")
    ax.set_xlim(left=0)  # forwards from zero: how much of the budget each restart spent
    ax.set(xlabel="sequence forwards spent", ylabel="log p(target | prompt found)", title="ARCA and random search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(plots / "arca.png")
    return figure("arca.png", "forwards spent against log p(target), per restart",
                  "Where each restart ended: forwards spent against the log-probability of the target given the "
                  "prompt it found; filled where the greedy continuation is the target. Up and left is better.")


def write_report(result: dict, out: Path) -> Path:
    """`out/report.html` holding this section alone."""
    from cai.report import SECTIONS
    from cai.report import write_report as write

    page = {"title": f"cai audit arca: {result.get('checkpoint')}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "arca": result}
    return write(page, out, [s for s in SECTIONS if s.key == "arca"])
