"""The run's combined report (cai/report_run.py) and the ARCA section (cai/report_arca.py), on small hand-written
JSON files laid out as the commands commit them: every image loads, every number shown is report.json's value at
its data-path, each audit shows what its own page shows, and what is missing is simply absent. No model runs."""
from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path

from cai.report import SECTIONS, format_number, lookup, write_report
from cai.report_run import write_run_report

from .test_report import (  # noqa: F401
    XSS,
    browser,
    make_eval,
    numbers_on,
    required_paths,
    stray_digits,
)

ROUND = {"completions": 8, "unparsed": 1, "near_duplicates": 2, "attacks": 5, "judged": 5, "successes": 2,
         "success_rate": 0.4, "judge_harmful_rate": 0.6, "pm_harmful_rate": 0.2, "distinct_1": 0.71,
         "distinct_2": 0.93, "self_bleu": 0.125}


def make_redteam(adversarial: bool) -> dict:
    """redteam.json as cai/redteam.py's summarise writes it: two rounds, the input filter's figures when
    adversarial."""
    rounds = [{"round": r, "mode": mode, **ROUND, "seconds": {"round": 12.5 + r, "generation": 4.25}}
              for r, mode in enumerate(["zero-shot", "supervised" if adversarial else "few-shot"])]
    if adversarial:
        for r in rounds:
            r["adversarial"] = {"hard_set": {"accuracy": 0.75, "balanced_accuracy": 0.7, "true_positive_rate": 0.6,
                                             "true_negative_rate": 0.8, "attacks": 10, "harmless": 30},
                                "fresh_caught": 0.5 if r["round"] else None}
    return {"checkpoint": "policy", "target": "/runs/default/ppo/model", "red_model": "smollm2-135m-instruct",
            "judge": "smollm2-135m-instruct", "reward_model": None, "adversarial": adversarial, "rounds": rounds,
            "total": {**ROUND, "attacks": 10}, "successful": {"attacks": 4, "distinct_1": 0.5},
            "export": "/runs/default/audit/redteam/successful_attacks.jsonl",
            "filter": "/runs/default/audit/redteam/adversarial/filter-01" if adversarial else None,
            "examples": [{"id": "r0-3", "attack": XSS, "answer": "Sure: step one...", "p_harmful": 0.91, "pm": -1.5}]}


def make_mwe(behaviour: str) -> dict:
    """mwe.json as cai/mwe.py's results writes it (the page its own report renders, with its judge)."""
    score = {"n": 40, "skipped": 1, "matching_rate": 0.625, "matching_rate_ci": [0.475, 0.775], "mean_p_match": 0.58,
             "mean_p_match_ci": [0.51, 0.65], "mean_option_mass": 0.31,
             "by_answer": {" No": {"n": 20, "matching_rate": 0.3}, " Yes": {"n": 20, "matching_rate": 0.95}}}
    return {"title": f"cai mwe: {behaviour}", "created": "2026-12-01T10:00:00Z", "checkpoints": [],
            "judge": {"model": "j", "pairs": 3, "accuracy": 0.6667, "position_bias": None, "ece": None,
                      "chance_band": 0.577},
            "mwe": {"behaviour": behaviour, "description": "wants <b>power</b>", "probes_source": "generated",
                    "writer": "w", "judge": "j", "format": "chat", "confidence": 0.95,
                    "steps": {"writer_outputs": 128, "probes": 41}, "probes": 41,
                    "judge_check": {"examples": 4, "answered": 3, "correct": 2, "accuracy": 0.6667},
                    "probes_by_answer": {" No": 20, " Yes": 21}, "order": ["base", "policy"],
                    "scores": {"base": score, "policy": {**score, "matching_rate": 0.5}},
                    "differences": [{"from": "base", "to": "policy", "difference": -0.125, "ci": [-0.225, -0.025],
                                     "n": 40, "beyond_noise": True}], "seconds": {"scores": 3.5}}}


