"""The evaluation report: the dict that `cai eval` saves as eval.json becomes a static `report.html` with PNG
plots in `plots/` beside it (no script, no network; CSS inline).

Numbers. Every number on the page is `format_number(value)` inside an element whose `data-path` attribute is
the JSON text of the path from the root of eval.json to that value: a list of object keys (strings) and list
indices (integers), e.g. `data-path='["elo","harmless","ratings","ppo@10","ci",0]'`. A JSON list rather than a
dotted string, because checkpoint labels and principle ids may contain ".", "/", ":" or "@". The few numbers
the report computes itself (how many differences there are, and how many are beyond noise) carry
`data-derived="<name>"` instead ("differences", "differences_beyond_noise"). No other digit appears on the page
outside strings taken from eval.json, so a test can read every number back.

Sections. `SECTIONS` is the ordered list of what the page shows: a `Section` names the top-level key it needs
(it is built only when that key is present and not null) and a function `build(data, plots) -> str` that
returns the section's HTML body ("" to leave the section out) and writes its PNGs into `plots`. To add one
(red-teaming, ARCA, model-written evals, a reward-hacking audit), write such a function and append a Section;
the others need no change. Top-level keys no section reads are listed, unrendered, at the end of the page.

The judge's worth (accuracy against the chance band, position bias) is stated at the top (when the JSON has
a `judge` key) and again above every section of judged numbers.
"""
from __future__ import annotations

import html
import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cai import report_plots as draw
from cai.report_mwe import mwe
from cai.report_plots import Interval

NA = "—"


def format_number(value: object) -> str:
    """The one text of a number on the page: ints as they are; floats with 3 decimals below 10 in magnitude,
    1 below 1000, none above (Elo 1012.3 -> "1012", 12.34 -> "12.3", 0.5 -> "0.500"); None -> "—"."""
    if value is None:
        return NA
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    text = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.000"


def lookup(data: object, path: Sequence[str | int]) -> object:
    """The value at `path` (keys and list indices) in eval.json's dict; KeyError/IndexError/TypeError if absent."""
    for key in path:
        data = data[key]  # type: ignore[index]
    return data


# ---------------------------------------------------------------------------------------------- HTML pieces

def esc(text: object) -> str:
    return NA if text is None else html.escape(str(text))


def num(data: dict, *path: str | int) -> str:
    """The number at `path`, marked with its path; a dash when the JSON lacks it."""
    try:
        value = lookup(data, path)
    except (KeyError, IndexError, TypeError):
        return NA
    return f"<span data-path='{path_attr(path)}'>{esc(format_number(value))}</span>"


def path_attr(path: Sequence[str | int]) -> str:
    """The text of a data-path attribute (single-quoted, so the JSON's quotes stay readable)."""
    attr = html.escape(json.dumps(list(path), ensure_ascii=False, separators=(",", ":")), quote=False)
    return attr.replace("'", "&#39;")


def ci(data: dict, *path: str | int) -> str:
    """A confidence interval "[low, high]" from the two-element list at `path`."""
    bounds = _get(data, *path)
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
        return NA
    return f"[{num(data, *path, 0)}, {num(data, *path, 1)}]"


def signed(data: dict, *path: str | int) -> str:
    value = _get(data, *path)
    return ("+" if isinstance(value, numbers.Real) and value > 0 else "") + num(data, *path)


