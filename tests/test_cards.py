"""Model and dataset cards: rendering (quick, on hand-made folders) and a whole tiny run's outputs, each JSONL file
loaded by `datasets`, each model folder by transformers, each card's front matter parsed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cai.cards import (ConstitutionRef, DataFile, ModelCard, column_types, hub_model, trl_format, write_dataset_card,
                       write_snapshot_cards)
from cai.constitution import load_constitution

from .conftest import REPO

CONSTITUTION = load_constitution(REPO / "constitutions/default.yaml")
REF = ConstitutionRef.of(CONSTITUTION, "constitutions/default.yaml")


def read_card(path: Path) -> tuple[dict, str]:
    """README.md -> (front matter, body); asserts the Hub's layout (a YAML block between --- lines, first)."""
    head, front, body = path.read_text().split("---\n", 2)
    assert head == ""
    return yaml.safe_load(front), body


def load_json_rows(path: Path, cache: Path):
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


def card(**kw) -> ModelCard:
    fields = dict(stage="sft", run="r", base_model="smollm2-135m-instruct", fine_tuned_from="smollm2-135m-instruct",
                  constitution=REF, data=(DataFile("critique_revise", "sft.jsonl", 32),),
                  settings={"sft": {"helpful_ratio": 0.5, "train": {"workers": 2}}, "seed": 0},
                  metrics={"train_loss": 1.23456, "steps": 8})
    return ModelCard(**{**fields, **kw})


def test_the_constitution_hash_covers_every_part_and_nothing_else():
    edited = CONSTITUTION.model_copy(update={"preference": [
        CONSTITUTION.preference[0].model_copy(update={"question": "Which is kinder?"}), *CONSTITUTION.preference[1:]]})
    assert len(REF.hash) == 16 and ConstitutionRef.of(CONSTITUTION, "elsewhere.yaml").hash == REF.hash
    assert ConstitutionRef.of(edited, "x").hash != REF.hash
    assert REF.hash != CONSTITUTION.part_hash("critique_revision", "few_shot_revisions")  # not one stage's parts


def test_a_model_card_has_the_hubs_front_matter_and_the_runs_facts(tmp_path):
    (tmp_path / "README.md").write_text(card().render())
    meta, body = read_card(tmp_path / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert {"cai", "constitutional-ai", "sft", "trl"} <= set(meta["tags"])
    assert meta["datasets"] == ["../../critique_revise"]  # the stage folder, from the model folder
    assert meta["cai"]["constitution"] == {"name": "default", "hash": REF.hash, "path": "constitutions/default.yaml"}
    assert meta["cai"]["base_model"] == "smollm2-135m-instruct" and "step" not in meta["cai"]
    assert "| `critique_revise/sft.jsonl` | 32 |" in body and "| train_loss | 1.235 |" in body
    settings = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(settings) == card().settings
    # a local folder is no Hub id: named in the body and under `cai`, never as the Hub's base_model
    local = card(stage="reward_model", base_model=str(tmp_path), fine_tuned_from="sft/model", head="reward_model")
    meta, body = read_card(_write(tmp_path / "rm", local.render()))
    assert "base_model" not in meta and "license" not in meta and meta["cai"]["base_model"] == str(tmp_path)
    assert meta["pipeline_tag"] == "text-classification" and "AutoModelForSequenceClassification" in body
    assert f"`{tmp_path}`" in body and "`sft/model` (in this run's folder)" in body


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text)
    return folder / "README.md"


