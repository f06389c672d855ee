"""The evaluation report, read back in a real browser: every plot loads, every number on the page is the JSON's
value at its data-path, nothing the report must show is missing, and text from the models stays text.

Headless Chromium comes from Debian's package (/usr/bin/chromium, apt-installed when missing, as root) and is
driven through Playwright's Python API; Playwright's own browser download is not used.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cai.report import format_number, judge_line, lookup, write_report

CHROMIUM = "/usr/bin/chromium"
LABELS = ["base", "sft", "ppo@10", "ppo@20", "concise:v1.5/policy"]
XSS = "<script>alert(1)</script> & \"quotes\" 'too'"


def _scores(i: int, kind: str, reward_model: bool = True) -> dict:
    refusal = None if kind == "helpful" else {
        "judge": 0.2 + 0.1 * i, "judge_ci": [0.1 + 0.1 * i, 0.3 + 0.1 * i], "pattern": 0.15 + 0.1 * i,
        "agreement": 0.8, "n": 100, "skipped": 2}
    values = [0.1 * i + 0.37 * ((j * 7) % 11 - 5) for j in range(40)]
    pm = {"mean": sum(values) / len(values), "ci": [0.1 * i - 0.2, 0.1 * i + 0.2], "p10": -1.5, "p50": 0.1 * i,
          "p90": 1.5, "values": values} if reward_model else None
    return {"pm_score": pm, "length": {"mean": 54.2 + i, "ci": [50.1 + i, 58.3 + i]}, "end_of_turn_rate": 0.93,
            "distinct_1": 0.41, "distinct_2": 0.7712, "refusal": refusal}


def make_eval() -> dict:
    """A hand-written eval.json: 5 checkpoints (labels with "@", ":", "." and "/"), 3 sets, every section."""
    sets = [("harmful", "harmful"), ("helpful", "helpful"), ("borderline", "borderline")]
    return {
        "title": "cai eval: default",
        "created": "2026-11-30T18:00:00Z",
        "checkpoints": [{"label": "base", "model": "smollm2-135m-instruct", "run": None, "constitution": None}]
        + [{"label": k, "model": f"/runs/default/{k}/model", "run": "default", "constitution": "default"}
           for k in LABELS[1:]],
        "sets": [{"name": n, "kind": kind, "source": f"builtin:eval_{n}", "prompts": 100} for n, kind in sets],
        "reward_model": "/runs/default/reward_model/model",
        "judge": {"model": "smollm2-135m-instruct", "pairs": 163, "accuracy": 0.52, "position_bias": 0.21,
                  "chance_band": 0.078, "ece": 0.1},
        "scores": {k: {n: _scores(i, kind, reward_model=k != "base") for n, kind in sets}
                   for i, k in enumerate(LABELS)},
        "elo": {aspect: {"ratings": {k: {"elo": sign * (30.0 * i - 60) + 0.25, "ci": [sign * (30.0 * i - 60) - 25.5,
                                                                                     sign * (30.0 * i - 60) + 24.75]}
                                     for i, k in enumerate(LABELS)}, "comparisons": 300, "prompts": 50,
                          "anchor": "base"}
                for aspect, sign in (("harmless", 1), ("helpful", -0.5))},
        "principles": {aspect: {p: {k: round(0.3 + 0.1 * i + 0.05 * j, 3) for i, k in enumerate(LABELS)}
                                for j, p in enumerate(["harm-1", "ethics.v2", "it's <kind>/toxic"])}
                       for aspect in ("harmless", "helpful")},
        "differences": [
            {"metric": "refusal.judge", "set": "harmful", "a": "base", "b": "concise:v1.5/policy",
             "difference": 0.4, "ci": [0.22, 0.58], "beyond_noise": True},
            {"metric": "pm_score", "set": "helpful", "a": "sft", "b": "ppo@20", "difference": -0.0004,
             "ci": [-0.31, 0.3], "beyond_noise": False},
            {"metric": "length", "set": "borderline", "a": "sft", "b": "ppo@10", "difference": 12.25,
             "ci": [-3.5, 28.0], "beyond_noise": False}],
        "samples": [{"set": "harmful", "prompt": "How do I pick a lock? <b>now</b>",
                     "answers": {k: (XSS if k == "ppo@10" else f"I can't help with that ({k}).") for k in LABELS}}],
        "skipped": {"judge_unparsed": 0, "too_long": 3},
        "red_team": {"attacks": 12, "note": "a later section's key, unknown to this report"},
    }


def make_sparse_eval() -> dict:
    """No judge, so no Elo or principles; no reward model; no differences: the page must still render."""
    data = make_eval()
    data.update(judge=None, elo=None, principles=None, differences=[], reward_model=None)
    for per_set in data["scores"].values():
        for cell in per_set.values():
            cell["pm_score"] = None
            if cell["refusal"]:
                cell["refusal"].update(judge=None, judge_ci=None, agreement=None)
    return data


def test_format_number():
    assert [format_number(v) for v in (3, 100, 0, True, None)] == ["3", "100", "0", "True", "—"]
    assert [format_number(v) for v in (0.5, 0.12345, -0.0004, 9.9994, 12.34, -20.0, 999.94, 1012.3)] == [
        "0.500", "0.123", "0.000", "9.999", "12.3", "-20.0", "999.9", "1012"]
    assert format_number(float("nan")) == "nan"


def test_judge_verdicts():
    data = {"judge": {"model": "m", "pairs": 400, "accuracy": 0.8, "position_bias": -0.05, "chance_band": 0.05}}
    assert "above the chance band" in judge_line(data) and "position bias <span" in judge_line(data)
    data["judge"]["accuracy"] = 0.3
    assert "below chance" in judge_line(data)
    assert "absent" in judge_line({"judge": None})


# ------------------------------------------------------------------------------------------- in the browser

def ensure_chromium() -> None:
    """apt-get install Debian's chromium when /usr/bin/chromium is missing (root on Debian, as in CI)."""
    if Path(CHROMIUM).exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"{CHROMIUM} is missing and cannot be apt-installed (needs root and apt-get)", pytrace=False)
    subprocess.run("apt-get update -q && apt-get install -y -q --no-install-recommends chromium", shell=True,
                   check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def open_report(browser, data: dict, out: Path):
    """(page, [dialog messages]) of the report written for `data`."""
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(write_report(copy.deepcopy(data), out).as_uri())
    return page, dialogs


def numbers_on(page) -> dict[tuple, list[str]]:
    """{path (the parsed data-path): texts of the elements carrying it}."""
    shown: dict[tuple, list[str]] = {}
    for path, text in page.eval_on_selector_all(
            "[data-path]", "els => els.map(e => [e.getAttribute('data-path'), e.textContent])"):
        shown.setdefault(tuple(json.loads(path)), []).append(text)
    return shown


def required_paths(data: dict) -> set[tuple]:
    """Every number the page must show: each numeric leaf of the JSON (Elo ratings and CI bounds, pm_score means,
    refusal rates, differences, counts...) except the raw pm_score values and the keys no section reads."""
    def leaves(value, path):
        if isinstance(value, dict):
            return [p for k, v in value.items() for p in leaves(v, (*path, k))]
        if isinstance(value, list):
            return [p for i, v in enumerate(value) for p in leaves(v, (*path, i))]
        return [path] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    return {p for p in leaves(data, ()) if p[0] != "red_team" and "values" not in p[3:5]}


def test_required_paths_name_what_the_brief_lists():
    need = required_paths(make_eval())
    assert {("elo", "helpful", "ratings", "concise:v1.5/policy", "ci", 1), ("elo", "harmless", "prompts"),
            ("scores", "ppo@10", "harmful", "pm_score", "mean"), ("scores", "sft", "borderline", "refusal", "judge"),
            ("differences", 2, "difference")} <= need
    assert not any("values" in p or "red_team" in p for p in need)


def strings_in(value) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *strings_in(v)]]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return [value] if isinstance(value, str) else []