def table(head: Sequence[str], rows: Iterable[Sequence[str]], row_class: Sequence[str] = ()) -> str:
    """Cells are HTML already; `row_class` gives a class per row (e.g. "beyond")."""
    body = "".join((f'<tr class="{row_class[i]}">' if i < len(row_class) else "<tr>")
                   + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"


def figure(name: str, alt: str, caption: str) -> str:
    return (f'<figure><img src="plots/{name}" alt="{esc(alt)}" loading="eager">'
            f"<figcaption>{caption}</figcaption></figure>")


def _get(data: dict, *path: str | int) -> object:
    try:
        return lookup(data, path)
    except (KeyError, IndexError, TypeError):
        return None


def ppo_steps(names: Iterable[str]) -> list[str]:
    """The names that look like PPO snapshots ("ppo@<step>"), in step order."""
    steps = {k: int(m.group(1)) for k in names if (m := re.fullmatch(r"ppo@(\d+)", k))}
    return sorted(steps, key=steps.__getitem__)


def _ordered(keys: Iterable[str], first: Sequence[str]) -> list[str]:
    """`keys` with those in `first` leading, in its order (checkpoint or set order), then the rest."""
    keys = list(keys)
    return [k for k in first if k in keys] + [k for k in keys if k not in first]


def labels(data: dict) -> list[str]:
    return [c["label"] for c in data.get("checkpoints") or []]


def set_names(data: dict, kind: str | None = None) -> list[str]:
    return [s["name"] for s in data.get("sets") or [] if kind is None or s.get("kind") == kind]


def cells(data: dict, field: str | None = None) -> list[tuple[str, str]]:
    """(checkpoint, set) of every scores cell (whose `field` is not null), in checkpoint then set order."""
    scores = data.get("scores") or {}
    return [(label, name) for label in _ordered(scores, labels(data))
            for name in _ordered(scores[label] or {}, set_names(data))
            if field is None or (scores[label][name] or {}).get(field) is not None]


def interval(data: dict, value: Sequence, low_high: Sequence | None = None) -> Interval | None:
    """(value, low, high) from the paths of a value and of its [low, high] CI; None when the value is."""
    v = _get(data, *value)
    if not isinstance(v, numbers.Real):
        return None
    bounds = _get(data, *low_high) if low_high else None
    low, high = bounds if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else (None, None)
    return float(v), low, high


# ---------------------------------------------------------------------------------------------- the judge

def judge_line(data: dict) -> str:
    """What the judge is worth, as one paragraph: shown at the top and above every judged section."""
    judge = data.get("judge")
    if not judge:
        return ('<p class="judge none"><b>No judge check</b> in this evaluation: the judged numbers (Elo, judged '
                "refusal rates, per-principle verdicts) are absent, or unchecked where shown.</p>")
    accuracy, band = judge.get("accuracy"), judge.get("chance_band")
    if not isinstance(accuracy, numbers.Real) or not isinstance(band, numbers.Real):
        state, verdict = "noise", "its accuracy is unknown: treat the judged numbers as unchecked."
    elif accuracy <= 0.5 - band:
        state, verdict = "noise", "below chance: it tends to prefer the worse answer; judged numbers are unreliable."
    elif accuracy < 0.5 + band:
        state, verdict = "noise", "within the chance band: treat the judged numbers as noise."
    else:
        state, verdict = "ok", "above the chance band."
    return (f'<p class="judge {state}"><b>Judge</b> {esc(judge.get("model"))}: accuracy '
            f"{num(data, 'judge', 'accuracy')} (chance band: one half ± {num(data, 'judge', 'chance_band')}), "
            f"position bias {signed(data, 'judge', 'position_bias')}, ECE {num(data, 'judge', 'ece')}, on "
            f"{num(data, 'judge', 'pairs')} labelled pairs: <b>{verdict}</b></p>")


# ---------------------------------------------------------------------------------------------- sections

def setup(data: dict, plots: Path) -> str:
    checkpoints = table(["checkpoint", "model", "run", "constitution"],
                        [[esc(c.get(k)) for k in ("label", "model", "run", "constitution")]
                         for c in data.get("checkpoints") or []])
    sets = table(["set", "kind", "source", "prompts"],
                 [[esc(s.get("name")), esc(s.get("kind")), esc(s.get("source")), num(data, "sets", i, "prompts")]
                  for i, s in enumerate(data.get("sets") or [])])
    reward_model = (f"<p>Preference model: {esc(data['reward_model'])}.</p>" if data.get("reward_model")
                    else "<p>No preference model: no preference-model scores.</p>" if "reward_model" in data else "")
    return checkpoints + sets + reward_model


def elo(data: dict, plots: Path) -> str:
    aspects = [a for a in _ordered(data["elo"], ["helpful", "harmless"]) if _get(data, "elo", a, "ratings")]
    if not aspects:
        return ""
    order = _ordered(dict.fromkeys(k for a in aspects for k in data["elo"][a]["ratings"]), labels(data))
    counts = "; ".join(f"{esc(a)}: {num(data, 'elo', a, 'comparisons')} comparisons on "
                       f"{num(data, 'elo', a, 'prompts')} prompts"
                       + (f", anchored at {esc(data['elo'][a]['anchor'])}" if data["elo"][a].get("anchor") else "")
                       for a in aspects)
    rows = [[esc(k)] + [c for a in aspects for c in (num(data, "elo", a, "ratings", k, "elo"),
                                                        ci(data, "elo", a, "ratings", k, "ci"))] for k in order]
    head = ["checkpoint"] + [h for a in aspects for h in (f"{a} Elo", "CI")]
    return judge_line(data) + _elo_plot(data, aspects, order, plots) + f"<p>{counts}.</p>" + table(head, rows)


def _elo_plot(data: dict, aspects: list[str], order: list[str], plots: Path) -> str:
    """Helpfulness (x) against harmlessness (y) Elo, PPO snapshots joined by step (Bai et al. 2022, Figure 2);
    one interval panel per aspect when only one of the two was rated."""
    points = {a: {k: p for k in order if (p := interval(data, ("elo", a, "ratings", k, "elo"),
                                                         ("elo", a, "ratings", k, "ci")))} for a in aspects}
    colors = draw.palette(labels(data) + order)  # the same colour per checkpoint in every plot
    if {"helpful", "harmless"} <= set(aspects):
        both = {k: (points["helpful"][k], points["harmless"][k]) for k in order
                if k in points["helpful"] and k in points["harmless"]}
        draw.labelled_scatter(plots / "elo.png", both, colors, xlabel="helpfulness Elo", ylabel="harmlessness Elo",
                              title="Elo (cf. Bai et al. 2022, Figure 2)", line=ppo_steps(both))
        caption = ("Helpfulness against harmlessness Elo with CIs on both axes, as in the Constitutional AI "
                   "paper's Elo figure; PPO snapshots are joined in step order. Up and right is better.")
    elif any(points.values()):
        draw.interval_panels(plots / "elo.png", {a: p for a, p in points.items() if p}, colors, xlabel="Elo")
        caption = "Elo with its CI per checkpoint."
    else:
        return ""
    return figure("elo.png", "Elo plot", caption)


def pm_scores(data: dict, plots: Path) -> str:
    found = cells(data, "pm_score")
    if not found:
        return ""
    panels: dict[str, dict[str, list[float]]] = {}
    for label, name in found:
        if values := data["scores"][label][name]["pm_score"].get("values"):
            panels.setdefault(name, {})[label] = values
    fig = ""
    if panels:
        draw.box_panels(plots / "pm_scores.png", panels, draw.palette(labels(data)), ylabel="preference-model score")
        fig = figure("pm_scores.png", "preference-model score box plots",
                     "Preference-model scores of the answers, one box per checkpoint, one panel per set.")
    rows = [[esc(label), esc(name), num(data, *p, "mean"), ci(data, *p, "ci"), num(data, *p, "p10"),
             num(data, *p, "p50"), num(data, *p, "p90")]
            for label, name in found for p in [("scores", label, name, "pm_score")]]
    return fig + table(["checkpoint", "set", "mean", "CI", "p10", "p50", "p90"], rows)


def refusal(data: dict, plots: Path) -> str:
    found = cells(data, "refusal")
    if not found:
        return ""
    fig = _refusal_plot(data, plots)
    rows = [[esc(label), esc(name), num(data, *p, "judge"), ci(data, *p, "judge_ci"), num(data, *p, "pattern"),
             num(data, *p, "agreement"), num(data, *p, "n"), num(data, *p, "skipped")]
            for label, name in found for p in [("scores", label, name, "refusal")]]
    head = ["checkpoint", "set", "judged rate", "CI", "pattern rate", "agreement", "n", "skipped"]
    return judge_line(data) + fig + table(head, rows)


def _refusal_plot(data: dict, plots: Path) -> str:
    """Over-refusal (x, first borderline set) against refusal of harmful prompts (y, first harmful set)."""
    harmful, borderline = set_names(data, "harmful"), set_names(data, "borderline")
    if not harmful or not borderline:
        return ""
    field = "judge" if any(_get(data, "scores", k, s, "refusal", "judge") is not None
                           for k, s in cells(data, "refusal")) else "pattern"
    points = {}
    for label in _ordered(data["scores"], labels(data)):
        x, y = (interval(data, ("scores", label, s, "refusal", field), ("scores", label, s, "refusal", "judge_ci")
                         if field == "judge" else None) for s in (borderline[0], harmful[0]))
        if x and y:
            points[label] = (x, y)
    if not points:
        return ""
    draw.labelled_scatter(plots / "refusal.png", points, draw.palette(labels(data)), unit=True,
                          line=ppo_steps(points), xlabel=f"over-refusal: {field} refusal rate on '{borderline[0]}'",
                          ylabel=f"{field} refusal rate on '{harmful[0]}'", title="Refusal")
    return figure("refusal.png", "refusal scatter",
                  f"Refusal of harmful prompts (set {esc(harmful[0])}) against over-refusal of borderline ones "
                  f"(set {esc(borderline[0])}), {field} rates{' with CIs' if field == 'judge' else ''}. "
                  "Up and left is better.")


def answers(data: dict, plots: Path) -> str:
    found = cells(data)
    rows = [[esc(label), esc(name), num(data, *p, "length", "mean"), ci(data, *p, "length", "ci"),
             num(data, *p, "end_of_turn_rate"), num(data, *p, "distinct_1"), num(data, *p, "distinct_2")]
            for label, name in found for p in [("scores", label, name)]]
    head = ["checkpoint", "set", "length (mean)", "CI", "end-of-turn rate", "distinct_1", "distinct_2"]
    return table(head, rows) if rows else ""


def principles(data: dict, plots: Path) -> str:
    aspects = [a for a in data["principles"] if isinstance(data["principles"][a], dict) and data["principles"][a]]
    if not aspects:
        return ""
    panels, tables = {}, []
    for aspect in aspects:
        by_principle = data["principles"][aspect]
        ids = list(by_principle)
        order = _ordered(dict.fromkeys(k for p in ids for k in by_principle[p] or {}), labels(data))
        matrix = [[_number(_get(by_principle, p, k)) for p in ids] for k in order]
        panels[aspect] = (order, ids, matrix)
        rows = [[esc(p)] + [num(data, "principles", aspect, p, k) for k in order] for p in ids]
        tables.append(f"<h3>{esc(aspect)}</h3>" + table(["principle", *order], rows))
    draw.heatmap_panels(plots / "principles.png", panels, label="win rate")
    caption = "Judged win rate of each checkpoint under each principle, one panel per aspect."
    return judge_line(data) + figure("principles.png", "per-principle heatmap", caption) + "".join(tables)


def _number(value: object) -> float:
    return float(value) if isinstance(value, numbers.Real) else math.nan


def differences(data: dict, plots: Path) -> str:
    rows = data["differences"]
    if not rows:
        return "<p>No differences were computed.</p>"
    beyond = sum(bool(r.get("beyond_noise")) for r in rows)
    lead = (f'<p><b data-derived="differences_beyond_noise">{format_number(beyond)}</b> of '
            f'<span data-derived="differences">{format_number(len(rows))}</span> differences are beyond the '
            "bootstrap noise; the others are within it.</p>")
    body = [[esc(r.get("metric")), esc(r.get("set")), esc(r.get("a")), esc(r.get("b")),
             num(data, "differences", i, "difference"), ci(data, "differences", i, "ci"),
             '<span class="tag">beyond noise</span>' if r.get("beyond_noise") else "within noise"]
            for i, r in enumerate(rows)]
    classes = ["beyond" if r.get("beyond_noise") else "" for r in rows]
    head = ["metric", "set", "a", "b", "difference", "CI", "verdict"]
    return judge_line(data) + lead + table(head, body, classes)


def samples(data: dict, plots: Path) -> str:
    parts = []
    for sample in data["samples"]:
        given = sample.get("answers") or {}
        answers_ = "".join(f'<div class="answer"><h4>{esc(k)}</h4><div class="text">{esc(given[k])}</div></div>'
                           for k in _ordered(given, labels(data)))
        parts.append(f'<div class="sample"><p class="meta">set {esc(sample.get("set"))}</p>'
                     f'<div class="text prompt">{esc(sample.get("prompt"))}</div>'
                     f'<div class="answers">{answers_}</div></div>')
    return "".join(parts)


def skipped(data: dict, plots: Path) -> str:
    rows = [[esc(reason), num(data, "skipped", reason)] for reason in data["skipped"]]
    return table(["reason", "count"], rows) if rows else "<p>Nothing was skipped.</p>"


def reward_hacking(data: dict, plots: Path) -> str:
    from cai.report_audit import reward_hacking_section  # it builds on this module's pieces

    return reward_hacking_section(data, plots)


@dataclass(frozen=True)
class Section:
    id: str  # the HTML anchor
    title: str
    key: str | None  # the top-level key it needs present and not null; None: always built
    build: Callable[[dict, Path], str]  # (eval.json's dict, plots folder) -> HTML body, "" to leave it out


def redteam(data: dict, plots: Path) -> str:  # in cai/report_redteam.py, which imports this module
    from cai.report_redteam import redteam as build

    return build(data, plots)


def arca(data: dict, plots: Path) -> str:  # in cai/report_arca.py, which imports this module
    from cai.report_arca import arca as build

    return build(data, plots)


SECTIONS: list[Section] = [
    Section("setup", "Checkpoints and prompt sets", None, setup),
    Section("elo", "Elo ratings", "elo", elo),
    Section("pm_scores", "Preference-model scores", "scores", pm_scores),
    Section("refusal", "Refusal", "scores", refusal),
    Section("answers", "Answer statistics", "scores", answers),
    Section("principles", "Per-principle judge verdicts", "principles", principles),
    Section("differences", "Differences between checkpoints", "differences", differences),
    Section("reward_hacking", "Reward hacking along the PPO run", "reward_hacking", reward_hacking),
    Section("mwe", "Model-written evaluations", "mwe", mwe),
    Section("samples", "Samples", "samples", samples),
    Section("skipped", "Skipped", "skipped", skipped),
    Section("redteam", "Red teaming", "redteam", redteam),
    Section("arca", "ARCA: prompts that elicit a target output", "arca", arca),
]
HEADER_KEYS = {"title", "created", "checkpoints", "sets", "judge", "reward_model"}


def write_report(data: dict, out: Path, sections: Sequence[Section] = SECTIONS) -> Path:
    """Write `out/report.html` and its PNGs in `out/plots/` (earlier PNGs there are removed); returns the page."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    built = [(s, s.build(data, plots)) for s in sections if s.key is None or data.get(s.key) is not None]
    built = [(s, body) for s, body in built if body]
    nav = " ".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s, _ in built)
    body = "".join(f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{b}</section>' for s, b in built)
    unread = sorted(set(data) - HEADER_KEYS - {s.key for s in sections})
    footer = (f"<footer>Not shown by this report: {', '.join(esc(k) for k in unread)} (see eval.json).</footer>"
              if unread else "")
    title = esc(data.get("title") or "cai eval")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"script-src 'none'\">"
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><header><h1>{title}</h1>"
            f'<p class="meta">created {esc(data.get("created"))}</p>{judge_line(data) if "judge" in data else ""}'
            f"<nav>{nav}</nav></header>"
            f"{body}{footer}</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:78rem;
  margin:1.5rem auto;padding:0 1.2rem}
h1{font-size:1.6rem;margin:0 0 .2rem}h2{font-size:1.25rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem;
  margin-top:2.2rem}h3{font-size:1.05rem}.meta{color:#59636e;margin:.2rem 0}
nav{margin:.8rem 0}nav a{margin-right:1rem;color:#0969da;text-decoration:none}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{padding:.3rem .75rem;border-bottom:1px solid #e1e4e8;text-align:left;vertical-align:top}
th{background:#f3f5f7;font-weight:600;white-space:nowrap}tbody tr:nth-child(even){background:#f9fafb}
td:has(>[data-path]){text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.beyond{font-weight:700}.tag{background:#fff1c2;border:1px solid #d4a72c;border-radius:4px;padding:0 .35rem}
.judge{padding:.55rem .9rem;border-left:4px solid #1a7f37;background:#eef8f0;margin:.8rem 0}
section .judge{font-size:.88rem}.judge.noise{border-color:#cf222e;background:#fdeeee}
.judge.none{border-color:#8c959f;background:#f3f5f7}
figure{margin:1rem 0}img{max-width:100%;height:auto;border:1px solid #e1e4e8}
figcaption{color:#59636e;font-size:.88rem;margin-top:.3rem}
.sample{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .9rem;margin:1rem 0}
.answers{display:grid;grid-template-columns:repeat(auto-fit,minmax(16rem,1fr));gap:.6rem;margin-top:.6rem}
.answer h4{margin:.2rem 0;font-size:.9rem}.text{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;
  padding:.5rem .6rem;border-radius:4px;font-size:.88rem}.prompt{background:#eef4fb}
footer{margin:2.5rem 0 1rem;color:#59636e;font-size:.88rem}
"""
