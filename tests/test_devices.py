"""Where code runs: worker_init's decisions, and the audit the ZeRO tests run the PPO and reward-model workers in
(tests/device_audit.py, used by tests/test_zero_stages.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cai.cluster import Resources, worker_init
from cai.errors import CaiError

from .device_audit import DeviceAudit

HERE = (str(Path(__file__).parent),)


def test_the_audit_flags_a_tensor_made_without_the_device_and_a_tensor_on_another():
    def careless():
        return torch.zeros(3) + torch.arange(3, device="cpu")

    with DeviceAudit(torch.device("cpu"), roots=HERE) as audit:
        careless()
    assert len(audit.findings) == 1 and "torch.zeros without device=cpu" in audit.findings[0]
    with DeviceAudit(torch.device("meta"), roots=HERE) as audit:  # as if the worker's device were another
        careless()
    assert any("arange without device=meta" in f for f in audit.findings)
    assert any("given a tensor on cpu" in f for f in audit.findings)
    with DeviceAudit(torch.device("cpu")) as audit:  # only our own code is held to it, not the libraries'
        careless()
    assert audit.findings == [] and audit.checked == 0


def test_worker_init_picks_threads_seed_and_device():
    before = torch.get_num_threads()
    try:
        worker = worker_init(Resources(cpus=1, gpus=0, bf16=False, section="sft.train"), seed=5)
        assert worker.device == torch.device("cpu") and not worker.on_gpu
        assert (worker.rank, worker.world) == (0, 1) and torch.get_num_threads() == 1
        first = torch.rand(2)
        worker_init(Resources(cpus=1, gpus=0, bf16=False, section="sft.train"), seed=5)
        assert torch.equal(first, torch.rand(2))  # the same seed on every rank and every rerun
    finally:
        torch.set_num_threads(before)


def test_bf16_training_on_a_cpu_takes_the_math_attention_kernel():
    """The CPU flash kernel's bf16 backward is slow (README: Performance): training forwards in bf16 on a CPU take
    sdpa's math kernel inside `training_attention`, and only there; fp32 training keeps flash."""
    from cai.cluster import Worker

    q = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16, requires_grad=True)

    def kernel() -> str:
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).grad_fn.name()

    with Worker(torch.device("cpu"), 0, 1, 0, bf16=True).training_attention():
        assert "Flash" not in kernel()
    assert "Flash" in kernel()
    with Worker(torch.device("cpu"), 0, 1, 0, bf16=False).training_attention():
        assert "Flash" in kernel()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line a CPU-only node gives")
def test_worker_init_refuses_gpus_it_cannot_see():
    with pytest.raises(CaiError, match=r"^ppo.train: asks for GPUs, but torch sees none on this node"):
        worker_init(Resources(cpus=1, gpus=1, bf16=False, section="ppo.train"), seed=0)


def test_worker_init_refuses_bf16_where_the_cpu_has_none(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.raises(CaiError, match=r"ppo.train.bf16=true, but this CPU has no bf16 support; set ppo.train.bf16"):
        worker_init(Resources(cpus=1, gpus=0, bf16=True, section="ppo.train"), seed=0)


def test_one_resource_check_counts_cpus_and_gpus():
    import ray

    from cai.cluster import require_resources

    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        require_resources(2, Resources(cpus=1, gpus=0, bf16=False, section="sft.train"), "workers")
        with pytest.raises(CaiError, match=r"^sft.train: workers=3 x 1 CPUs each needs 3 CPUs; the Ray cluster has 2$"):
            require_resources(3, Resources(cpus=1, gpus=0, bf16=False, section="sft.train"), "workers")
        with pytest.raises(CaiError, match=r"^ray: generation_actors=2 x 0.5 GPUs each needs 1 GPUs; the Ray cluster"):
            require_resources(2, Resources(cpus=1, gpus=0.5, bf16=False, section="ray"), "generation_actors")
    finally:
        ray.shutdown()


@pytest.mark.parametrize("capability, auto", [("AVX2", "float32"), ("AVX512_BF16", "bfloat16"), ("AMX", "bfloat16")])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, capability, auto):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    worker = worker_init(Resources(cpus=1, gpus=0, bf16=False, section="ray"), seed=0)
    assert worker.resolve_dtype("auto") == auto
    assert worker.resolve_dtype("float32") == "float32" and worker.resolve_dtype("bfloat16") == "bfloat16"
    # training's bf16 defaults to auto (as trl's configs default to bf16): decided by the same test, per worker
    from cai.config import TrainConfig

    train = TrainConfig()
    assert train.bf16 == "auto"
    trainer = worker_init(Resources.of_training(train, "sft"), seed=0)
    assert trainer.bf16 is (auto == "bfloat16")
    assert trainer.decided(train).bf16 is (auto == "bfloat16") and train.bf16 == "auto"
    assert worker_init(Resources.of_training(TrainConfig(bf16=False), "sft"), seed=0).bf16 is False


def test_deepspeed_refuses_a_bf16_nobody_decided():
    from cai.config import TrainConfig
    from cai.train.deepspeed import deepspeed_config

    with pytest.raises(ValueError, match="train.bf16 is 'auto'"):
        deepspeed_config(TrainConfig(), hf_auto=True)
    assert deepspeed_config(TrainConfig(bf16=True), hf_auto=True)["bf16"]["enabled"] is True
