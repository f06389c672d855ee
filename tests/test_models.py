import threading
import time

import pytest

from cai import models
from cai.errors import CaiError


def test_embedded_alias_has_distinct_pad(tiny_model):
    path = models.resolve_model("smollm2-135m-instruct")
    tok = models.load_tokenizer(path)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert (path / "model.safetensors").stat().st_size > 500e6  # fp32, dequantized


def test_tiny_model_shares_tokenizer(tiny_model):
    big = models.load_tokenizer(models.resolve_model("smollm2-135m-instruct"))
    tiny = models.load_tokenizer(models.resolve_model(str(tiny_model)))
    assert tiny("Hello there")["input_ids"] == big("Hello there")["input_ids"]
    assert models.load_causal_lm(tiny_model).num_parameters() < 5e6


def test_bad_names_are_clear(tmp_path, monkeypatch):
    with pytest.raises(CaiError, match="no such folder"):
        models.resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaiError, match="no config.json"):
        models.resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaiError, match="hub could not provide it"):
        models.resolve_model("nobody/no-such-model-xyz")


def test_concurrent_first_use_converts_once(tmp_path, monkeypatch):
    """Several workers asking at once: one converts, the others wait and reuse the folder."""
    monkeypatch.setenv("CAI_CACHE", str(tmp_path))
    calls = []

    def fake_dequantize(gguf, out):
        calls.append(out)
        time.sleep(0.3)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantize", fake_dequantize)
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.embedded_model_path("smollm2-135m-instruct")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "config.json").exists() and not list(tmp_path.glob("models/*.tmp*"))