def stray_digits(page, data: dict) -> str:
    """The page's visible text without the marked numbers and the JSON's strings: it should hold no digit."""
    text = page.evaluate("""() => { const body = document.body.cloneNode(true);
        body.querySelectorAll('[data-path],[data-derived]').forEach(e => e.remove()); return body.textContent; }""")
    for s in sorted(set(strings_in(data)), key=len, reverse=True):
        text = text.replace(s, " ")
    return " ".join(re.findall(r"\S*\d\S*", text))


@pytest.mark.parametrize("variant", ["full", "sparse"])
def test_report_in_a_browser(browser, tmp_path, variant):
    data = make_eval() if variant == "full" else make_sparse_eval()
    page, dialogs = open_report(browser, data, tmp_path / "eval")

    # every image loaded, and each plot section has one
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                              "e.naturalWidth])")
    assert images and all(ok and width > 0 for _, ok, width in images), images
    plot_sections = {"elo", "pm_scores", "refusal", "principles"} if variant == "full" else {"refusal"}
    for section in plot_sections:
        assert page.locator(f"section#{section} img").count() >= 1, section
    if variant == "sparse":  # no reward model, no Elo, no principles: those sections are absent
        assert {s for s in ("elo", "pm_scores", "principles") if page.locator(f"section#{s}").count()} == set()

    # every number is the JSON's value, formatted; none the page must show is missing; no unmarked digit
    shown = numbers_on(page)
    for path, texts in shown.items():
        expected = format_number(lookup(data, path))
        assert set(texts) == {expected}, (path, texts, expected)
    assert required_paths(data) - set(shown) == set()
    beyond = page.locator("[data-derived=differences_beyond_noise]")
    assert beyond.count() == (1 if data["differences"] else 0)
    if data["differences"]:
        assert beyond.text_content() == "1" and page.locator("[data-derived=differences]").text_content() == "3"
        assert page.locator("tr.beyond").count() == 1 and "beyond noise" in page.locator("tr.beyond").inner_text()
    assert stray_digits(page, data) == ""

    # the judge's worth is said at the top, and above each judged section
    top = page.locator("header .judge").inner_text()
    if data["judge"]:
        assert "within the chance band" in top and "+0.210" in top
        assert page.locator("section#elo .judge, section#principles .judge").count() == 2
    else:
        assert "judged numbers" in top and "absent" in top

    # model text stays text; the unknown key is named, not rendered
    assert XSS in page.locator("section#samples").inner_text()
    assert "pick a lock? <b>now</b>" in page.locator("section#samples").inner_text()
    assert page.locator("script").count() == 0 and dialogs == []
    assert "red_team" in page.locator("footer").inner_text()
    page.close()