def make_arca() -> dict:
    """arca.json as cai/audit.py's arca_audit writes it: two methods, two restarts each."""
    runs = [{"method": m, "seed": s, "prompt": XSS if (m, s) == ("arca", 1) else f" word{s} ok", "prompt_ids": [1005,
             2024 + s, 1007], "objective": -0.8 - 2.5 * (m != "arca") - s, "success": m == "arca",
             "forwards": 97 if m == "arca" else 577, "steps": 2 + s, "seconds": 1.5}
            for m in ("arca", "random_search") for s in range(2)]
    return {"checkpoint": "/runs/default/ppo/model", "target": " the eagle has landed", "prefix": "", "chat": True,
            "prompt_tokens": 3, "budget_forwards": 600, "success_rate": {"arca": 1.0, "random_search": 0.0},
            "runs": runs}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))


def make_run(root: Path) -> Path:
    """A run folder holding eval.json and every kind of audit where the commands commit them, plus files the
    report must skip (a work folder, a folder being committed)."""
    write_json(root / "cai-run.json", {"name": "default", "created": 0})
    write_json(root / "evaluate" / "eval.json", make_eval())
    write_json(root / "audit" / "redteam" / "redteam.json", make_redteam(False))
    write_json(root / "audit" / "redteam" / "adversarial" / "redteam.json", make_redteam(True))
    for behaviour in ("power-seeking", "self.preservation"):
        write_json(root / "audit" / "mwe" / behaviour / "mwe.json", make_mwe(behaviour))
    write_json(root / "audit" / "mwe" / ".power-seeking.tmp42" / "mwe.json", {"broken": True})
    write_json(root / "audit" / "arca" / "arca.json", make_arca())
    return root


def marked(page: str) -> dict[tuple, str]:
    """{path: text} of the numbers on a page, read from its HTML."""
    return {tuple(json.loads(unescape(p))): unescape(t)
            for p, t in re.findall(r"<span data-path='([^']*)'>([^<]*)</span>", page)}


def own_page_paths(key: str, page: dict, tmp: Path) -> set[tuple]:
    return set(marked(write_report(page, tmp, [s for s in SECTIONS if s.key == key]).read_text()))


def test_arca_section_shows_every_number_of_arca_json(tmp_path):
    from cai.audit import write

    result = make_arca()
    write(result, tmp_path / "arca")  # arca.json and its page; no run around it, so no run report
    page = (tmp_path / "arca" / "report.html").read_text()
    data = {"arca": json.loads((tmp_path / "arca" / "arca.json").read_text())}
    shown = marked(page)
    assert all(text == format_number(lookup(data, path)) for path, text in shown.items())
    assert required_paths(data) == set(shown)  # seeds, forwards, objectives, token ids, rates, budget...
    assert ("arca", "runs", 2, "prompt_ids", 1) in shown and shown[("arca", "success_rate", "arca")] == "1.000"
    assert page.count('<tr class="beyond">') == 2  # the two restarts that emitted the target
    assert XSS not in page and unescape(re.sub(r"<[^>]+>", "", page)).count(XSS) == 1
    assert (tmp_path / "arca" / "plots" / "arca.png").stat().st_size > 1000 and 'src="plots/arca.png"' in page
    assert not (tmp_path / "report.html").exists()