def test_hub_ids_and_licenses_are_named_only_when_known(tmp_path):
    assert hub_model("smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert hub_model("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert hub_model(str(tmp_path)) == (None, None) and hub_model("runs/x/sft/model") == (None, None)
    assert DataFile.of(tmp_path, "ppo", "missing.jsonl") is None  # a card never fails a stage


@pytest.mark.parametrize("rows, expected", [
    ([{"id": "a", "prompt": "Hi", "source": "builtin:red_team"}], "standard prompt-only (`prompt`)"),
    ([{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}],
       "finished": False}], "conversational prompt-completion (`prompt`, `completion`)"),
    ([{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "a"}],
       "rejected": [{"role": "assistant", "content": "b"}], "p_chosen": 0.7}],
     "conversational preference (`prompt`, `chosen`, `rejected`)"),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}],
     "conversational language modeling (`messages`)"),
    ([{"input_ids": [1, 2], "completion_mask": [0, 1]}], "tokenised prompt-completion (`input_ids`, `completion_mask`)"),
    ([{"chosen": [1, 2], "rejected": [3], "p": 0.6}], None),       # token ids: the reward model's own form
    ([{"id": "a", "prompt": "Hi", "initial": "x", "rounds": []}], None),  # a trace is not prompt-only data
])
def test_files_are_named_in_trls_dataset_vocabulary(tmp_path, rows, expected):
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trl_format(column_types(path)) == expected