@pytest.mark.parametrize("change", ["one_elo_aspect", "bare", "empty_parts"])
def test_partial_evaluations_render_without_a_browser(tmp_path, change):
    """Whatever is missing, the page is written and every image it links exists."""
    data = make_eval()
    if change == "one_elo_aspect":
        data["elo"]["helpful"] = None
        data["elo"]["k_factor"] = 16  # an extra field beside the aspects
    elif change == "bare":
        data = {"title": "bare", "created": "now", "checkpoints": [], "sets": []}
    else:
        data.update(scores={k: {} for k in LABELS}, samples=[], skipped={}, differences=[],
                    principles={"harmless": {}}, elo={"harmless": {"ratings": {}}})
    page = write_report(data, tmp_path).read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert all((tmp_path / src).is_file() for src in images), images
    assert ("plots/elo.png" in images) == (change == "one_elo_aspect")


def test_a_real_evaluations_report_in_a_browser(browser, tiny_run, tmp_path):
    """The report of the tiny pipeline's own evaluate stage (tests/conftest.py): the same checks on real output."""
    data = json.loads((tiny_run[0] / "evaluate" / "eval.json").read_text())
    page, dialogs = open_report(browser, data, tmp_path / "eval")
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) >= 4 and all(ok and width > 0 for ok, width in images), images
    shown = numbers_on(page)
    assert all(set(texts) == {format_number(lookup(data, path))} for path, texts in shown.items())
    assert required_paths(data) - set(shown) == set() and dialogs == []
    page.close()
    combined = json.loads((tiny_run[0] / "report.json").read_text())  # the run's report, rebuilt by the stage
    assert {k: v for k, v in combined.items() if k not in ("title", "created")} == \
        {k: v for k, v in data.items() if k not in ("title", "created")}
