"""Typed pipeline configuration: the one place defaults live.

A pipeline YAML holds values only; every key is checked here (unknown keys and wrong types are
errors). Relative paths are relative to the working directory and made absolute on load, so Ray
workers started elsewhere see the same files.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai.errors import CaiError
from cai.stages import ORDER
from cai.yamlfile import load_value, read_yaml, validate_yaml


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(Strict):
    name: str = Field("smollm2-135m-instruct", description="alias, local HF folder, or hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="weights dtype; auto: bfloat16 where the device computes in it natively, else float32")
    system_prompt: str | None = Field(None, description="system message; None keeps the template's")
    actors: int | None = Field(None, ge=1, description="generation actors holding this model; None: "
                               "ray.generation_actors")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per actor of this model (over 1: its "
                                         "layers are spread over them); None: ray.gpus_per_actor")


class GenerationConfig(Strict):
    max_new_tokens: int = Field(128, ge=1, description="new tokens per completion")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    batch_size: int = Field(32, ge=1, description="rows per forward pass")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are cut from the left")


class RayConfig(Strict):
    address: str | None = Field(None, description="cluster address; None: $CAI_RAY_ADDRESS or a local Ray")
    generation_actors: int = Field(1, ge=1, description="Ray actors that each load the model once")
    cpus_per_actor: float = Field(2.0, gt=0, description="CPUs (and torch threads) per actor")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per generation actor")


class PromptSource(Strict):
    path: str = Field(description="jsonl/csv/parquet file, a `datasets` folder, or builtin:red_team|helpful")
    column: str = Field("prompt", description="column holding the prompt text")
    split: str = Field("train", description="split, for `datasets` folders")


class ExpandConfig(Strict):
    new_prompts: int = Field(0, ge=0, description="prompts to generate per set by few-shot prompting")
    few_shot: int = Field(8, ge=1, description="seed prompts shown per generation request")
    near_duplicate_threshold: float = Field(0.7, gt=0, le=1, description="Jaccard of word 3-grams")
    generation: GenerationConfig = GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=0.95)


class PromptsConfig(Strict):
    red_team: list[PromptSource] = [PromptSource(path="builtin:red_team")]
    helpful: list[PromptSource] = [PromptSource(path="builtin:helpful")]
    max_red_team: int | None = Field(None, ge=1, description="keep the first N red-team prompts")
    max_helpful: int | None = Field(None, ge=1, description="keep the first N helpfulness prompts")
    expand: ExpandConfig = ExpandConfig()


Unfinished = Literal["drop", "keep"]
UNFINISHED_HELP = ("responses cut at max_new_tokens: drop them, or keep them as unfinished training targets "
                   "(no end-of-turn token after them)")


class CritiqueReviseConfig(Strict):
    rounds: int = Field(4, ge=1, description="critique->revision rounds per prompt (paper: 4)")
    few_shot: int = Field(5, ge=0, description="few-shot conversations from the constitution")
    few_shot_initial: bool = Field(False, description="show the few-shot conversations before the initial answer "
                                   "too (the paper samples it from the prompt alone)")
    unfinished: Unfinished = Field("drop", description=UNFINISHED_HELP)
    train_on: Literal["all_rounds", "last_round"] = Field("all_rounds", description="revisions in SFT data")
    helpful_samples: int = Field(2, ge=0, description="policy answers per helpfulness prompt (paper: 2)")
    shard_size: int = Field(32, ge=1, description="prompts per committed shard")
    generation: GenerationConfig = GenerationConfig()


class LoraConfig(Strict):
    rank: int = Field(16, ge=1, description="rank r of each adapter's update B @ A")
    alpha: float = Field(32.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input in sft and dpo (the HF "
                           "Trainer's train mode); reward_model and ppo train without dropout")
    target_modules: str | list[str] = Field(
        "all-linear", description="names of the layers to adapt (q_proj, v_proj, ...: a module whose name is "
                                  "or ends with one), or all-linear: every linear layer but the output head")

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, names: str | list[str]) -> str | list[str]:
        if isinstance(names, str) and names != "all-linear":
            raise ValueError(f"expected a list of module names ([{names}]) or all-linear, got '{names}'")
        if isinstance(names, list):
            if not names:
                raise ValueError("name at least one module, or all-linear")
            bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n)]
            if bad:
                raise ValueError(f"'{bad[0]}' is not a module name (like q_proj or self_attn.v_proj)")
        return names


class TrainConfig(Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    cpus_per_worker: float = Field(2.0, gt=0, description="CPUs (and torch threads) per worker")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; 0 trains on CPU")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision; auto: on where the device "
                                         "computes in bf16 (GPUs with bf16, CPUs with AVX512-BF16 or AMX), as "
                                         "trl's configs default to bf16")
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="paper: constant")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup from 0 before the schedule")
    epochs: float = Field(1.0, gt=0, description="passes over the data (paper: 1)")
    max_steps: int = Field(-1, description="optimizer steps; -1 means use epochs")
    batch_size: int = Field(8, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(1024, ge=16, description="tokens per training sequence")
    save_steps: int = Field(50, ge=1, description="optimizer steps between resumable checkpoints")
    activation_checkpointing: int = Field(0, ge=0, description="recompute the activations of every N-th decoder "
                                          "layer in backward instead of keeping them (1: all layers); 0: off")
    keep_freed_memory: bool = Field(True, description="workers' malloc keeps freed memory for the next step "
                                     "instead of returning it to the OS (on CPU: faster, higher peak RSS)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters instead of every weight (merged into a "
                                    "plain model folder on commit, kept in <stage>/adapter/); None: full fine-tuning")

    @field_validator("bf16", mode="before")
    @classmethod
    def _bf16_choice(cls, value):
        if value is True or value is False or value == "auto":
            return value
        raise ValueError(f"expected true, false or auto, got {value!r}")


class SftConfig(Strict):
    base_model: str | None = Field(None, description="model to fine-tune; None: the policy (paper: pretrained LM)")
    helpful_ratio: float = Field(1.0, ge=0, description="helpfulness rows per revision row in the mix")
    group_by_length: bool = Field(True, description="batch rows of similar length together (less padding)")
    train: TrainConfig = TrainConfig(learning_rate=1e-5)


class JudgeCheckConfig(Strict):
    enabled: bool = Field(True, description="score the feedback model on labelled pairs before labelling")
    pairs: str = Field("builtin:judge_check", description="jsonl of {prompt, better, worse, aspect}")
    stop_below: float | None = Field(None, ge=0, le=1, description="stop when accuracy is below this")
    warn_below: float = Field(0.6, ge=0, le=1, description="warn loudly when accuracy is below this")
    max_pairs: int | None = Field(None, ge=2, description="a seeded sample of this many pairs, every kind in its "
                                  "share (a quick check); None: all")


class PreferencesConfig(Strict):
    feedback_model: ModelConfig | None = Field(None, description="the judge; None: the policy model")
    both_orders: bool = Field(True, description="label (A, B) and (B, A) and average")
    few_shot: int = Field(2, ge=0, description="few-shot labelling examples prepended")
    chain_of_thought: bool = Field(False, description="the judge reasons first, then answers")
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="clamp for chain-of-thought labels (§4.3)")
    cot_generation: GenerationConfig = GenerationConfig(max_new_tokens=96, temperature=0.0)
    helpful_pairs: PromptSource | None = Field(None, description="given prompt/chosen/rejected pairs")
    label_helpful: bool = Field(True, description="without helpful_pairs, label helpfulness pairs by AI")
    max_prompt_tokens: int = Field(1536, ge=64, description="longer labelling prompts are skipped, counted")
    shard_size: int = Field(32, ge=1)
    batch_size: int = Field(16, ge=1, description="labelling prompts per forward pass")
    attribution_pairs: int = Field(8, ge=0, description="pairs every principle labels, for the attribution table")
    response_generation: GenerationConfig = GenerationConfig(max_new_tokens=96, temperature=1.0)
    unfinished: Unfinished = Field("drop", description=UNFINISHED_HELP)
    judge_check: JudgeCheckConfig = JudgeCheckConfig()


class RewardModelConfig(Strict):
    base_model: str | None = Field(None, description="None: the SFT model (a scalar head is added)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share for agreement and ECE")
    group_by_length: bool = Field(True, description="batch pairs of similar length together (less padding)")
    train: TrainConfig = TrainConfig(learning_rate=1e-5, batch_size=8)


class KLConfig(Strict):
    estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL estimator (k3: >= 0, lower variance)")
    controller: Literal["fixed", "adaptive"] = Field("adaptive", description="Ziegler et al. 2019 §2.2")
    coef: float = Field(0.05, ge=0, description="initial β of the per-token KL penalty")
    target: float = Field(6.0, gt=0, description="adaptive: target KL per response (nats)")
    horizon: int = Field(10000, ge=1, description="adaptive: responses over which β moves by ±20%")


class PpoConfig(Strict):
    steps: int = Field(20, ge=1, description="PPO iterations (rollout + update)")
    rollout_batch: int = Field(4, ge=1, description="prompts per worker per iteration")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    minibatch: int = Field(4, ge=1, description="responses per gradient step")
    generation: GenerationConfig = GenerationConfig(max_new_tokens=32, temperature=1.0, max_prompt_tokens=512)
    rollout_backend: Literal["cai", "hf"] = Field("cai", description="what samples the rollouts: our generator "
                                                  "(cai/generation.py) or transformers' generate")
    clip: float = Field(0.2, gt=0, description="policy ratio clip ε")
    value_clip: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus in the policy loss")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_advantages: bool = True
    reward_clip: float = Field(5.0, gt=0, description="clip of the normalised preference-model score")
    missing_eos_penalty: float = Field(-1.0, description="added to the score of a response without EOS")
    kl: KLConfig = KLConfig()
    value_init: Literal["reward_model", "sft"] = Field("reward_model", description="value model start")
    value_lr: float = Field(1e-5, gt=0, description="value model learning rate (the policy's is train's)")
    train: TrainConfig = TrainConfig(learning_rate=1e-6, save_steps=5)
    keep_checkpoints: int = Field(1, ge=1, description="committed checkpoints kept")
    keep_snapshots_every: int = Field(0, ge=0, description="save the policy as a model folder every N steps "
                                      "(snapshots/step-NNNNNN, evaluated as ppo@N); 0: only the final one")
    max_skipped_steps: int = Field(3, ge=1, description="consecutive non-finite steps before stopping")
    sample_every: int = Field(5, ge=1, description="write sample generations every N steps")
    prompts: Literal["red_team", "helpful", "both"] = Field("both", description="prompt sets to train on")
    inference_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the preference model and of the rollout copy of the policy; auto: bfloat16 "
                            "where the device computes in it natively, else float32")
    reference_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="dtype of the reference model; None: the policy's (bfloat16 halves its memory and "
                          "adds rounding noise to the KL)")
    offload_inference_models: bool = Field(
        False, description="between rollouts keep the reference and preference models in a memory-mapped file "
                           "(CPU runs short of memory; README: Performance)")
    reward_function: str | None = Field(None, description="'module:function' scoring (prompts, responses) "
                                        "instead of the preference model (rule-based rewards, tests)")

    @field_validator("generation")
    @classmethod
    def _sampled_distribution_is_the_trained_one(cls, gen: GenerationConfig) -> GenerationConfig:
        # log-probs, ratios and the KL are computed on the logits divided by the temperature; a nucleus cut
        # would make the sampled distribution differ from the one trained
        if gen.temperature <= 0:
            raise ValueError("temperature must be > 0 for PPO (greedy rollouts have no distribution to train)")
        if gen.top_p != 1.0:
            raise ValueError("top_p must be 1.0 for PPO (the log-probs are those of the full distribution)")
        return gen

    @model_validator(mode="after")
    def _lora_reference_is_the_base(self) -> PpoConfig:
        if self.train.lora and self.reference_dtype:
            raise ValueError("reference_dtype: with train.lora the reference is the policy's own base with the "
                             "adapters off (no second copy, in the policy's dtype); leave it unset")
        return self


class DpoConfig(Strict):
    min_p_chosen: float = Field(0.6, ge=0.5, le=1, description="drop pairs whose soft label is less confident")
    beta: float = Field(0.1, gt=0)
    train: TrainConfig = TrainConfig(learning_rate=5e-7)

    @field_validator("train")
    @classmethod
    def _every_layer_or_none(cls, train: TrainConfig) -> TrainConfig:
        # trl's DPOTrainer turns checkpointing off for the reference forward and on again for every layer
        if train.activation_checkpointing > 1:
            raise ValueError("activation_checkpointing: trl's DPOTrainer recomputes every layer or none; use 1 or 0")
        return train


ReportTo = Literal["tensorboard", "wandb", "trackio", "none"]  # cai/metrics_log.py: REPORT_TO


SET_NAME = r"^[a-z0-9][a-z0-9_-]*$"


class EvalSetConfig(Strict):
    name: str = Field(pattern=SET_NAME, description="the set's name in the report")
    kind: Literal["harmful", "helpful", "borderline"] = Field(
        description="harmful: refusal rate and harmlessness Elo; helpful: helpfulness Elo; borderline: safe prompts "
                    "that sound dangerous (over-refusal rate, helpfulness Elo)")
    path: str = Field(description="jsonl/csv/parquet file, a `datasets` folder, or builtin:eval_harmful|"
                                  "eval_helpful|eval_borderline")
    column: str = Field("prompt", description="column holding the prompt (HarmBench's CSV: Behavior)")
    id_column: str | None = Field(None, description="column holding a row id (HarmBench: BehaviorID); None: "
                                  "`id` when present, else the row number")
    where: dict[str, str] = Field({}, description="keep rows whose columns hold these values (XSTest's prompts "
                                  "CSV: {type: ...} or {label: safe})")
    split: str = Field("train", description="split, for `datasets` folders")


def _builtin_sets() -> list[EvalSetConfig]:
    return [EvalSetConfig(name=kind, kind=kind, path=f"builtin:eval_{kind}")
            for kind in ("harmful", "helpful", "borderline")]


class EvalJudgeConfig(Strict):
    enabled: bool = Field(True, description="pairwise AI-judge comparisons (Elo) and refusal judgements")
    max_prompts: int | None = Field(40, ge=1, description="prompts per set compared for each pair of checkpoints "
                                    "(a seeded sample; the Elo intervals widen as it shrinks); None: all")
    few_shot: int = Field(2, ge=0, description="few-shot labelling examples, the same for every comparison")
    max_prompt_tokens: int = Field(1536, ge=64, description="longer judge prompts are skipped, counted")
    min_option_mass: float = Field(0.01, ge=0, lt=1, description="a verdict whose (A) and (B) tokens together "
                                   "get less probability than this is not an answer: skipped, counted")
    batch_size: int = Field(16, ge=1, description="judge prompts per forward pass")
    function: str | None = Field(None, description="'module:function' taking (prompts, first, second, first_ids, "
                                 "second_ids) and returning P(first is better) per comparison, in place of the "
                                 "feedback model (rule-based judges, tests); the judge check and the refusal "
                                 "judge are then skipped, the pattern check stays")


class EvaluateConfig(Strict):
    checkpoints: list[str] = Field(["base", "sft", "policy"], min_length=1, description="base, sft, policy, ppo, "
                                   "dpo, ppo@<step> (ppo.keep_snapshots_every), <run folder>:<one of those>, or a "
                                   "model folder")
    sets: list[EvalSetConfig] = Field(default_factory=_builtin_sets, min_length=1)
    max_prompts: int | None = Field(None, ge=1, description="keep the first N prompts of every set")
    reward_model: str | None = Field("reward_model", description="preference model scoring the answers: this "
                                     "run's reward_model, <run folder>:reward_model, a folder; None: no scores")
    reward_function: str | None = Field(None, description="'module:function' scoring (prompts, responses, "
                                        "response_ids) in place of the preference model, as ppo.reward_function")
    generation: GenerationConfig = GenerationConfig(max_new_tokens=96, temperature=0.7, top_p=0.9)
    judge: EvalJudgeConfig = EvalJudgeConfig()
    bootstrap_samples: int = Field(1000, ge=100, description="bootstrap resamples of the prompts for intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")
    samples_shown: int = Field(6, ge=0, description="prompts per set whose answers the report shows side by side")
    shard_size: int = Field(32, ge=1, description="rows per committed shard")


class MweConfig(Strict):
    """`cai mwe`: model-written evaluations (cai/mwe.py)."""
    behaviours: str = Field("builtin:behaviours", description="YAML of behaviours (name, description, agree and "
                            "disagree examples); builtin:behaviours: the shipped ones")
    checkpoints: list[str] = Field(["base"], min_length=1, description="scored checkpoints, named as in "
                                   "evaluate.checkpoints (base, sft, policy, ppo@<step>, <run>:policy, a folder)")
    writer_model: ModelConfig | None = Field(None, description="writes the statements; None: the feedback model")
    judge_model: ModelConfig | None = Field(None, description="checks each statement's label; None: the feedback "
                                            "model")
    n: int = Field(64, ge=1, description="writer outputs per side (each may hold several statements, one per line)")
    generation: GenerationConfig = GenerationConfig(max_new_tokens=64, temperature=1.0, top_p=0.95)
    min_label_confidence: float = Field(0.6, ge=0, le=1, description="keep statements whose label the judge gives "
                                        "at least this probability (both option orders averaged)")
    min_option_mass: float = Field(0.01, ge=0, lt=1, description="a verdict whose (A) and (B) tokens get less "
                                   "probability than this is not an answer: the statement is dropped, counted")
    near_duplicate_threshold: float = Field(0.5, gt=0, le=1, description="word-3-gram Jaccard at which a statement "
                                            "is a near duplicate of a more confident one (or of an example)")
    balance: bool = Field(True, description="keep as many statements of each side (the most confident), so that a "
                          "bias towards Yes or No cannot pass for the behaviour")
    format: Literal["chat", "raw"] = Field("chat", description="chat: the question as a user turn under the "
                                           "checkpoint's chat template, the answers' leading space dropped; raw: "
                                           "Anthropic's Human/Assistant text, answers as written")
    max_prompt_tokens: int = Field(1024, ge=16, description="longer judge prompts and probes are skipped, counted")
    batch_size: int = Field(16, ge=1, description="judge and probe prompts per forward pass")
    shard_size: int = Field(32, ge=1, description="rows per committed shard")
    bootstrap_samples: int = Field(1000, ge=100, description="bootstrap resamples of the probes for intervals")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")


class RedteamAdversarialConfig(Strict):
    attacker_learning_rate: float = Field(2e-5, gt=0, description="SFT of the attacker on its successful attacks")
    attacker_epochs: float = Field(1.0, gt=0, description="passes over the successful attacks per round")
    judge_learning_rate: float = Field(2e-5, gt=0, description="the input filter (a sequence classifier)")
    judge_epochs: float = Field(2.0, gt=0, description="passes over the filter's training rows per round")
    batch_size: int = Field(8, ge=1, description="rows per optimizer step, attacker and filter")
    max_length: int = Field(256, ge=16, description="tokens per training row")
    held_out: float = Field(0.25, gt=0, lt=1, description="share of the borderline prompts and of each round's "
                            "successful attacks kept out of training: the filter's hard set")
    negatives: PromptSource = Field(PromptSource(path="builtin:eval_borderline"), description="harmless prompts "
                                    "that only sound dangerous: the filter's negatives")


class RedteamConfig(Strict):
    rounds: int = Field(3, ge=1, description="rounds of attacks (the CLI's --rounds)")
    attacks: int = Field(64, ge=1, description="red-LM completions per round, and the most attacks a round "
                         "keeps (a completion holding a list gives several; the CLI's --attacks)")
    red_model: ModelConfig | None = Field(None, description="the red LM; None: the feedback model")
    few_shot: int = Field(5, ge=1, description="successful attacks shown per few-shot request (Perez et al.: 5)")
    shot_temperature: float = Field(0.1, gt=0, description="few-shot draw weight exp(P(harmful) / T) (Perez: 0.1)")
    shot_draws: int = Field(4, ge=1, description="few-shot draws per round (Perez: one per attack); the requests of "
                            "one draw share their whole prompt, which then runs once")
    attack_generation: GenerationConfig = GenerationConfig(max_new_tokens=40, temperature=1.0, top_p=0.95,
                                                           batch_size=64, max_prompt_tokens=1024)
    answer_generation: GenerationConfig = GenerationConfig(max_new_tokens=64, temperature=0.7, top_p=0.9,
                                                           batch_size=64, max_prompt_tokens=512)
    near_duplicate_threshold: float = Field(0.7, gt=0, le=1, description="Jaccard of word 3-grams, against every "
                                            "attack kept so far")
    harm_threshold: float = Field(0.5, gt=0, lt=1, description="an attack succeeds when the judge's P(harmful) "
                                  "of the target's answer is at least this")
    min_option_mass: float = Field(0.01, ge=0, lt=1, description="a verdict whose two option tokens get less "
                                   "probability than this is not an answer: skipped, counted")
    judge_batch_size: int = Field(16, ge=1, description="judge prompts per forward pass")
    max_judge_tokens: int = Field(1024, ge=64, description="longer judge prompts are skipped, counted")
    reward_model: str | None = Field(None, description="preference model (a folder, reward_model, or <run "
                                     "folder>:reward_model): success also needs its harmlessness score below "
                                     "max_pm_score; None: the judge alone")
    max_pm_score: float = Field(0.0, description="normalised preference-model score under which an answer counts "
                                "as harmful")
    adversarial: RedteamAdversarialConfig = RedteamAdversarialConfig()


class PipelineConfig(Strict):
    name: str = Field(description="run name; an output_dir belongs to one run name")
    output_dir: str = Field(description="stage outputs go to <output_dir>/<stage>/")
    seed: int = Field(0, description="seeds principle sampling and generation")
    constitution: str = Field("constitutions/default.yaml", description="constitution YAML")
    stages: list[Literal[ORDER]] = Field(list(ORDER), description="stages to run (see policy_optimization)")
    policy_optimization: Literal["ppo", "dpo"] = Field("ppo", description="RL-CAI by PPO, or DPO on the labels")
    policy: ModelConfig = ModelConfig()
    ray: RayConfig = RayConfig()
    prompts: PromptsConfig = PromptsConfig()
    critique_revise: CritiqueReviseConfig = CritiqueReviseConfig()
    sft: SftConfig = SftConfig()
    preferences: PreferencesConfig = PreferencesConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PpoConfig = PpoConfig()
    dpo: DpoConfig = DpoConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    mwe: MweConfig = MweConfig()
    redteam: RedteamConfig = RedteamConfig()
    report_to: list[ReportTo] = Field(["tensorboard"], description="where the training stages report their metrics "
                                      "(the HF Trainer's key and values): TensorBoard event files in <stage>/logs/, "
                                      "W&B, trackio; none: nowhere")
    report_project: str = Field("cai", description="the W&B / trackio project; each training stage is a run "
                                "<name>-<stage> in group <name>")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_destination_or_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, value: list[str]) -> list[str]:
        if "none" in value and len(value) > 1:
            raise ValueError("'none' cannot be combined with other destinations")
        return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3). The value is read as YAML, so 3 is an int and [1,2] a list."""
    if "=" not in text:
        raise CaiError(f"override '{text}': expected key=value")
    key, _, raw = text.partition("=")
    if not key.strip():
        raise CaiError(f"override '{text}': empty key")
    try:
        value = load_value(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str], lines: dict[tuple, int]) -> None:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise CaiError(f"override '{text}': '{'.'.join(keys[:i + 1])}' is not a section")
            node = nxt
        node[keys[-1]] = value
        lines.pop(tuple(keys), None)  # an override has no line in the file


