"""A torch function mode that checks device placement on any machine, CPU included: every tensor that cai's own
code creates must name the worker's device, and every tensor cai's own code hands to torch must sit on it.

On a CPU-only machine every tensor lands on the CPU whatever the code says, so the check is on what the code
asks for: a factory call (torch.tensor, zeros, arange, ...) without `device=` would put that tensor on the CPU
of a GPU worker too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

CAI = Path(__file__).resolve().parents[1] / "cai"
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.scalar_tensor}


class DeviceAudit(TorchFunctionMode):
    def __init__(self, device: torch.device | str, roots: tuple[Path, ...] = (CAI,)):
        super().__init__()
        self.device, self.roots = torch.device(device), tuple(str(r) for r in roots)
        self.findings: list[str] = []  # "file:line: what"
        self.checked = 0               # calls from our code that were looked at

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = sys._getframe(1)
        if caller.f_code.co_filename.startswith(self.roots):
            self.checked += 1
            where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
            name = getattr(func, "__name__", str(func))
            asked = kwargs.get("device")
            if func in FACTORIES and (asked is None or torch.device(asked) != self.device):
                self.findings.append(f"{where}: torch.{name} without device={self.device}")
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    self.findings.append(f"{where}: {name} given a tensor on {t.device}")
        return func(*args, **kwargs)
