"""End to end: the real `cai` CLI on pipelines/tiny.yaml under a real local Ray."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.config import load_pipeline
from cai.constitution import load_constitution
from cai.runner import stage_keys
from cai.shards import read_jsonl

from .conftest import REPO, cai, error_line, kill_tree

pytestmark = pytest.mark.slow


def tiny_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "pipelines/tiny.yaml", f"policy.name={model}", f"output_dir={out}", *extra]


def rows(out: Path, stage: str, name: str) -> list[dict]:
    return read_jsonl(out / stage / name)


def test_tiny_pipeline_end_to_end_then_cached(tiny_model, tiny_upstream, tiny_run, tmp_path):
    """The whole pipeline: the shared upstream run (prompts to reward_model, by the same command), then `cai run`
    once more, which finds those stages current and runs ppo and evaluate (tests/test_evaluate.py reads the
    evaluation)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run[0], out)
    first, rest = (tiny_upstream.parent / "stderr.txt").read_text(), tiny_run[1]
    assert rest.count("up to date") == 5 and "▶ ppo" in rest and "▶ evaluate" in rest
    red = rows(out, "prompts", "red_team.jsonl")
    assert len(red) == 6 + 3 and sum(r["source"] == "generated" for r in red) == 3
    trace = rows(out, "critique_revise", "trace.jsonl")
    assert [t["id"] for t in trace] == [r["id"] for r in red]
    assert all(len(t["rounds"]) == 2 for t in trace)
    default = load_constitution(REPO / "constitutions/default.yaml")
    ids = {p.id for p in default.critique_revision}
    assert all(r["principle"] in ids and r["critique_request"] == default.principle(r["principle"]).critique
               for t in trace for r in t["rounds"])
    assert {t["constitution"]["name"] for t in trace} == {"default"} and {t["seed"] for t in trace} == {0}
    sft = rows(out, "critique_revise", "sft.jsonl")
    summary = json.loads((out / "critique_revise" / "_COMPLETE.json").read_text())["summary"]
    assert len(sft) == summary["sft_rows"] == 9 * 2 + 7 * 2 - summary["empty_dropped"]
    kept = summary["unfinished_kept"]  # the tiny model rarely ends a turn in 8 tokens; tiny.yaml keeps them
    assert kept == sum(not r["finished"] for r in sft) > 0
    system = {"role": "system", "content": "You are a careful, honest assistant."}
    assert set(sft[0]) == {"prompt", "completion", "finished"} and sft[0]["prompt"] == [system, sft[0]["prompt"][1]]
    assert sft[0]["prompt"][1]["role"] == "user"
    # sft: an HF checkpoint that loads, trained on revisions + helpfulness rows
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert AutoModelForCausalLM.from_pretrained(out / "sft" / "model").num_parameters() > 0
    sft_summary = json.loads((out / "sft" / "_COMPLETE.json").read_text())["summary"]
    assert sft_summary["rows"] == len(rows(out, "sft", "train.jsonl")) > 0 and sft_summary["steps"] >= 1
    for stage in ("sft", "reward_model", "ppo"):  # the precision the worker decided is on record (tiny.yaml: fp32)
        assert json.loads((out / stage / "_COMPLETE.json").read_text())["summary"]["bf16"] is False, stage
    # preferences: trl preference rows with soft labels; the judge check is reported
    prefs = rows(out, "preferences", "preferences.jsonl")
    assert prefs and all(0.5 <= r["p_chosen"] <= 1 and r["chosen"][0]["role"] == "assistant" for r in prefs)
    assert all(r["prompt"][0] == system and {"chosen_finished", "rejected_finished"} <= set(r) for r in prefs)
    assert {r["aspect"] for r in prefs} == {"harmless", "helpful"}
    assert all(len(r["p_a"]) == 2 and len(r["logprobs"]) == 2 for r in prefs)  # both orders
    judge = json.loads((out / "preferences" / "judge_check.json").read_text())
    assert judge["pairs"] >= 150 and 0 <= judge["accuracy"] <= 1
    assert "JUDGE NEAR CHANCE" in first  # a random judge must be called out
    # reward_model: a scalar-head checkpoint with its normalisation stats
    rm = AutoModelForSequenceClassification.from_pretrained(out / "reward_model" / "model")
    assert rm.config.num_labels == 1
    card = json.loads((out / "reward_model" / "model" / "reward_stats.json").read_text())
    assert set(card) == {"max_length", "dtype", "mean", "std"} and card["dtype"] == "float32"
    # ppo: the policy after a few PPO steps, with metrics per step
    ppo_rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ppo_rows] == [1, 2, 3, 4] and (out / "ppo" / "model" / "config.json").exists()
    assert (out / "ppo" / "snapshots" / "step-000002" / "model.safetensors").exists()  # keep_snapshots_every: 2
    assert not list((out / "ppo" / "snapshots").glob("step-00000[134]*"))
    status = cai("status", str(out)).stdout
    assert status.count("done in") == 7 and "dpo" in status
    # unchanged config: every stage skipped, outputs untouched
    mtime = (out / "critique_revise" / "trace.jsonl").stat().st_mtime_ns
    again = cai(*tiny_args(tiny_model, out))
    assert again.stderr.count("up to date") == 7
    assert (out / "critique_revise" / "trace.jsonl").stat().st_mtime_ns == mtime
    # last_round: only the last revision per prompt goes to SFT; prompts stays cached
    last = cai(*tiny_args(tiny_model, out, "critique_revise.train_on=last_round"), "--stages",
               "prompts,critique_revise")
    assert "prompts: up to date" in last.stderr
    assert len(rows(out, "critique_revise", "sft_revisions.jsonl")) <= 9
    assert "partial" not in cai("status", str(out)).stdout


