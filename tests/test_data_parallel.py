"""FlatGradients against DeepSpeed's own ZeRO-0 all-reduce: 2 real gloo ranks, the same weights after
steps with gradient accumulation."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(model_path: str, flat: bool):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from cai.config import TrainConfig
    from cai.train.data_parallel import FlatGradients
    from cai.train.deepspeed import deepspeed_config

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    train = TrainConfig(workers=2, zero_stage=0, bf16=False, batch_size=2, grad_accum=2, max_grad_norm=1.0)
    engine, *_ = deepspeed.initialize(model=model, config=deepspeed_config(train, hf_auto=False, world_size=2),
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    return engine, (FlatGradients(engine) if flat else None)


def _worker(rank: int, port: int, model_path: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    (reference, _), (flat, grads) = _engine(model_path, flat=False), _engine(model_path, flat=True)
    start = [p.detach().clone() for p in flat.module.parameters()]
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(2 * 2):  # 2 optimizer steps of 2 micro-batches
        ids = torch.randint(0, flat.module.config.vocab_size, (2, 9), generator=gen)
        for engine in (reference, flat):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    pairs = list(zip(reference.module.parameters(), flat.module.parameters()))
    result = {"max_diff": max((a - b).abs().max().item() for a, b in pairs),
              "moved": max((p - s).abs().max().item() for p, s in zip(flat.module.parameters(), start)),
              "grads_are_views": all(p.grad is not None and p.grad.data_ptr() == v.data_ptr()
                                     for p, v in zip(flat.module.parameters(), grads.views)),
              "grads_zeroed": all(float(p.grad.abs().max()) == 0.0 for p in flat.module.parameters())}
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump(result, fh)


def test_flat_gradients_match_deepspeed_allreduce_on_two_ranks(tiny_model, tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tiny_model), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["moved"] > 1e-4  # the steps did something
        assert r["max_diff"] == 0.0  # bit for bit: (a/2 + b/2) == (a + b)/2 in floating point
        assert r["grads_are_views"] and r["grads_zeroed"]
