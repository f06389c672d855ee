"""`cai plan`: the ingredient diff (pure), the plan of a run folder, the printed lines, and on a real tiny run."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.config import load_pipeline
from cai.constitution import load_constitution
from cai.plan import (ABSENT, PREDATES, StagePlan, differences, explain, format_plan, plan_pipeline,
                      refusals)
from cai.runner import (MARKER, STARTED, claim_output_dir, reads, record_pipeline, stage, stage_ingredients,
                        stage_keys, stage_status, upstream)
from cai.shards import write_atomic
from cai.stages import ORDER

from .conftest import REPO, cai

SFT = {"settings": {"sft": {"train": {"learning_rate": 2e-05, "epochs": 1}}, "seed": 0},
       "models": {"base_model": "m"}, "constitution": None,
       "inputs": {"critique_revise": {"stage": "critique_revise", "key": "k1"}}}
PREF = {"settings": {"seed": 0}, "models": {}, "constitution": {"file": "constitutions/default.yaml", "parts": {
    "preference": "p1", "few_shot_labels": "f1"}}, "inputs": {"sft": {"stage": "sft", "key": "s1"}}}


def changed(base: dict, **parts) -> dict:
    return json.loads(json.dumps({**base, **parts}))


# -- explain: recorded ingredients, current ingredients -> lines -------------------------------------------
def test_explain_names_the_changed_setting_with_both_values():
    now = changed(SFT, settings={"sft": {"train": {"learning_rate": 1e-05, "epochs": 1}}, "seed": 0})
    assert explain(SFT, now, set()) == ["sft.train.learning_rate 2e-05 -> 1e-05"]
    now = changed(SFT, settings={"sft": {"train": {"learning_rate": 2e-05}}, "seed": 1, "extra": "x" * 60})
    assert explain(SFT, now, set()) == ["sft.train.epochs 1 -> (absent)", "seed 0 -> 1",
                                        f'extra (absent) -> "{"x" * 13}...{"x" * 22}"']
    assert explain(SFT, changed(SFT, models={"base_model": "other"}), set()) == ['model base_model "m" -> "other"']
    assert explain(SFT, changed(SFT), set()) == ["changed (cause not recorded)"]  # same ingredients, other key


def test_differences_pair_items_of_lists_and_dicts_and_name_a_model_once():
    before = {"p": {"red_team": [{"path": "a"}], "fb": None}, "policy": {"name": "m1"}}
    after = {"p": {"red_team": [{"path": "b"}, {"path": "c"}], "fb": {"name": "x"}}, "policy": {"name": "m2"}}
    assert differences(before, after) == [("p.red_team.0.path", "a", "b"), ("p.red_team.1", ABSENT, {"path": "c"}),
                                          ("p.fb", None, {"name": "x"}), ("policy.name", "m1", "m2")]
    now = changed(SFT, settings={**SFT["settings"], "policy": {"name": "other"}}, models={"base_model": "other"})
    assert explain({**SFT, "settings": {**SFT["settings"], "policy": {"name": "m"}}}, now, set()) == [
        'policy.name "m" -> "other"']


def test_explain_names_the_constitution_part_and_file():
    now = changed(PREF, constitution={"file": "runs/x/edited.yaml", "parts": {"preference": "p2",
                                                                              "few_shot_labels": "f1"}})
    assert explain(PREF, now, set()) == ["constitution preference principles changed (edited.yaml)"]
    moved = changed(PREF, constitution={"file": "other.yaml", "parts": PREF["constitution"]["parts"]})
    assert explain(PREF, moved, set()) == ["changed (cause not recorded)"]  # the file's path is not in the key


def test_explain_tells_an_upstream_rerun_from_one_done_already():
    now = changed(PREF, inputs={"sft": {"stage": "sft", "key": "s2"}})
    assert explain(PREF, now, {"sft"}) == ["upstream sft will rerun"]
    assert explain(PREF, now, set()) == ["upstream sft changed since this stage ran"]
    before = {**PREF, "inputs": {"policy": {"stage": "ppo", "key": "a"}}}
    after = {**PREF, "inputs": {"policy": {"stage": "dpo", "key": "b"}, "sft": {"stage": "sft", "key": "s"}}}
    assert explain(before, after, set()) == ["input policy: ppo -> dpo", "new input: sft"]


def test_explain_of_a_marker_without_ingredients():
    assert explain(None, PREF, set()) == [PREDATES]
    assert explain(None, PREF, {"sft"}) == ["upstream sft will rerun"]


def test_format_plan_lines(tmp_path):
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"output_dir={tmp_path}"])
    text = format_plan(cfg, [StagePlan("prompts", "up to date"),
                             StagePlan("critique_revise", "partial", ("3 of 8 shards committed",), True),
                             StagePlan("sft", "stale", ("a 1 -> 2", "b 3 -> 4"), True),
                             StagePlan("dpo", "not used", ("this pipeline trains with ppo",))])
    assert text.splitlines()[1:] == [
        "prompts          up to date",
        "critique_revise  partial: 3 of 8 shards committed",
        "sft              stale: a 1 -> 2",
        "                        b 3 -> 4",
        "dpo              not used (this pipeline trains with ppo)",
        "would run 2 stages: critique_revise, sft"]


# -- keys: exactly as before ingredients were recorded -------------------------------------------------------
@pytest.mark.parametrize("pipeline, overrides", [("tiny", []), ("default", ["policy_optimization=dpo"]),
                                                 ("default", ["evaluate.checkpoints=[base,sft,policy]"])])
def test_keys_are_the_formula_that_earlier_runs_were_keyed_with(pipeline, overrides):
    cfg = load_pipeline(REPO / f"pipelines/{pipeline}.yaml", overrides)
    constitution = load_constitution(cfg.constitution)
    keys: dict[str, str] = {}
    for name in ORDER:  # the formula as written before this change, kept here so that a change to it fails
        s = stage(name)
        blob = json.dumps({"stage": name, "settings": s.settings(cfg), "models": s.models(cfg),
                           "constitution": constitution.part_hash(*parts) if (parts := reads(cfg, name).constitution)
                           else None,
                           "inputs": {read: keys.get(src) for read, src in upstream(cfg, name).items()}},
                          sort_keys=True)
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert stage_keys(cfg, constitution) == keys


# -- a run folder's markers -> the plan ----------------------------------------------------------------------
def fake_run(out: Path, overrides: list[str], stages: tuple[str, ...]) -> None:
    """Markers as `cai run` writes them for `stages`, without running anything."""
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"output_dir={out}", *overrides])
    keys, ingredients = stage_ingredients(cfg, load_constitution(cfg.constitution))
    claim_output_dir(out, cfg.name)
    for name in stages:
        marker = {"key": keys[name], "summary": {}, "seconds": 1.0, "ingredients": ingredients[name]}
        write_atomic(out / name / STARTED, json.dumps({"key": keys[name], "shards": {},
                                                       "ingredients": ingredients[name]}))
        write_atomic(out / name / MARKER, json.dumps(marker))
    record_pipeline(out, cfg)


def plan(out: Path, *overrides: str, only=None) -> dict[str, StagePlan]:
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"output_dir={out}", *overrides])
    return {p.name: p for p in plan_pipeline(cfg, only)}


def test_plan_of_a_run_folder(tmp_path):
    upstream_stages = ("prompts", "critique_revise", "sft", "preferences", "reward_model")
    fake_run(tmp_path, [], upstream_stages)
    p = plan(tmp_path)
    assert {n: p[n].state for n in ORDER} == {**{n: "up to date" for n in upstream_stages}, "ppo": "will run",
                                              "dpo": "not used", "evaluate": "will run"}
    p = plan(tmp_path, "sft.train.learning_rate=5e-4")
    assert p["sft"].reasons == ("sft.train.learning_rate 0.001 -> 0.0005",)
    assert p["preferences"].reasons == ("upstream sft will rerun",)
    assert p["reward_model"].reasons == ("upstream sft will rerun", "upstream preferences will rerun")
    assert p["critique_revise"].state == "up to date"
    p = plan(tmp_path, "policy_optimization=dpo")
    assert p["ppo"].reasons == ("this pipeline trains with dpo",) and p["dpo"].state == "will run"
    p = plan(tmp_path, "sft.train.learning_rate=5e-4", only=["preferences"])
    assert p["preferences"].state == "blocked" and "needs the current output of sft" in p["preferences"].reasons[0]


def test_plan_of_partial_and_old_markers(tmp_path):
    fake_run(tmp_path, [], ("prompts", "critique_revise"))
    stage_dir = tmp_path / "critique_revise"
    (stage_dir / MARKER).unlink()
    started = json.loads((stage_dir / STARTED).read_text())
    write_atomic(stage_dir / STARTED, json.dumps({**started, "shards": {"red_team": 5, "helpful": 3}}))
    for i in range(3):
        write_atomic(stage_dir / "shards" / "red_team" / f"shard-{i:05d}.jsonl", "")
    assert plan(tmp_path)["critique_revise"].reasons == ("3 of 8 shards committed",)
    p = plan(tmp_path, "critique_revise.rounds=3")["critique_revise"]
    assert p.state == "stale"
    assert p.reasons == ("critique_revise.rounds 2 -> 3", "its 3 committed shards will be discarded")
    old = "0123456789abcdef"  # markers as written before ingredients were recorded
    write_atomic(tmp_path / "prompts" / STARTED, json.dumps({"key": old, "shards": {}}))
    write_atomic(tmp_path / "prompts" / MARKER, json.dumps({"key": old, "summary": {}, "seconds": 1}))
    assert plan(tmp_path)["prompts"].reasons == (PREDATES,)


def test_refusals_known_before_any_model_loads(tmp_path):
    missing = REPO / "no-such-model"
    fake_run(tmp_path, [], ("prompts",))
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"output_dir={tmp_path}", "name=other",
                                                       f"policy.name={missing}"])
    assert refusals(cfg) == [f"{tmp_path} holds the outputs of run 'tiny'",
                             f"model '{missing}': no such folder"]
    assert "cai run would refuse: model" in format_plan(cfg, plan_pipeline(cfg), refusals(cfg)).splitlines()[2]
    cfg = load_pipeline(REPO / "pipelines/default.yaml", [f"output_dir={tmp_path / 'new'}"])
    assert refusals(cfg) == []  # the embedded model is not converted to be checked


def test_status_marks_stages_the_pipeline_does_not_use(tmp_path):
    fake_run(tmp_path, ["policy_optimization=dpo"], ("prompts",))
    status = dict(stage_status(tmp_path))
    assert status["ppo"] == "not used by this pipeline (it trains with dpo)"
    assert status["dpo"] == "not started" and status["prompts"].startswith("done")


# -- end to end: the real CLI on a real tiny run -------------------------------------------------------------
NO_RAY = ("import sys, time; from cai.cli import main; t = time.time(); rc = main(sys.argv[1:]); "
          "print('imported:', [m for m in ('ray', 'transformers', 'deepspeed') if m in sys.modules], "
          "round(time.time() - t, 2)); sys.exit(rc)")


def cai_plan(*args: str) -> dict[str, str]:
    """`cai plan` in a fresh interpreter -> stage -> its line; asserts it imported neither Ray nor a model library."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", NO_RAY, "plan", "pipelines/tiny.yaml", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 15 and "imported: []" in proc.stdout, proc.stdout
    return {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()[0] in ORDER}