def test_a_stage_folder_gets_a_dataset_card_that_datasets_reads(tmp_path):
    import datasets

    stage = tmp_path / "preferences"
    stage.mkdir()
    conv = [{"role": "user", "content": "Hi"}]
    prefs = [{"prompt": conv, "chosen": [{"role": "assistant", "content": f"a{i}"}], "p_chosen": 0.5 + i / 10,
              "rejected": [{"role": "assistant", "content": "b"}], "principle": None if i else "p1",
              "logprobs": [] if i else [[-1.0, -2.0]]} for i in range(3)]
    (stage / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (stage / "steps.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n')
    (stage / "notes.json").write_text("{}")  # not a JSONL file: not in the card
    assert write_dataset_card(stage, "preferences", "r", REF, {"seed": 0}, {"pairs": 3})
    meta, body = read_card(stage / "README.md")
    assert [c["config_name"] for c in meta["configs"]] == ["preferences", "steps"]
    assert meta["cai"]["rows"] == {"preferences.jsonl": 3, "steps.jsonl": 2} and REF.hash in body
    assert "conversational preference (`prompt`, `chosen`, `rejected`)" in body
    assert "| `principle` | string (nullable) | the preference principle the label was asked under |" in body
    assert "| `logprobs` | list[list[float]] |" in body  # the empty list of one row does not widen the type
    datasets.disable_progress_bars()
    got = datasets.load_dataset(str(stage), "preferences", split="train", cache_dir=str(tmp_path / "cache"))
    assert got.num_rows == 3 and got[0]["chosen"][0]["content"] == "a0"
    assert not write_dataset_card(tmp_path / "empty", "evaluate", "r", REF, {}, {})  # no JSONL, no card


def test_model_commit_writes_the_card_inside_before_the_rename(tiny_model, tmp_path):
    from cai.errors import CaiError
    from cai.models import commit_model

    tmp, final = tmp_path / "model.tmp", tmp_path / "model"
    shutil.copytree(tiny_model, tmp)
    (tmp / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(CaiError, match="does not load"):
        commit_model(tmp, final, card=card())
    assert not (tmp / "README.md").exists() and not final.exists()  # nothing written for a model that fails
    shutil.rmtree(tmp)
    shutil.copytree(tiny_model, tmp)
    commit_model(tmp, final, card=card())
    assert read_card(final / "README.md")[0]["cai"]["stage"] == "sft" and not tmp.exists()


def test_each_ppo_snapshot_gets_its_steps_numbers(tmp_path):
    records = [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "response_length": 8.0, "eos_rate": 0.0}
               for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for step in (2, 4):
        (tmp_path / "snapshots" / f"step-{step:06d}").mkdir(parents=True)
    ppo = card(stage="ppo", fine_tuned_from="sft/model", metrics={"last_reward_mean": 0.4})
    assert write_snapshot_cards(tmp_path, ppo) == 2
    meta, body = read_card(tmp_path / "snapshots" / "step-000002" / "README.md")
    assert meta["cai"]["step"] == 2 and meta["datasets"] == ["../../../critique_revise"]
    assert "# r: ppo after 2 steps" in body and "| reward_mean | 0.2 |" in body and "| kl | 0.02 |" in body


# what each file must hold, beyond loading (the whole tiny run: tests/conftest.py, tiny_run)
COLUMNS = {
    "prompts/red_team.jsonl": {"id", "prompt", "source"}, "prompts/helpful.jsonl": {"id", "prompt", "source"},
    "critique_revise/trace.jsonl": {"id", "prompt", "initial", "rounds", "constitution"},
    "critique_revise/sft.jsonl": {"prompt", "completion"}, "sft/train.jsonl": {"prompt", "completion"},
    "sft/train_ids.jsonl": {"input_ids", "completion_mask"},
    "preferences/preferences.jsonl": {"prompt", "chosen", "rejected", "p_chosen"},
    "reward_model/train.jsonl": {"chosen", "rejected", "p"}, "ppo/metrics.jsonl": {"step", "reward_mean", "kl"},
    "evaluate/answers.jsonl": {"checkpoint", "set", "prompt", "answer", "pm_score", "p_refuse"},
}


@pytest.mark.slow
def test_a_tiny_runs_files_load_and_every_card_names_its_constitution_and_base(tiny_model, tiny_run, tmp_path):
    from datasets import Json
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai.config import active_stages, load_pipeline
    from cai.runner import read_json, stage_keys

    run, _ = tiny_run
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"policy.name={tiny_model}", f"output_dir={run}"])
    keys = stage_keys(cfg, CONSTITUTION)
    for name in active_stages(cfg):
        folder = run / name
        assert read_json(folder / "_COMPLETE.json")["key"] == keys[name]  # cards are no part of a cache key
        meta, body = read_card(folder / "README.md")
        assert meta["cai"]["constitution"]["hash"] == REF.hash and REF.hash in body
        files = sorted(folder.glob("*.jsonl"))
        assert files and {c["config_name"] for c in meta["configs"]} == {f.stem for f in files}
        for path in files:
            rows = load_json_rows(path, tmp_path / "cache")
            lines = len(path.read_text().splitlines())
            assert rows.num_rows == lines == meta["cai"]["rows"][path.name] > 0, path
            assert not [c for c, f in rows.features.items() if isinstance(f, Json)], path  # one type per column
            assert COLUMNS.get(f"{name}/{path.name}", set()) <= set(rows.column_names), path
    snapshot = run / "ppo" / "snapshots" / "step-000002"
    models = {"sft": run / "sft" / "model", "reward_model": run / "reward_model" / "model",
              "ppo": run / "ppo" / "model", "ppo@2": snapshot}
    for label, folder in models.items():
        loader = AutoModelForSequenceClassification if label == "reward_model" else AutoModelForCausalLM
        assert loader.from_pretrained(folder).num_parameters() > 0
        meta, body = read_card(folder / "README.md")
        assert meta["library_name"] == "transformers" and {"cai", "constitutional-ai"} <= set(meta["tags"])
        assert meta["cai"]["base_model"] == str(tiny_model) and "base_model" not in meta  # a folder: no Hub id
        assert meta["cai"]["fine_tuned_from"] == (str(tiny_model) if label == "sft" else "sft/model")
        assert meta["cai"]["constitution"]["hash"] == REF.hash and REF.hash in body
    headline = {"sft": "| train_loss |", "reward_model": "| eval_agreement |", "ppo": "| last_kl |", "ppo@2": "| kl |"}
    for label, row in headline.items():
        assert row in read_card(models[label] / "README.md")[1], label
    step2 = next(m for m in map(json.loads, (run / "ppo" / "metrics.jsonl").read_text().splitlines()) if m["step"] == 2)
    assert f"| reward_mean | {step2['reward_mean']:.4g} |" in read_card(snapshot / "README.md")[1]
