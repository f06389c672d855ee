"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685): each adapted
weight W stays frozen and the update is the low-rank product (alpha / r) B A, trained instead; through peft.

A stage trained with `<stage>.train.lora` saves the adapter (peft's folder) and the driver merges it into its
base on commit (`merge_adapter`), so every reader of the stage's `model/` sees a plain model folder; the adapter
is kept beside it in `<stage>/adapter/`. `head` names the model class as in cai.models.commit_model:
"causal_lm" or "reward_model" (a scalar head, which peft keeps trainable as a module to save).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from cai.config import LoraConfig
from cai.errors import CaiError

TASKS = {"causal_lm": "CAUSAL_LM", "reward_model": "SEQ_CLS"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")  # what peft's save writes


def peft_config(lora: LoraConfig, head: str):
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           task_type=TASKS[head])


def wrap(model, lora: LoraConfig, head: str, adapter_dtype_follows_base: bool = False):
    """`model` with LoRA adapters, only they (and a scalar head) trainable, in `model`'s train/eval mode (peft
    builds its dropout layers in train mode; our own loops run in eval mode, without dropout). peft keeps adapters
    in fp32 over a bf16 base unless `adapter_dtype_follows_base` (a bf16 rollout copy, whose adapters are only
    read)."""
    import peft

    training = model.training
    wrapped = peft.get_peft_model(model, peft_config(lora, head), autocast_adapter_dtype=not adapter_dtype_follows_base)
    return wrapped.train(training)


def is_peft(module) -> bool:
    import peft

    return isinstance(module, peft.PeftModel)


def hf_model(module):
    """The transformers model inside a peft wrapper (adapters in place, active), or `module` itself."""
    return module.get_base_model() if is_peft(module) else module


def trainable_share(module) -> dict:
    """{trainable_params, total_params, trainable_fraction} of a model, counted once per tensor."""
    seen, trainable, total = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 leaves local tensors empty
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total,
            "trainable_fraction": float(f"{trainable / max(total, 1):.4g}")}


def check_targets(lora: LoraConfig | None, model_path: Path, key: str) -> None:
    """Every listed target names a linear or embedding layer of the model at `model_path` (built on the meta
    device: no weights read); one line otherwise. peft itself only fails when no name matches."""
    if lora is None or isinstance(lora.target_modules, str):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    modules = dict(model.named_modules())
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))})
    for target in lora.target_modules:
        found = [m for n, m in modules.items() if n == target or n.endswith("." + target)]
        if not found:
            raise CaiError(f"{key}.target_modules: '{target}' names no module of {model_path} "
                           f"(its linear and embedding layers: {', '.join(adaptable)})")
        odd = next((m for m in found if not isinstance(m, (torch.nn.Linear, torch.nn.Embedding))), None)
        if odd is not None:
            raise CaiError(f"{key}.target_modules: '{target}' names a {type(odd).__name__}, which LoRA does not "
                           f"adapt; name linear or embedding layers ({', '.join(adaptable)})")


def merge_adapter(folder: Path, base: Path, head: str, adapter_out: Path) -> None:
    """`folder` holds a LoRA adapter trained on `base` (peft's files, beside the tokenizer and any card): the
    adapter's files move to `adapter_out`, and `folder` receives the base with the adapter merged in
    (W + alpha/r B A; the scalar head replaced by the trained one), a plain model folder. One line when the
    adapter is missing or does not fit the base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from cai.models import load_tokenizer

    folder, adapter_out = Path(folder), Path(adapter_out)
    if not (folder / ADAPTER_FILES[0]).exists() or not (folder / ADAPTER_FILES[1]).exists():
        raise CaiError(f"{folder}: training ended without a complete LoRA adapter; rerun to resume")
    shutil.rmtree(adapter_out, ignore_errors=True)
    adapter_out.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (folder / name).exists():
            os.replace(folder / name, adapter_out / name)
    kind = {"causal_lm": AutoModelForCausalLM, "reward_model": AutoModelForSequenceClassification}[head]
    extra = {"num_labels": 1} if head == "reward_model" else {}
    model = kind.from_pretrained(base, dtype=torch.float32, **extra)
    try:
        merged = PeftModel.from_pretrained(model, adapter_out).merge_and_unload()
    except Exception as e:  # a truncated file, or an adapter of another architecture
        raise CaiError(f"{adapter_out}: the LoRA adapter does not load onto {base} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''})") from None
    merged.config.pad_token_id = load_tokenizer(folder).pad_token_id
    merged.save_pretrained(folder, safe_serialization=True)