@pytest.mark.slow
def test_cai_plan_on_a_finished_tiny_run(tiny_model, tiny_upstream, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out)
    base = [f"policy.name={tiny_model}", f"output_dir={out}"]
    lines = cai_plan(*base)  # the markers `cai run` wrote match the keys computed now
    for name in ("prompts", "critique_revise", "sft", "preferences", "reward_model"):
        assert lines[name].endswith(" up to date"), lines[name]
    assert lines["dpo"].endswith("not used (this pipeline trains with ppo)")
    lines = cai_plan(*base, "sft.train.learning_rate=5e-4")
    assert lines["sft"].endswith("stale: sft.train.learning_rate 0.001 -> 0.0005")
    assert lines["preferences"].endswith("stale: upstream sft will rerun")
    assert lines["reward_model"].endswith("stale: upstream sft will rerun")
    assert lines["critique_revise"].endswith(" up to date")
    import yaml

    edited = yaml.safe_load((REPO / "constitutions/default.yaml").read_text())
    edited["critique_revision"][0]["critique"] += " Read it twice."
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    lines = cai_plan(*base, f"constitution={tmp_path / 'edited.yaml'}")
    assert lines["critique_revise"].endswith("stale: constitution critique/revision principles changed (edited.yaml)")
    assert lines["sft"].endswith("stale: upstream critique_revise will rerun")
    assert lines["prompts"].endswith(" up to date")
    assert "dpo                not used by this pipeline (it trains with ppo)" in cai("status", str(out)).stdout
