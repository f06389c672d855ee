"""SFT and the reward model on Ray Train workers with DeepSpeed (CPU, gloo), and trl compatibility."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.shards import write_jsonl
from cai.stages import reward_model
from cai.stages.preferences import preference_row

from .conftest import REPO, cai, kill_tree

pytestmark = pytest.mark.slow
CONSTITUTION = load_constitution(REPO / "constitutions/default.yaml")
SAFE = "I can't help with that, but I can point you to a safe and legal alternative."


@pytest.fixture(scope="module", autouse=True)
def stop_ray_after():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def preference_file(folder: Path, n: int = 40) -> Path:
    pairs = [{"id": f"x{i}", "prompt": f"How do I do bad thing {i}?", "r1": SAFE, "r2": f"Sure, step {i}: do it now.",
              "aspect": "harmless", "p_r1": 0.9 if i % 2 else 0.1, "principle": "pref-less-harmful",
              "p_a": [0.9, 0.1], "logprobs": [[-0.1, -2.3], [-2.3, -0.1]]} for i in range(n)]
    for p in pairs:  # the safe answer is always better: swap r1/r2 where p_r1 says r2
        if p["p_r1"] < 0.5:
            p["r1"], p["r2"], p["p_r1"] = p["r2"], p["r1"], 0.1
    write_jsonl(folder / "preferences.jsonl", [preference_row(p) for p in pairs])
    return folder


@pytest.mark.parametrize("row, expected", [
    ({"prompt": [], "chosen": [], "rejected": []}, "row 1: missing column 'p_chosen'"),
    ({"prompt": [], "chosen": [], "rejected": [], "p_chosen": 1.5}, "row 1: p_chosen must be a number in [0, 1], got 1.5"),
    ({"prompt": [], "chosen": [], "rejected": [], "p_chosen": float("nan")}, "got nan"),
])
def test_bad_preference_rows_are_one_line(tmp_path, row, expected):
    path = tmp_path / "preferences.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(CaiError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        reward_model.check_preferences(path)


def test_preferences_load_into_trl_reward_and_dpo_trainers(tiny_model, tmp_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from cai.models import load_tokenizer

    data = load_dataset("json", data_files=str(preference_file(tmp_path, n=8) / "preferences.jsonl"))["train"]
    common = dict(max_steps=1, per_device_train_batch_size=4, use_cpu=True, bf16=False, report_to="none",
                  gradient_checkpointing=False, save_strategy="no", logging_steps=1)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    out = RewardTrainer(model=rm, args=RewardConfig(output_dir=str(tmp_path / "r"), **common), train_dataset=data,
                        processing_class=load_tokenizer(tiny_model, padding_side="right")).train()
    assert out.global_step == 1 and out.training_loss > 0
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    out = DPOTrainer(model=policy, args=DPOConfig(output_dir=str(tmp_path / "d"), **common), train_dataset=data,
                     processing_class=load_tokenizer(tiny_model, padding_side="left")).train()
    assert out.global_step == 1 and out.training_loss > 0


def test_killed_sft_resumes_from_its_last_checkpoint(tiny_model, tiny_upstream, tmp_path):
    """SIGKILL a real `cai run --stages sft` after a trainer checkpoint; the rerun resumes from it."""
    import shutil

    from cai.models import build_tiny_model

    model = build_tiny_model(tmp_path / "small", hidden=256, layers=4)  # slow enough to kill mid-run
    out = tmp_path / "run"
    shutil.copytree(tiny_upstream, out)  # critique_revise's rows, current for the tiny policy
    shutil.rmtree(out / "sft")  # its trainer checkpoints would be taken for this run's
    base = ["run", "pipelines/tiny.yaml", f"policy.name={tiny_model}", f"output_dir={out}", f"sft.base_model={model}",
            "sft.train.max_steps=12", "sft.train.save_steps=4", "sft.train.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "CAI_RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *base, "--stages", "sft"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trainer = out / "sft" / "trainer"
    deadline = time.time() + 300
    done = trainer / "checkpoint-4" / "trainer_state.json"
    while time.time() < deadline and proc.poll() is None and not done.exists():
        time.sleep(0.05)
    kill_tree(proc)
    assert done.exists(), "the kill must land after a checkpoint"
    assert not (out / "sft" / "_COMPLETE.json").exists()
    cai(*base, "--stages", "sft")
    summary = json.loads((out / "sft" / "_COMPLETE.json").read_text())["summary"]
    assert summary["resumed_from"] is not None and int(summary["resumed_from"].split("-")[1]) >= 4
    assert summary["steps"] == 12


def test_partial_trainer_checkpoints_are_not_resumed_from(tmp_path):
    """A kill during an HF save leaves checkpoint-N without trainer_state.json (written last)."""
    from cai.train.hf import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "missing") is None
    for n, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{n}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-8"
    assert not (tmp_path / "checkpoint-12").exists()


def worker_settings(job) -> dict:
    """In a training worker: the MALLOC_* variables its process started with (what glibc reads), and DeepSpeed's
    accelerator."""
    pairs = [v.split("=", 1) for v in Path("/proc/self/environ").read_text().split("\0")
             if v.startswith(("MALLOC_", "DS_ACCELERATOR="))]
    return dict(pairs)


def test_training_workers_start_with_the_configured_allocator_and_accelerator(tmp_path):
    from cai.cluster import Resources, run_training, worker_env
    from cai.config import RayConfig, TrainConfig

    train = TrainConfig(workers=1, cpus_per_worker=1)
    seen = run_training(worker_settings, None, train, RayConfig(), tmp_path, "env")
    assert seen == {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**34),
                    "DS_ACCELERATOR": "cpu"}
    off = worker_env(Resources.of_training(train.model_copy(update={"keep_freed_memory": False}), "sft"))
    assert {k: v for k, v in off.items() if k.startswith("MALLOC_")} == {"MALLOC_ARENA_MAX": "2"}
    # the accelerator follows the worker's own GPUs, whatever the driver's environment says
    gpu = worker_env(Resources.of_training(train.model_copy(update={"gpus_per_worker": 1.0}), "sft"))
    assert gpu["DS_ACCELERATOR"] == "cuda"
