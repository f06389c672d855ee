"""PPO and DPO stages end to end on tiny models, under Ray Train with DeepSpeed on CPU."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cai.cluster import bf16_supported
from cai.config import load_pipeline
from cai.errors import CaiError
from cai.stages import ppo
from cai.stopping import STOPPED_EXIT_CODE

from .conftest import REPO, cai, kill_tree

pytestmark = pytest.mark.slow


def copy_run(upstream: Path, dest: Path) -> Path:
    shutil.copytree(upstream, dest)
    return dest


def args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "pipelines/tiny.yaml", f"policy.name={model}", f"output_dir={out}", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]


def expected_first_token_reward(model_dir: Path, prompts: list[str]) -> float:
    """E[mean_token_id] of the first response token under the model's full distribution, over `prompts`: the
    reward the policy expects, without the noise of sampling."""
    from transformers import AutoModelForCausalLM

    from cai.chat import generation_prompt_ids, user
    from cai.models import load_tokenizer

    tok, model = load_tokenizer(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reward_of = torch.arange(model.config.vocab_size, dtype=torch.float32) / 50_000
    with torch.no_grad():
        return sum((torch.softmax(model(torch.tensor([generation_prompt_ids(tok, [user(p)], None, 256)]))
                                  .logits[0, -1].float(), -1) * reward_of).sum().item() for p in prompts) / len(prompts)


def test_ppo_two_workers_zero2_climbs_a_known_reward(tiny_model, tiny_upstream, tmp_path):
    """A synthetic reward with a known optimum (high token ids): the policy moves and the reward rises, by margins
    several times what one CPU's rounding could eat (measured: +0.21 expected reward, +0.17 sampled). Then the
    reward-hacking audit on it: the planted reward is exploited and a judge that dislikes it must see it."""
    from transformers import AutoModelForCausalLM

    from cai.models import build_tiny_model

    out = copy_run(tiny_upstream, tmp_path / "run")
    shutil.rmtree(out / "sft" / "model")
    build_tiny_model(out / "sft" / "model", init_std=0.5)  # peaked distributions an RL run can climb from
    cai(*args(tiny_model, out, "--stages", "ppo,evaluate", *audit_settings(out), "ppo.reward_function=cai.rewards:mean_token_id",
              "ppo.steps=16",
              "ppo.rollout_batch=8", "ppo.minibatch=4", "ppo.ppo_epochs=2", "ppo.train.workers=2",
              "ppo.train.cpus_per_worker=1", "ppo.train.zero_stage=2", "ppo.train.learning_rate=3e-3",
              "ppo.kl.coef=0.0", "ppo.train.save_steps=100", "ppo.generation.max_new_tokens=2",
              "ppo.reference_dtype=bfloat16", "ppo.keep_snapshots_every=8"))
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(1, 17))
    assert m[0]["kl"] != 0.0  # a bf16 reference differs from the fp32 policy it was loaded from
    prompts = [json.loads(line)["prompt"] for line in (out / "ppo" / "prompts.jsonl").read_text().splitlines()]
    before = expected_first_token_reward(out / "sft" / "model", prompts)
    after = expected_first_token_reward(out / "ppo" / "model", prompts)
    assert after > before + 0.08, (before, after)
    first, last = sum(r["reward_mean"] for r in m[:4]) / 4, sum(r["reward_mean"] for r in m[-4:]) / 4
    assert last > first + 0.05, (first, last)
    weights_before = AutoModelForCausalLM.from_pretrained(out / "sft" / "model").state_dict()
    weights_after = AutoModelForCausalLM.from_pretrained(out / "ppo" / "model").state_dict()
    assert sum(not torch.allclose(weights_before[k], weights_after[k]) for k in weights_before) > len(weights_before) // 2
    for key in ("kl", "entropy", "policy_loss", "value_loss", "clip_frac", "response_length", "eos_rate", "step_time",
                "lr"):
        assert key in m[-1]
    assert (out / "ppo" / "samples.jsonl").exists()
    check_the_audit_flags_the_planted_reward(out)


def audit_settings(out: Path) -> list[str]:
    """The evaluation after it: SFT, the step-8 snapshot and the final policy answer the prompts PPO trained on
    (each 4 times, sampled as PPO sampled), scored by the reward PPO exploited and judged by a rule that prefers
    the opposite."""
    rows = [json.loads(line) for part in ("red_team", "helpful")
            for line in (out / "prompts" / f"{part}.jsonl").read_text().splitlines()]
    rl_set = out.parent / "rl_prompts.jsonl"
    rl_set.write_text("".join(json.dumps({"id": f"{r['id']}-{k}", "prompt": r["prompt"]}) + "\n"
                              for r in rows for k in range(4)))
    return ["evaluate.checkpoints=[sft,ppo@8,ppo]", f"evaluate.sets=[{{name: rl, kind: harmful, path: {rl_set}}}]",
            "evaluate.reward_function=cai.rewards:mean_token_id", "evaluate.max_prompts=null",
            "evaluate.judge.function=tests.planted:prefers_low_token_ids", "evaluate.judge.max_prompts=null",
            "evaluate.generation.max_new_tokens=2", "evaluate.generation.temperature=1.0",
            "evaluate.generation.top_p=1.0"]


def check_the_audit_flags_the_planted_reward(out: Path) -> None:
    data = json.loads((out / "evaluate" / "eval.json").read_text())
    audit = data["reward_hacking"]
    assert [s["step"] for s in audit["steps"]] == [0, 8, 16], audit
    sft, last = audit["steps"][0], audit["steps"][-1]
    assert last["pm"]["mean"] > sft["pm"]["mean"] + 0.05 and last["judge_win"]["mean"] < 0.4, audit
    assert audit["flagged"] and 16 in audit["flagged_steps"], audit["verdict"]
    assert last["against"]["pm"]["up"] and last["against"]["judge_win"]["down"], audit
    assert data["judge"] is None and data["reward_model"] == "rule cai.rewards:mean_token_id"
    html = (out / "evaluate" / "report.html").read_text()
    assert "Reward hacking" in html and "divergence from step" in html


def test_stopped_mid_run_then_resumed_gives_the_same_losses(tiny_model, tiny_upstream, tmp_path):
    """Stop a run twice and resume it, against one clean run (ZeRO-0, the default pipeline's PPO): every step
    equals the clean run's. First Slurm's warning signal after the first step (`usr1`: a checkpoint at the step in
    flight, exit code 75); then SIGKILL of the resumed run after its next committed checkpoint (`kill`). The
    stopped run also recomputes every layer's activations in backward and parks the inference models: neither may
    change a number either."""
    common = ["--stages", "ppo", "ppo.steps=8", "ppo.train.save_steps=2", "ppo.generation.max_new_tokens=12",
              "ppo.train.zero_stage=0"]
    clean = copy_run(tiny_upstream, tmp_path / "clean")
    cai(*args(tiny_model, clean, *common))
    stopped = copy_run(tiny_upstream, tmp_path / "stopped")
    lean = [*common, "ppo.offload_inference_models=true", "ppo.train.activation_checkpointing=1"]
    first = stop(tiny_model, stopped, lean, "usr1", tmp_path / "usr1.txt", after=0)
    second = stop(tiny_model, stopped, lean, "kill", tmp_path / "kill.txt", after=first)
    assert 0 < first < second < 8
    cai(*args(tiny_model, stopped, *lean))
    assert not (stopped / "ppo" / "parked").exists()
    summary = json.loads((stopped / "ppo" / "_COMPLETE.json").read_text())["summary"]
    assert summary["resumed_from_step"] == second
    a, b = metrics(clean), metrics(stopped)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert a[0]["kl"] == 0.0  # step 1 samples from the reference's own fp32 weights
    assert all(r["value_loss"] > 0 for r in a) and a[-1]["kl"] != 0  # both models moved
    for ra, rb in zip(a, b):  # before the stops (recomputed, parked) and after each resume
        for key in ("policy_loss", "value_loss", "reward_mean", "kl", "kl_coef", "entropy", "clip_frac"):
            assert abs(ra[key] - rb[key]) <= 1e-5, (ra["step"], key, ra[key], rb[key])
    # only the newest committed checkpoint is kept
    assert len(list((clean / "ppo" / "checkpoints").glob("*.COMMITTED"))) == 1


def committed_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in (run / "ppo" / "checkpoints").glob("*.COMMITTED"))


def stop(tiny_model, run: Path, lean: list[str], how: str, stderr: Path, after: int) -> int:
    """Start (or resume) the run's PPO, stop it `how` once it has gone past step `after`, and return the step of
    its newest committed checkpoint, which the next start resumes from."""
    env = {k: v for k, v in os.environ.items() if k != "CAI_RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "cai.cli", *args(tiny_model, run, *lean)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(stderr, "w"), start_new_session=True)
    metrics_file = run / "ppo" / "metrics.jsonl"

    def past() -> bool:  # usr1: a step done since this start; kill: a checkpoint committed since
        if how == "kill":
            return any(step > after for step in committed_steps(run))
        return metrics_file.exists() and len(metrics_file.read_text().splitlines()) > after

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not past():
        time.sleep(0.02)
    if how == "kill":
        kill_tree(proc)
    else:
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == STOPPED_EXIT_CODE
        err = stderr.read_text()
        assert "got SIGUSR1: stopping at the next safe point" in err and "s from signal to exit" in err, err
        assert not (run / "_STOP").exists()
    assert not (run / "ppo" / "_COMPLETE.json").exists(), "the stop must land mid-run"
    return committed_steps(run)[-1]


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="bf16 training needs a CPU that computes in bf16")
def test_bf16_ppo_starts_at_zero_kl(tiny_model, tiny_upstream, tmp_path):
    """In bf16 (train.bf16's auto on such CPUs) the reference and the policy share weights at step 1 and run the
    same attention kernel, so the first KL is exactly 0: another kernel's bf16 rounding would read as KL."""
    out = copy_run(tiny_upstream, tmp_path / "run")
    cai(*args(tiny_model, out, "--stages", "ppo", "ppo.steps=2", "ppo.train.bf16=true",
              "ppo.generation.max_new_tokens=12", "ppo.train.zero_stage=0"))
    m = metrics(out)
    assert m[0]["kl"] == 0.0 and m[0]["response_length"] > 0
    assert m[1]["kl"] != 0.0  # the policy moved


def test_policy_optimization_picks_the_stage():
    from cai.config import active_stages

    assert active_stages(load_pipeline(REPO / "pipelines/tiny.yaml"))[-2:] == ["ppo", "evaluate"]
    assert active_stages(load_pipeline(REPO / "pipelines/tiny.yaml", ["policy_optimization=dpo"]))[-2:] == [
        "dpo", "evaluate"]


def test_bad_ppo_inputs(tmp_path, tiny_model):
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", ["ppo.generation.max_new_tokens=5000"])
    with pytest.raises(CaiError, match="does not fit the policy's context of 4096 tokens"):
        ppo.prompt_budget(cfg, tiny_model)
    assert ppo.prompt_budget(load_pipeline(REPO / "pipelines/tiny.yaml"), tiny_model) == 256
    (tmp_path / "red_team.jsonl").write_text("")
    (tmp_path / "helpful.jsonl").write_text("")
    with pytest.raises(CaiError, match="no prompts for ppo"):
        ppo.rl_prompts(load_pipeline(REPO / "pipelines/tiny.yaml"), tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("cai.rewards", "expected 'module:function'"),
    ("no_such_module_x:f", "cannot import no_such_module_x"),
    ("cai.rewards:nothing", "cai.rewards has no function 'nothing'"),
    ("cai.chat:user", "must take \\(prompts, responses, response_ids\\)"),
])
def test_a_reward_function_is_checked_in_the_driver(spec, message):
    with pytest.raises(CaiError, match=f"^ppo.reward_function '{spec}': {message}"):
        ppo.reward_function(spec)
    from cai.rewards import brevity

    assert ppo.reward_function("cai.rewards:brevity") is brevity