def test_cache_key_moves_with_critique_principle_not_preference(tmp_path):
    import yaml

    base = yaml.safe_load((REPO / "constitutions/default.yaml").read_text())
    pref, crit = yaml.safe_load(yaml.safe_dump(base)), yaml.safe_load(yaml.safe_dump(base))
    pref["preference"][0]["question"] += " Think carefully."
    crit["critique_revision"][0]["critique"] += " Read it twice."
    variants = {name: yaml.safe_dump(v) for name, v in (("base", base), ("pref", pref), ("crit", crit))}
    keys = {}
    for name, body in variants.items():
        (tmp_path / f"{name}.yaml").write_text(body)
        cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"constitution={tmp_path / name}.yaml"])
        keys[name] = stage_keys(cfg, load_constitution(cfg.constitution))
    for stage in ("prompts", "critique_revise", "sft"):  # a preference edit reruns only what reads it
        assert keys["pref"][stage] == keys["base"][stage]
    for stage in ("preferences", "reward_model"):
        assert keys["pref"][stage] != keys["base"][stage]
    assert keys["crit"]["critique_revise"] != keys["base"]["critique_revise"]
    assert keys["crit"]["prompts"] == keys["base"]["prompts"]
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", ["critique_revise.rounds=3"])
    assert stage_keys(cfg, load_constitution(cfg.constitution))["critique_revise"] != keys["base"]["critique_revise"]


@pytest.mark.parametrize("override, expected", [
    ("critique_revise.rounds=x", "key 'critique_revise.rounds': Input should be a valid integer"),
    ("critique_revise.bogus=1", "key 'critique_revise.bogus': unknown key"),
    ("policy.name=/nonexistent/model", "model '/nonexistent/model': no such folder"),
    ("constitution=/nonexistent.yaml", "/nonexistent.yaml: file not found"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model, tmp_path, override, expected):
    out = tmp_path / "run"
    proc = cai(*tiny_args(tiny_model, out, override), check=False)
    assert expected in error_line(proc)
    assert not (out / "critique_revise" / "_COMPLETE.json").exists()


def test_bad_prompt_file_and_foreign_output_dir(tiny_model, tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"text": "no prompt column"}\n')
    out = tmp_path / "run"
    line = error_line(cai(*tiny_args(tiny_model, out, f"prompts.red_team=[{{path: {bad}}}]"), check=False))
    assert "p.jsonl:1: no column 'prompt'" in line
    assert not (out / "prompts").exists()  # read before Ray starts and any stage begins
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not a cai run's outputs" in error_line(cai(*tiny_args(tiny_model, foreign), check=False))
    other = tmp_path / "other"
    other.mkdir()
    (other / "cai-run.json").write_text('{"name": "someone-else"}')
    assert "outputs of run 'someone-else'" in error_line(cai(*tiny_args(tiny_model, other), check=False))


def test_sigkill_mid_generation_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    """Kill a real `cai run` (and its Ray processes) mid-stage; the rerun keeps committed shards and
    produces exactly the rows of a run that was never interrupted."""
    extra = ["prompts.max_red_team=8", "prompts.expand.new_prompts=0", "critique_revise.shard_size=1",
             "critique_revise.generation.max_new_tokens=24", "--stages", "prompts,critique_revise"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    cai(*tiny_args(tiny_model, clean, *extra))
    env = {**os.environ}
    env.pop("CAI_RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *tiny_args(tiny_model, killed, *extra)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shards = killed / "critique_revise" / "shards" / "red_team"
    deadline = time.time() + 240
    while len(list(shards.glob("shard-*.jsonl"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc)
    committed = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.jsonl")}
    assert 3 <= len(committed) < 8, "the kill must land mid-stage"
    assert not (killed / "critique_revise" / "_COMPLETE.json").exists()
    assert "partial (" in cai("status", str(killed)).stdout
    resumed = cai(*tiny_args(tiny_model, killed, *extra))
    assert "resuming" in resumed.stderr
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.jsonl") if p.name in committed} == committed
    for name in ("trace.jsonl", "sft.jsonl"):
        assert rows(killed, "critique_revise", name) == rows(clean, "critique_revise", name)


def test_status_counts_only_planned_shards(tmp_path):
    """Stages write helper shards too (judge check, attribution): 'partial' counts the planned ones."""
    from cai.runner import stage_status
    from cai.shards import write_atomic

    stage = tmp_path / "preferences"
    write_atomic(stage / "_STARTED.json", json.dumps({"key": "k", "shards": {"responses_red_team": 3}}))
    for part, n in (("responses_red_team", 2), ("judge_check", 5)):
        for i in range(n):
            write_atomic(stage / "shards" / part / f"shard-{i:05d}.jsonl", "")
    assert dict(stage_status(tmp_path))["preferences"] == "partial (2 of 3 shards)"