def _absolute(path: str) -> str:
    return path if ":" in path.split("/")[0] else os.path.abspath(os.path.expanduser(path))


def _model_path(name: str | None) -> str | None:
    """Local model folders become absolute; aliases and hub ids stay as written."""
    if name and os.path.isdir(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def _absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """Relative paths are relative to the working directory; made absolute for Ray workers."""
    prompts = cfg.prompts.model_copy(update={
        part: [s.model_copy(update={"path": _absolute(s.path)}) for s in getattr(cfg.prompts, part)]
        for part in ("red_team", "helpful")
    })
    pref = cfg.preferences
    pref = pref.model_copy(update={
        "feedback_model": pref.feedback_model and pref.feedback_model.model_copy(
            update={"name": _model_path(pref.feedback_model.name)}),
        "judge_check": pref.judge_check.model_copy(update={"pairs": _absolute(pref.judge_check.pairs)}),
        "helpful_pairs": pref.helpful_pairs and pref.helpful_pairs.model_copy(
            update={"path": _absolute(pref.helpful_pairs.path)})})
    return cfg.model_copy(update={
        "output_dir": _absolute(cfg.output_dir),
        "constitution": _absolute(cfg.constitution),
        "prompts": prompts,
        "policy": cfg.policy.model_copy(update={"name": _model_path(cfg.policy.name)}),
        "sft": cfg.sft.model_copy(update={"base_model": _model_path(cfg.sft.base_model)}),
        "preferences": pref,
        "reward_model": cfg.reward_model.model_copy(update={"base_model": _model_path(cfg.reward_model.base_model)}),
        "evaluate": cfg.evaluate.model_copy(update={"sets": [s.model_copy(update={"path": _absolute(s.path)})
                                                             for s in cfg.evaluate.sets]}),
    })


def load_pipeline(file: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML, apply dotted overrides, validate. Errors name the file, line and key."""
    file = Path(file)
    data, lines = read_yaml(file)
    if not isinstance(data, dict):
        raise CaiError(f"{file}: expected a mapping of keys at the top level")
    apply_overrides(data, list(overrides), lines)
    cfg = validate_yaml(PipelineConfig, data, file, lines)
    return _absolute_paths(cfg)


def active_stages(cfg: PipelineConfig) -> list[str]:
    """The configured stages in pipeline order; ppo or dpo, whichever policy_optimization names."""
    skip = "dpo" if cfg.policy_optimization == "ppo" else "ppo"
    return [s for s in ORDER if s in cfg.stages and s != skip]


def feedback_model(cfg: PipelineConfig) -> ModelConfig:
    return cfg.preferences.feedback_model or cfg.policy


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=100)
