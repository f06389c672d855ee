"""The PPO loop on every Ray Train worker (SPMD): each rank rolls out its slice of the prompt batch,
then the policy and value DeepSpeed engines all-reduce gradients. The reference (SFT) and preference
models run in inference mode. Per iteration (the numbers are the comments' step numbers):
  1. this rank's prompts for the step (a seeded permutation per epoch, so a resumed run sees the same);
  2. sample responses from the current policy (seeded by step and rank);
  3. score: log-probs under policy and reference, values, the preference model's score;
  4. rewards (score on the last token, KL penalty on every token), GAE, whitened advantages;
  5. PPO epochs over minibatches: clipped policy loss (+ entropy bonus), clipped value loss;
  6. metrics (averaged over ranks), KL controller update, guards, a committed checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from cai import checkpointing
from cai.config import PpoConfig, TrainConfig
from cai.errors import CaiError
from cai.ppo_math import AdaptiveKL, FixedKL, entropy_from_logits, logprobs_of, masked_mean, policy_loss, value_loss
from cai.progress import ppo_step_lines, tensorboard_writer
from cai.ppo_rollout import (PolicyRolloutGenerator, Rollout, ScoredSamples, normalised_score, pack,
                             response_logits, response_values)
from cai.shards import read_jsonl

COMMITTED = "COMMITTED"


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_ranks_true(flag: bool) -> bool:
    """Every rank must take the same branch around a collective (skip or step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class PPOWorker:
    def __init__(self, config: dict):
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from cai.distributed import deepspeed_config, lean_engine, require_bf16_support, world
        from cai.models import load_tokenizer

        self.cfg = PpoConfig(**config["ppo"])
        self.seed, self.out = config["seed"], Path(config["out"])
        self.rank, self.world = world()
        train = TrainConfig(**{**self.cfg.train.model_dump(), "batch_size": self.cfg.minibatch, "grad_accum": 1})
        require_bf16_support(train, "ppo")
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
        torch.manual_seed(self.seed + self.rank)
        # the reference matches the policy unless told otherwise (then the KL at step 0 is not exactly 0)
        dtype = getattr(torch, self.cfg.reference_dtype or ("bfloat16" if train.bf16 else "float32"))
        fast = getattr(torch, self.cfg.inference_dtype)
        self.tok = load_tokenizer(config["policy"], padding_side="left")
        policy = AutoModelForCausalLM.from_pretrained(config["policy"], dtype=torch.float32)
        value = AutoModelForSequenceClassification.from_pretrained(config["value_init"], num_labels=1,
                                                                   dtype=torch.float32)
        value.config.pad_token_id = self.tok.pad_token_id
        for model in (policy, value):
            checkpointing.enable(model, train.activation_checkpointing)
        ds = deepspeed_config(train, hf_auto=False, world_size=self.world)
        # fused AdamW: one vectorised pass per tensor (the for-loop one is 0.5 s a step here, and the
        # multi-tensor one allocates temporaries the size of all parameters at once)
        self.policy, *_ = deepspeed.initialize(model=policy, config=ds, optimizer=torch.optim.AdamW(
            policy.parameters(), lr=train.learning_rate, fused=True))
        self.value, *_ = deepspeed.initialize(model=value, config=ds, optimizer=torch.optim.AdamW(
            value.parameters(), lr=self.cfg.value_lr, fused=True))
        for engine in (self.policy, self.value):
            lean_engine(engine, train)
        self.ref = AutoModelForCausalLM.from_pretrained(config["policy"], dtype=dtype).eval()
        self.reward_fn = None
        if config.get("reward_function"):
            module, _, name = config["reward_function"].rpartition(":")
            self.reward_fn = getattr(importlib.import_module(module), name)
        else:
            self.rm_tok = load_tokenizer(config["reward_model"], padding_side="right")
            self.rm = AutoModelForSequenceClassification.from_pretrained(config["reward_model"], dtype=fast).eval()
            self.rm.config.pad_token_id = self.rm_tok.pad_token_id
            self.stats = json.loads(Path(config["reward_model"], "reward_stats.json").read_text())
        self.parked = {}
        if self.cfg.offload_inference_models:
            from cai.parked import ParkedWeights

            self.parked = {name: ParkedWeights(getattr(self, name), self.out / "parked" / f"{name}-{self.rank}.pt")
                           for name in ("ref", "rm") if hasattr(self, name)}
        self.generator = PolicyRolloutGenerator(self.policy, self.tok, train.zero_stage, fast, config["policy"])
        kl = self.cfg.kl
        self.kl_ctl = AdaptiveKL(kl.coef, kl.target, kl.horizon) if kl.controller == "adaptive" else FixedKL(kl.coef)
        self.prompts = [row["prompt"] for row in read_jsonl(Path(config["prompts"]))]
        self.max_prompt = config["max_prompt_tokens"]
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        from cai.distributed import peak_rss_gb

        self.setup_peak_rss_gb = peak_rss_gb()

    # step 1 -------------------------------------------------------------------------------------------
    def batch_prompts(self, step: int) -> list[str]:
        per_step = self.cfg.rollout_batch * self.world
        steps_per_epoch = max(1, len(self.prompts) // per_step)
        epoch, k = divmod(step, steps_per_epoch)
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}|ppo-epoch{epoch}").shuffle(order)
        chosen = order[k * per_step:(k + 1) * per_step]
        return [self.prompts[i] for i in chosen[self.rank::self.world]]

    # steps 2-4 ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, step: int) -> Rollout | ScoredSamples:
        """Steps 1-4; in fused mode steps 1-3 (the update's forward gives the policy's log-probs)."""
        prompts = self.batch_prompts(step)
        prompt_ids = [self.generator.generator.chat_ids([{"role": "user", "content": p}], self.max_prompt)
                      for p in prompts]
        t0 = time.time()
        outs = self.generator.generate(prompt_ids, self.cfg.generation, seed=self.seed * 7919 + step * 101 + self.rank)
        self.generator.release()  # stale from here to the next sync, and not needed before it
        self.timing = {"generate_s": time.time() - t0}
        t0 = time.time()
        ids, attention, mask, P = pack(prompt_ids, [o.ids for o in outs], self.tok.pad_token_id)
        targets = ids[:, P:]
        with self.inference("ref") as ref:
            ref_logp = logprobs_of(response_logits(ref, ids, attention, P), targets) * mask
        values = None if self.values_in_update else response_values(self.value.module, ids, attention, P) * mask
        texts = [o.text for o in outs]
        finished = torch.tensor([float(o.finished) for o in outs])
        raw = self.score(prompts, texts, [list(o.ids) for o in outs])
        score = raw if self.reward_fn else normalised_score(raw, finished, self.stats, self.cfg)
        if self.reward_fn:
            score = score + self.cfg.missing_eos_penalty * (1 - finished)
        self.timing["score_s"] = time.time() - t0
        samples = ScoredSamples(ids, attention, P, mask, ref_logp, values, raw, score, finished, prompts, texts)
        if self.fused:
            return samples
        logp = logprobs_of(response_logits(self.policy.module, ids, attention, P), targets) * mask
        return samples.finish(self.cfg, self.kl_ctl.value, logp)

    def score(self, prompts: list[str], texts: list[str], response_ids: list[list[int]]) -> torch.Tensor:
        """Preference-model score of each (prompt, response) as text: a reward model with another
        tokenizer re-tokenises it with its own chat template."""
        if self.reward_fn:
            return torch.tensor(self.reward_fn(prompts, texts, response_ids), dtype=torch.float32)
        seqs = [self.rm_tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": t}],
                                                tokenize=True, return_dict=True)["input_ids"][-2048:]
                for p, t in zip(prompts, texts)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.rm_tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        with self.inference("rm") as rm:
            return rm(input_ids=ids, attention_mask=(ids != self.rm_tok.pad_token_id).long()).logits[:, 0].float()

    def inference(self, name: str):
        """The reference ("ref") or preference model ("rm"), mapped in for the block when offloaded."""
        return self.parked[name].loaded() if name in self.parked else contextlib.nullcontext(getattr(self, name))

    # step 5 -------------------------------------------------------------------------------------------
    @property
    def fused(self) -> bool:
        """One epoch over one minibatch: the weights at update time are the rollout's, so the policy's
        forward (with grad) also gives the old log-probs, detached (the old values come from the rollout)."""
        return self.cfg.ppo_epochs == 1 and self.cfg.minibatch >= self.cfg.rollout_batch

    @property
    def values_in_update(self) -> bool:
        """Fused, with every layer recomputing its activations: the value forward of the update (with
        grad) also gives the old values, and its graph holds little more than the layers' inputs."""
        return self.fused and self.cfg.train.activation_checkpointing == 1

    def update_fused(self, samples: ScoredSamples) -> tuple[Rollout, dict[str, float]]:
        """The policy's forward, backward and step, then the value model's: one autograd graph alive at
        a time (both at once cost 0.5 GB more at the peak than the value forward they save), unless
        the layers recompute their activations (`values_in_update`)."""
        ids, attention, P, mask = samples.ids, samples.attention, samples.prompt_len, samples.mask
        values = None
        if samples.values is None:
            values = response_values(self.value.module, ids, attention, P) * mask
            samples.values = values.detach()
        logits = response_logits(self.policy, ids, attention, P)
        logp = logprobs_of(logits, ids[:, P:]) * mask
        r = samples.finish(self.cfg, self.kl_ctl.value, logp.detach())
        pl, entropy, pstats = self.policy_objective(logits, logp, r.logp, r.advantages, mask)
        del logits, logp
        if not all_ranks_true(bool(torch.isfinite(pl))):
            self.note_skip()
            return r, {"policy_loss": pl.item(), "value_loss": float("nan"), "entropy": entropy.item(), **pstats,
                       "value_clip_frac": 0.0}
        stepped = self.step_engine(self.policy, pl)
        if values is None:
            values = response_values(self.value.module, ids, attention, P) * mask
        vl, vstats = value_loss(values, r.values, r.returns, mask, self.cfg.value_clip)
        self.record(all_ranks_true(bool(torch.isfinite(vl))) and self.step_engine(self.value, vl) and stepped)
        return r, {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy": entropy.item(), **pstats, **vstats}

    def policy_objective(self, logits, logp, old_logp, advantages, mask):
        """Clipped policy loss minus the entropy bonus; -> (loss, mean entropy, clip stats)."""
        pl, pstats = policy_loss(logp, old_logp, advantages, mask, self.cfg.clip)
        entropy = masked_mean(entropy_from_logits(logits.detach()), mask)
        if self.cfg.entropy_coef:
            pl = pl - self.cfg.entropy_coef * masked_mean(entropy_from_logits(logits), mask)
        return pl, entropy, pstats

    def update(self, r, step: int) -> dict[str, float]:
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "clip_frac",
                                                         "approx_kl", "value_clip_frac")}
        n = len(r.texts)
        for epoch in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 31 * step + epoch))
            for start in range(0, n, self.cfg.minibatch):
                mb = r.rows(order[start:start + self.cfg.minibatch])
                logits = response_logits(self.policy, mb["ids"], mb["attention"], r.prompt_len)
                logp = logprobs_of(logits, mb["ids"][:, r.prompt_len:])
                pl, entropy, pstats = self.policy_objective(logits, logp, mb["logp"], mb["advantages"], mb["mask"])
                values = response_values(self.value.module, mb["ids"], mb["attention"], r.prompt_len)
                vl, vstats = value_loss(values, mb["values"], mb["returns"], mb["mask"], self.cfg.value_clip)
                self.optimise(pl, vl)
                for key, v in {"policy_loss": pl.item(), "value_loss": vl.item(), "entropy": entropy.item(),
                               **pstats, **vstats}.items():
                    stats[key].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def optimise(self, pl: torch.Tensor, vl: torch.Tensor) -> None:
        """Backward and step both engines; a non-finite step is skipped on every rank and counted."""
        if not all_ranks_true(bool(torch.isfinite(pl) and torch.isfinite(vl))):
            self.note_skip()
            return
        stepped = self.step_engine(self.policy, pl)
        self.record(self.step_engine(self.value, vl) and stepped)

    @staticmethod
    def step_engine(engine, loss: torch.Tensor) -> bool:
        """Backward and step; False when DeepSpeed skipped the step for a non-finite gradient norm."""
        before = engine.skipped_steps
        engine.backward(loss)
        engine.step()
        return engine.skipped_steps == before

    def record(self, stepped: bool) -> None:
        if stepped:
            self.consecutive_skips = 0
        else:
            self.note_skip()

    def note_skip(self) -> None:
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.cfg.max_skipped_steps:
            raise CaiError(f"ppo: {self.consecutive_skips} consecutive steps had non-finite losses or gradient "
                           f"norms (step {self.step}); lower ppo.train.learning_rate or check the reward model")

    # checkpoints ---------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Both engines (weights, optimizers, schedulers), RNG states per rank, the data position and the
        KL coefficient; the commit marker is written last, and only then are older checkpoints deleted."""
        root, tag = self.out / "checkpoints", f"step-{step:06d}"
        state = {"step": step, "kl_coef": self.kl_ctl.value, "skipped": self.skipped}
        self.policy.save_checkpoint(str(root / "policy"), tag=tag, client_state=state)
        self.value.save_checkpoint(str(root / "value"), tag=tag)
        (root / "rng").mkdir(parents=True, exist_ok=True)
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, root / "rng" / f"{tag}-{self.rank}.pt")
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            (root / f"{tag}.json").write_text(json.dumps(state))
            (root / f"{tag}.{COMMITTED}").touch()  # the marker, last
            for old in sorted(root.glob(f"step-*.{COMMITTED}"))[:-self.cfg.keep_checkpoints]:
                old_tag = old.name.split(".")[0]
                old.unlink()
                for path in (root / "policy" / old_tag, root / "value" / old_tag):
                    shutil.rmtree(path, ignore_errors=True)
                for path in [root / f"{old_tag}.json", *(root / "rng").glob(f"{old_tag}-*.pt")]:
                    path.unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()

    def restore(self) -> int:
        """Load the newest committed checkpoint, if any; returns the step to continue from."""
        root = self.out / "checkpoints"
        markers = sorted(root.glob(f"step-*.{COMMITTED}")) if root.exists() else []
        if not markers:
            return 0
        tag = markers[-1].name.split(".")[0]
        _, state = self.policy.load_checkpoint(str(root / "policy"), tag=tag)
        self.value.load_checkpoint(str(root / "value"), tag=tag)
        rng = torch.load(root / "rng" / f"{tag}-{self.rank}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.kl_ctl.value, self.skipped = state["kl_coef"], state["skipped"]
        self.generator.sync(self.policy)  # the rollout copy must sample from the restored weights
        return state["step"]

    # the loop ------------------------------------------------------------------------------------------
    def metrics(self, step: int, r, update: dict, seconds: float) -> dict:
        lengths = r.mask.sum(-1)
        local = {"reward_mean": r.raw_score.mean().item(), "reward_std": r.raw_score.std().item() if len(r.texts) > 1
                 else 0.0, "score_mean": r.score.mean().item(), "kl": r.kl.sum(-1).mean().item(),
                 "response_length": lengths.float().mean().item(), "eos_rate": r.finished.mean().item(),
                 "empty_rate": (lengths <= r.finished).float().mean().item(), **update}
        from cai.distributed import peak_rss_gb

        local["peak_rss_gb"] = peak_rss_gb()
        return {"step": step + 1, **{k: round(v, 6) for k, v in mean_over_ranks(local).items()},
                "kl_coef": round(self.kl_ctl.value, 6), "skipped_steps": self.skipped, "step_time": round(seconds, 3)}

    def watch(self, m: dict) -> list[str]:
        """Collapse signals worth a warning: empty responses, runaway KL, a flat reward."""
        warnings = []
        if m["empty_rate"] > 0.9:
            warnings.append("over 90% of responses are empty")
        if self.cfg.kl.controller == "adaptive" and m["kl"] > 5 * self.cfg.kl.target:
            warnings.append(f"KL {m['kl']:.2f} is over 5x its target")
        if m["response_length"] >= self.cfg.generation.max_new_tokens and m["eos_rate"] == 0:
            warnings.append("no response reached EOS")
        return warnings

    def run(self) -> dict:
        start = self.restore()
        log = self.out / "metrics.jsonl"
        if self.rank == 0:
            kept = [line for line in (log.read_text().splitlines() if log.exists() else [])
                    if json.loads(line)["step"] <= start]
            log.write_text("".join(line + "\n" for line in kept))  # a resumed run rewrites later steps
            writer = tensorboard_writer(self.out / "tensorboard")
            progress = ppo_step_lines(self.cfg.steps, start)
        last = {}
        for step in range(start, self.cfg.steps):
            self.step, t0 = step, time.time()
            r = self.rollout(step)                                   # steps 1-4
            t_update = time.time()
            with checkpointing.recomputing(self.policy.module, self.value.module):
                if self.fused:
                    r, update = self.update_fused(r)                 # steps 4-5 in one pass
                else:
                    update = self.update(r, step)                    # step 5
            update = {**update, **self.timing, "update_s": time.time() - t_update}
            last = self.metrics(step, r, update, time.time() - t0)   # step 6
            self.kl_ctl.update(last["kl"], len(r.texts) * self.world)
            self.generator.sync(self.policy)
            if self.rank == 0:
                last["warnings"] = self.watch(last)
                with open(log, "a") as fh:
                    fh.write(json.dumps(last) + "\n")
                if writer:
                    for k, v in last.items():
                        if isinstance(v, (int, float)):
                            writer.add_scalar(f"ppo/{k}", v, step + 1)
                progress(last)
                if (step + 1) % self.cfg.sample_every == 0 or step + 1 == self.cfg.steps:
                    with open(self.out / "samples.jsonl", "a") as fh:
                        for p, t, s in list(zip(r.prompts, r.texts, r.raw_score.tolist()))[:4]:
                            fh.write(json.dumps({"step": step + 1, "prompt": p, "response": t, "score": s}) + "\n")
            if (step + 1) % self.cfg.train.save_steps == 0 and step + 1 < self.cfg.steps:
                self.save(step + 1)
        self.save_model(self.out / "model.tmp")
        for parked in self.parked.values():
            parked.delete()
        from cai.distributed import peak_rss_gb

        return {"steps": self.cfg.steps, "resumed_from_step": start, "skipped_steps": self.skipped,
                "setup_peak_rss_gb": self.setup_peak_rss_gb,
                "final": last, "peak_rss_gb": peak_rss_gb()}

    def save_model(self, folder: Path) -> None:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(self.policy.module.parameters())) \
            if self.cfg.train.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            if self.rank == 0:
                self.policy.module.save_pretrained(folder, safe_serialization=True)
                self.tok.save_pretrained(folder)


def train_worker(config: dict) -> dict:
    """Ray Train entry point."""
    return PPOWorker(config).run()
