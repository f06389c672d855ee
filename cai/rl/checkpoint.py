"""PPO checkpoints: both engines (weights, optimizers, schedules; a LoRA engine's frozen base left out), each
rank's RNG states, and the loop's own state (step, KL coefficient, skipped steps). A checkpoint counts only once
its marker exists, written last; older ones are deleted only after it."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cai.train.deepspeed import frozen_weights

COMMITTED = "COMMITTED"


@dataclass(frozen=True)
class LoopState:
    step: int        # iterations done
    kl_coef: float   # the KL controller's β
    skipped: int     # steps skipped for non-finite losses so far


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: Path, state: LoopState, policy, value, rank: int, keep: int) -> None:
    tag = f"step-{state.step:06d}"
    policy.save_checkpoint(str(root / "policy"), tag=tag, client_state=asdict(state),
                           exclude_frozen_parameters=frozen_weights(policy))
    value.save_checkpoint(str(root / "value"), tag=tag, exclude_frozen_parameters=frozen_weights(value))
    (root / "rng").mkdir(parents=True, exist_ok=True)
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None},
               root / "rng" / f"{tag}-{rank}.pt")
    _barrier()
    if rank == 0:
        (root / f"{tag}.json").write_text(json.dumps(asdict(state)))
        (root / f"{tag}.{COMMITTED}").touch()  # the marker, last
        for old in sorted(root.glob(f"step-*.{COMMITTED}"))[:-keep]:
            old_tag = old.name.split(".")[0]
            old.unlink()
            for path in (root / "policy" / old_tag, root / "value" / old_tag):
                shutil.rmtree(path, ignore_errors=True)
            for path in [root / f"{old_tag}.json", *(root / "rng").glob(f"{old_tag}-*.pt")]:
                path.unlink(missing_ok=True)
    _barrier()


def restore(root: Path, policy, value, rank: int) -> LoopState | None:
    """Load the newest committed checkpoint into both engines and this process's RNGs; None if there is none."""
    markers = sorted(root.glob(f"step-*.{COMMITTED}")) if root.exists() else []
    if not markers:
        return None
    tag = markers[-1].name.split(".")[0]
    _, client = policy.load_checkpoint(str(root / "policy"), tag=tag, load_module_strict=not frozen_weights(policy))
    value.load_checkpoint(str(root / "value"), tag=tag, load_module_strict=not frozen_weights(value))
    rng = torch.load(root / "rng" / f"{tag}-{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return LoopState(**{k: client[k] for k in ("step", "kl_coef", "skipped")})