def test_run_report_in_a_browser(browser, tmp_path):  # noqa: F811
    run = make_run(tmp_path / "run")
    page_path = write_run_report(run)
    data = json.loads((run / "report.json").read_text())
    assert page_path == run / "report.html" and not list(run.glob(".report.tmp*"))
    assert set(data["redteam"]) == {"redteam", "redteam/adversarial"} and data["arca"] == {"arca": make_arca()}
    assert set(data["mwe"]) == {"mwe/power-seeking", "mwe/self.preservation"}  # not the folder being committed
    assert {k: v for k, v in data.items() if k not in ("redteam", "mwe", "arca", "title", "created")} == {
        k: v for k, v in make_eval().items() if k not in ("title", "created")}

    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(page_path.as_uri())
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete, "
                                              "e.naturalWidth])")
    assert all(ok and width > 0 for _, ok, width in images), images
    srcs = [src for src, _, _ in images]
    assert len(set(srcs)) == len(srcs) and {"plots/mwe-power-seeking/mwe.png", "plots/mwe-self-preservation/mwe.png",
                                            "plots/arca/arca.png", "plots/elo.png"} <= set(srcs)
    for section in ("elo", "differences", "redteam", "mwe", "arca"):
        assert page.locator(f"section#{section}").count() == 1, section
    assert page.locator("section#redteam h3", has_text="audit/redteam/adversarial").count() == 1
    assert page.locator("footer").inner_text().count("red_team") == 1  # eval.json's unknown key, still named

    shown = numbers_on(page)
    for path, texts in shown.items():
        assert set(texts) == {format_number(lookup(data, path))}, (path, texts)
    audits = ("redteam", "mwe", "arca")
    assert {p for p in required_paths(data) if p[0] not in audits[:2]} - set(shown) == set()
    for key, make, whole in (("redteam", make_redteam, False), ("mwe", make_mwe, True)):  # as on its own page
        for rel, doc in data[key].items():
            own = own_page_paths(key, doc if whole else {key: doc}, tmp_path / "own" / rel)
            assert {(key, rel, *p[0 if whole else 1:]) for p in own} == {p for p in shown if p[:2] == (key, rel)}
            assert len(own) > 20, (key, rel)
    assert ("mwe", "mwe/power-seeking", "judge", "accuracy") in shown  # mwe's own judge, not eval's
    assert stray_digits(page, data) == ""
    assert page.locator("script").count() == 0 and dialogs == []
    assert page.locator("section#redteam").inner_text().count(XSS) == 2  # one attack in each run
    page.close()


def test_missing_parts_are_absent_and_each_rebuild_replaces_the_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert write_run_report(run) is None and not (run / "report.html").exists()

    write_json(run / "audit" / "arca" / "arca.json", make_arca())
    write_json(run / "audit" / "mwe" / "broken" / "mwe.json", {})
    (run / "audit" / "mwe" / "broken" / "mwe.json").write_text("{not json")
    page = write_run_report(run).read_text()
    assert set(json.loads((run / "report.json").read_text())) == {"title", "created", "arca", "mwe"}
    assert re.findall(r'<section id="([^"]+)"', page) == ["mwe", "arca"]  # no eval: no setup, no Elo
    assert "Not shown:" in page and "broken/mwe.json" in page
    assert sorted(p.relative_to(run / "plots").as_posix() for p in (run / "plots").rglob("*.png")) == ["arca/arca.png"]

    (run / "audit" / "arca" / "arca.json").unlink()
    write_json(run / "evaluate" / "eval.json", make_eval())
    page = write_run_report(run).read_text()
    assert "section id=\"arca\"" not in page and 'section id="elo"' in page
    assert not (run / "plots" / "arca").exists() and (run / "plots" / "elo.png").is_file()


def test_audits_rebuild_the_run_report_only_inside_its_audit_folder(tmp_path):
    from cai.report_run import update_run_report

    run = tmp_path / "run"
    write_json(run / "cai-run.json", {"name": "default", "created": 0})
    write_json(run / "audit" / "arca" / "arca.json", make_arca())
    assert update_run_report(tmp_path / "elsewhere", run) is None and not (run / "report.html").exists()
    assert update_run_report(run / "audit" / "redteam", run) == run / "report.html"
    (run / "report.html").unlink()
    assert update_run_report(run / "audit" / "arca") == run / "report.html"  # found by the run's cai-run.json
    (run / "cai-run.json").unlink()
    (run / "report.html").unlink()
    assert update_run_report(run / "audit" / "arca") is None and not (run / "report.html").exists()
