"""LoRA (`<stage>.train.lora`) in every training stage, on the shared tiny upstream run: only the adapters (and a
reward model's scalar head) train; the adapter is kept in <stage>/adapter/ and loads with peft; <stage>/model/ is
the base with the adapter merged in, a plain model folder the next stage reads; PPO's and DPO's reference is the
frozen base with the adapters off. Stages run in this process on one Ray for the module (as test_zero_stages)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.config import load_pipeline
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.stages import dpo, ppo, reward_model, sft

from .conftest import REPO
from .test_training import preference_file

pytestmark = pytest.mark.slow
CONSTITUTION = load_constitution(REPO / "constitutions/default.yaml")
# one worker each; ZeRO-3 for PPO, where the adapters are switched off and on between gathers of partitioned weights
ZERO = {"sft": 0, "reward_model": 2, "ppo": 3, "dpo": 2}
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def lora_run(tiny_model, tiny_upstream, tmp_path_factory) -> tuple[Path, dict]:
    """sft, reward_model, ppo (on that reward model) and dpo (from that SFT model) with LoRA, reading the upstream
    run's folders. -> (the run folder, each stage's summary)."""
    from cai.cluster import stop_ray

    up, out = tiny_upstream, tmp_path_factory.mktemp("lora")
    overrides = [f"policy.name={tiny_model}", f"output_dir={out}", "sft.train.lora.target_modules=[q_proj,v_proj]",
                 "sft.train.max_steps=3", "ppo.steps=3", "dpo.train.max_steps=3", "dpo.train.learning_rate=1e-2"]
    for stage, zero in ZERO.items():
        overrides += [f"{stage}.train.lora.rank={RANK}", f"{stage}.train.lora.alpha={ALPHA}",
                      f"{stage}.train.zero_stage={zero}"]
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", overrides)
    inputs = {"sft": {"critique_revise": up / "critique_revise"},
              "reward_model": {"preferences": up / "preferences", "sft": up / "sft"},
              "ppo": {"prompts": up / "prompts", "sft": up / "sft", "reward_model": out / "reward_model"},
              "dpo": {"sft": out / "sft", "preferences": preference_file(out / "prefs")}}
    summaries = {}
    try:
        for module in (sft, reward_model, ppo, dpo):
            name = module.__name__.rsplit(".", 1)[-1]
            (out / name).mkdir()
            summaries[name] = module.run(cfg, CONSTITUTION, inputs[name], out / name)
    finally:
        stop_ray()
    return out, summaries


def assert_only_adapters_moved(base: Path, stage: Path, head: str = "causal_lm") -> None:
    """The merged weights are the base's plus (alpha / r) B A where an adapter sits, the trained head where peft
    saved one, and the base's elsewhere; some adapter moved; the adapter loads onto the base with peft and gives
    the merged model's outputs."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_w, merged = load_file(base / "model.safetensors"), load_file(stage / "model" / "model.safetensors")
    adapter = load_file(stage / "adapter" / "adapter_model.safetensors")
    config = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    adapted = moved = 0
    for key, w in merged.items():
        module = f"base_model.model.{key.removesuffix('.weight')}"
        if f"{module}.lora_A.weight" in adapter:
            delta = ALPHA / RANK * adapter[f"{module}.lora_B.weight"] @ adapter[f"{module}.lora_A.weight"]
            torch.testing.assert_close(w, base_w[key] + delta, atol=1e-6, rtol=1e-5)
            adapted, moved = adapted + 1, moved + bool(delta.abs().max() > 1e-6)
        elif f"base_model.model.{key}" in adapter:  # a module peft saves whole: the scalar head
            torch.testing.assert_close(w, adapter[f"base_model.model.{key}"], atol=0, rtol=0)
        else:
            torch.testing.assert_close(w, base_w[key], atol=0, rtol=0)  # frozen: not a bit moved
    assert adapted >= 4 and moved >= adapted // 2, (adapted, moved)

    load = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    extra = {"num_labels": 1} if head == "reward_model" else {}
    peft_model = PeftModel.from_pretrained(load.from_pretrained(base, **extra), stage / "adapter").eval()
    plain = load.from_pretrained(stage / "model").eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_sft_trains_only_the_named_adapters(lora_run, tiny_model):
    out, summaries = lora_run
    assert_only_adapters_moved(tiny_model, out / "sft")
    config = json.loads((out / "sft" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert 0 < summaries["sft"]["trainable_fraction"] < 0.01, summaries["sft"]


def test_reward_model_trains_adapters_and_its_head(lora_run, tiny_upstream):
    out, summaries = lora_run
    assert_only_adapters_moved(tiny_upstream / "sft" / "model", out / "reward_model", head="reward_model")
    assert (out / "reward_model" / "model" / "reward_stats.json").exists()
    assert 0 < summaries["reward_model"]["trainable_fraction"] < 0.01, summaries["reward_model"]


def test_ppo_reference_is_the_base_with_the_adapter_off(lora_run, tiny_upstream):
    from transformers import AutoModelForCausalLM

    out, summaries = lora_run
    assert_only_adapters_moved(tiny_upstream / "sft" / "model", out / "ppo")
    s = summaries["ppo"]
    assert s["reference_own_params"] == 0 and 0 < s["policy_trainable_fraction"] < 0.01, s
    kl = [json.loads(line)["kl"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    # at step 1 the adapters are zero (B = 0), so policy and reference agree exactly; then the policy moves away
    assert kl[0] == 0.0 and any(k != 0.0 for k in kl[1:]), kl
    snapshot = out / "ppo" / "snapshots" / "step-000002"  # a plain model folder for `cai eval`, its adapter inside
    assert (snapshot / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(snapshot)


def test_dpo_trains_adapters_on_the_merged_sft_model(lora_run):
    out, summaries = lora_run
    assert_only_adapters_moved(out / "sft" / "model", out / "dpo")
    s = summaries["dpo"]
    assert summaries["sft"]["steps"] == 3 and s["steps"] == 3 and 0 < s["trainable_fraction"] < 0.01, s


def test_adapter_off_reference_is_the_base(tiny_model):
    """The reference forward runs the policy's own module with the adapters off: the base's logits, while the same
    module with the adapters on gives the policy's."""
    from transformers import AutoModelForCausalLM

    from cai.rl.models import AdapterOffReference

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    policy = wrap_tiny(tiny_model)
    assert not any(m.training for m in policy.modules())  # the base's eval mode: no adapter dropout in our loops
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
        with AdapterOffReference(policy).use() as reference:
            off = reference(input_ids=ids).logits
        on, plain = policy(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(off, plain, atol=1e-5, rtol=1e-5)
    assert (on - plain).abs().max() > 1e-2


def test_rollout_copy_of_a_lora_policy_follows_its_adapters(tiny_model):
    """In another dtype, rollouts sample from a copy carrying the same adapters; `sync` brings the trained ones."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from cai.config import LoraConfig
    from cai.rl.rollout import RolloutWeights

    policy = wrap_tiny(tiny_model)
    weights = RolloutWeights(SimpleNamespace(module=policy), 0, torch.bfloat16, tiny_model, torch.device("cpu"),
                             LoraConfig(rank=RANK))
    assert weights.copy is not None and next(weights.module.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        trained = policy(input_ids=ids).logits
        stale = weights.module(input_ids=ids).logits.float()
        weights.release()
        weights.sync()
        synced = weights.module(input_ids=ids).logits.float()
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits
    moved = (trained - base).abs().max()
    # the copy's adapters are zero until synced, then give the policy's outputs up to bf16 rounding
    assert (stale - base).abs().max() < 0.1 * moved and (synced - trained).abs().max() < 0.1 * moved, moved


def wrap_tiny(tiny_model):
    from transformers import AutoModelForCausalLM

    from cai.config import LoraConfig
    from cai.lora import wrap

    return wrap(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(rank=RANK), "causal_lm")


@pytest.mark.parametrize("override, expected", [
    ("sft.train.lora.rank=0", "key 'sft.train.lora.rank': Input should be greater than or equal to 1"),
    ("ppo.train.lora.target_modules=q_proj", "expected a list of module names ([q_proj]) or all-linear"),
    ("dpo.train.lora.target_modules=[]", "name at least one module, or all-linear"),
    ("reward_model.train.lora.dropout=1.5", "key 'reward_model.train.lora.dropout': Input should be less than 1"),
])
def test_bad_lora_values_are_one_line(override, expected):
    with pytest.raises(CaiError) as e:
        load_pipeline(REPO / "pipelines/tiny.yaml", [override])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_ppo_refuses_a_separate_reference_dtype_with_lora():
    with pytest.raises(CaiError, match="reference_dtype: with train.lora the reference is the policy's own base"):
        load_pipeline(REPO / "pipelines/tiny.yaml", ["ppo.train.lora.rank=4", "ppo.reference_dtype=bfloat16"])


@pytest.mark.parametrize("targets, expected", [
    ("[q_proj,qproj]", "'qproj' names no module of"),
    ("[self_attn]", "'self_attn' names a LlamaAttention, which LoRA does not adapt"),
])
def test_unknown_target_module_is_one_line_before_training(tiny_model, tmp_path, targets, expected):
    cfg = load_pipeline(REPO / "pipelines/tiny.yaml", [f"policy.name={tiny_model}", f"output_dir={tmp_path}",
                                                       f"sft.train.lora.target_modules={targets}"])
    with pytest.raises(CaiError) as e:
        sft.run(cfg, CONSTITUTION, {"critique_revise": tmp_path / "missing"}, tmp_path / "sft")
    assert expected in str(e.value) and "q_proj" in str(e.value) and "\n" not in str(e.value)
