"""Device placement, checked on CPU: every tensor the PPO loop and the reward-model loop create names the
worker's device, and every tensor they hand to torch is on it (tests/device_audit.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai.config import load_pipeline
from cai.stages import ppo, reward_model

from .conftest import REPO
from .device_audit import DeviceAudit

WORKER_DEVICE = torch.device("cpu")  # what worker_init gives a worker without GPUs


def audited(train_worker):
    """The real worker entry point, run inside a DeviceAudit; -> (summary, findings, calls checked)."""
    def run(job):
        with DeviceAudit(WORKER_DEVICE) as audit:
            summary = train_worker(job)
        return {"summary": summary, "findings": sorted(set(audit.findings)), "checked": audit.checked}
    return run


def test_the_audit_catches_a_tensor_made_without_the_device():
    def careless():
        return torch.zeros(3) + torch.arange(3, device="cpu")

    with DeviceAudit(WORKER_DEVICE, roots=(str(Path(__file__).parent),)) as audit:
        careless()
    assert len(audit.findings) == 1 and "torch.zeros without device=cpu" in audit.findings[0]
    with DeviceAudit(torch.device("meta"), roots=(str(Path(__file__).parent),)) as audit:
        careless()
    assert any("arange without device=meta" in f for f in audit.findings)
    assert any("given a tensor on cpu" in f for f in audit.findings)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    ["ppo.ppo_epochs=2", "ppo.minibatch=2", "ppo.offload_inference_models=true"],   # the general update
    ["ppo.train.activation_checkpointing=1", "ppo.rollout_backend=hf"],              # fused, values in the update
])
def test_ppo_loop_keeps_every_tensor_on_the_worker_device(tiny_model, tiny_upstream, tmp_path, variant):
    from cai.cluster import run_training, stop_ray

    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"policy.name={tiny_model}", f"output_dir={tmp_path}",
                                                       "ppo.steps=2", "ppo.train.save_steps=1", *variant])
    out = tmp_path / "ppo"
    out.mkdir()
    job = ppo.prepare(cfg, {d: tiny_upstream / d for d in ("prompts", "sft", "reward_model")}, out)
    try:
        result = run_training(audited(_ppo_worker), job, cfg.ppo.train, cfg.ray, tmp_path / "ray", "ppo")
    finally:
        stop_ray()
    assert result["summary"]["steps"] == 2
    assert result["checked"] > 500, result["checked"]
    assert result["findings"] == []


@pytest.mark.slow
def test_reward_model_loop_keeps_every_tensor_on_the_worker_device(tiny_upstream, tmp_path):
    from cai.cluster import run_training, stop_ray

    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"output_dir={tmp_path}", "reward_model.train.save_steps=1"])
    out = tmp_path / "reward_model"
    out.mkdir()
    job = reward_model.prepare(cfg, {d: tiny_upstream / d for d in ("preferences", "sft")}, out)
    try:
        result = run_training(audited(reward_model.train_worker), job, cfg.reward_model.train, cfg.ray,
                              tmp_path / "ray", "reward_model")
    finally:
        stop_ray()
    assert result["summary"]["steps"] >= 2
    assert result["checked"] > 100, result["checked"]
    assert result["findings"] == []


def _ppo_worker(job):
    from cai.rl.worker import train_worker

    return train_worker(job)
