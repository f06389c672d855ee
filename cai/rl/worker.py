"""The PPO loop on every Ray Train worker (SPMD): each rank rolls out its slice of the prompt batch, then the
policy and value DeepSpeed engines all-reduce gradients. Per iteration (the comments use these numbers):
  1. this rank's prompts for the step (a seeded permutation per epoch, so a resumed run sees the same);
  2. sample responses from the current policy (seeded by step and rank);
  3. score: log-probs under the reference (and, unless the update's forward gives them, the policy's log-probs
     and the values), the sequence score;
  4. rewards (score on the last token, KL penalty on every token), GAE, whitened advantages;
  5. PPO epochs over minibatches: clipped policy loss (+ entropy bonus), then clipped value loss;
  6. metrics (averaged over ranks), KL controller update, guards, a committed checkpoint.
Log-probs and the KL are those of the distribution sampled from: the logits divided by the temperature.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from cai import stopping
from cai.cluster import Resources, peak_rss_gb, worker_init
from cai.config import TrainConfig
from cai.errors import CaiError
from cai.jobs import PpoJob
from cai.prompting import clean_reply
from cai.rl import checkpoint
from cai.rl.experience import Experience, pack
from cai.rl.math import AdaptiveKL, FixedKL, entropy_from_logits, logprobs_of, masked_mean, policy_loss, value_loss
from cai.rl.models import load_models, response_logits, response_values
from cai.rl.rollout import RolloutWeights, rollout_generator
from cai.train import recompute
from cai.train.deepspeed import gathered, grad_norm


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist()))


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """Every rank must take the same branch around a collective (skip or step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def ppo_train_config(job: PpoJob) -> TrainConfig:
    """The engines' batch: one minibatch per optimizer step, no accumulation."""
    return job.ppo.train.model_copy(update={"batch_size": job.ppo.minibatch, "grad_accum": 1})


class PPOWorker:
    def __init__(self, job: PpoJob):
        self.job, self.cfg = job, job.ppo
        self.train = ppo_train_config(job)
        self.worker = worker_init(Resources.of_training(self.train, "ppo"), job.seed)
        self.train = self.worker.decided(self.train)  # bf16 auto decided for this device
        self.device, self.rank, self.world = self.worker.device, self.worker.rank, self.worker.world
        self.models = load_models(job, self.train, self.worker, self.optimizer_steps)
        weights = RolloutWeights(self.models.policy, self.train.zero_stage, getattr(torch, self.models.inference_dtype),
                                 job.policy, self.device, self.train.lora)
        self.rollouts = rollout_generator(self.cfg.rollout_backend, weights, self.models.tokenizer,
                                          self.cfg.generation, job.system_prompt, job.max_prompt_tokens, self.device)
        kl = self.cfg.kl
        self.kl_ctl = AdaptiveKL(kl.coef, kl.target, kl.horizon) if kl.controller == "adaptive" else FixedKL(kl.coef)
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self.setup_peak_rss_gb = peak_rss_gb()

    @property
    def minibatches_per_epoch(self) -> int:
        return -(-self.cfg.rollout_batch // self.cfg.minibatch)

    @property
    def optimizer_steps(self) -> int:
        return self.cfg.steps * self.cfg.ppo_epochs * self.minibatches_per_epoch

    @property
    def fused(self) -> bool:
        """One epoch over one minibatch: the weights at update time are the rollout's, so the update's policy
        forward (with grad) also gives the old log-probs, detached."""
        return self.cfg.ppo_epochs == 1 and self.minibatches_per_epoch == 1

    @property
    def values_in_update(self) -> bool:
        """Fused, with every layer recomputing its activations: the update's value forward (with grad) also
        gives the old values, and its graph holds little more than the layers' inputs."""
        return self.fused and self.train.activation_checkpointing == 1

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.job.prompts) // (self.cfg.rollout_batch * self.world))

    # step 1 -------------------------------------------------------------------------------------------
    def batch_prompts(self, step: int) -> list[str]:
        prompts, per_step = self.job.prompts, self.cfg.rollout_batch * self.world
        epoch, k = divmod(step, self.steps_per_epoch)
        order = list(range(len(prompts)))
        random.Random(f"{self.job.seed}|ppo-epoch{epoch}").shuffle(order)
        chosen = order[k * per_step:(k + 1) * per_step]
        return [prompts[i] for i in chosen[self.rank::self.world]]

    # steps 2-3 ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, step: int) -> Experience:
        prompts = self.batch_prompts(step)
        prompt_ids = self.rollouts.prompt_ids(prompts)
        t0 = time.time()
        outs = self.rollouts.generate(prompt_ids, seed=self.job.seed * 7919 + step * 101 + self.rank)
        self.rollouts.release()  # stale from here to the next sync, and not needed before it
        self.timing = {"generate_s": time.time() - t0}
        t0 = time.time()
        ids, attention, mask, P = pack(prompt_ids, [o.ids for o in outs], self.models.tokenizer.pad_token_id,
                                       self.device)
        T = self.cfg.generation.temperature
        # the kernel the update's forward takes (its old log-probs): in bf16 another kernel's rounding is KL noise
        with self.models.reference.use() as ref, self.worker.training_attention():
            ref_logp = logprobs_of(response_logits(ref, ids, attention, P, T), ids[:, P:]) * mask
        texts = [clean_reply(o.text) for o in outs]  # as the preference pairs were cleaned
        finished = torch.tensor([float(o.finished) for o in outs], device=self.device)
        raw, score = self.models.score(prompts, texts, [list(o.ids) for o in outs], finished)
        exp = Experience(ids, attention, P, mask, ref_logp, raw, score, finished, prompts, texts)
        with self.worker.training_attention():  # as in the update, so that its first ratios are exactly 1
            if not self.values_in_update:
                exp.values = response_values(self.models.value.module, ids, attention, P) * mask
            if not self.fused:
                exp.logp = logprobs_of(response_logits(self.models.policy.module, ids, attention, P, T),
                                       ids[:, P:]) * mask
                exp.finish(self.cfg, self.kl_ctl.value)
        self.timing["score_s"] = time.time() - t0
        return exp

    # steps 4-5 ----------------------------------------------------------------------------------------
    def minibatches(self, n: int, step: int, epoch: int) -> list[torch.Tensor]:
        """Row indices per gradient step; a fused update takes every row in order."""
        if self.fused:
            return [torch.arange(n, device=self.device)]
        order = random.Random(f"{self.job.seed}|ppo-minibatch|{step}|{epoch}").sample(range(n), n)
        return [torch.tensor(order[i:i + self.cfg.minibatch], device=self.device)
                for i in range(0, n, self.cfg.minibatch)]

    def update(self, exp: Experience, step: int) -> dict[str, float]:
        """Per minibatch: the policy's forward, backward and step, then the value model's (one autograd graph
        alive at a time), unless the value forward must come first to give the old values."""
        policy, value, T = self.models.policy, self.models.value, self.cfg.generation.temperature
        stats: dict[str, list[float]] = defaultdict(list)
        for epoch in range(self.cfg.ppo_epochs):
            for idx in self.minibatches(len(exp.texts), step, epoch):
                values = None
                if exp.values is None:  # values_in_update: this forward gives the old values too
                    values = response_values(value.module, exp.ids, exp.attention, exp.prompt_len) * exp.mask
                    exp.values = values.detach()
                logits = response_logits(policy, exp.ids[idx], exp.attention[idx], exp.prompt_len, T)
                logp = logprobs_of(logits, exp.ids[idx, exp.prompt_len:]) * exp.mask[idx]
                if exp.advantages is None:  # fused: the weights are still the rollout's (step 4 here)
                    exp.logp = logp.detach()
                    exp.finish(self.cfg, self.kl_ctl.value)
                mb = exp.rows(idx)
                pl, entropy, pstats = self.policy_objective(logits, logp, mb)
                del logits, logp
                vstats = {"value_loss": float("nan"), "value_clip_frac": 0.0}
                if all_ranks_true(bool(torch.isfinite(pl)), self.device):
                    stepped = self.step_engine(policy, pl)
                    if values is None:
                        values = response_values(value.module, mb.ids, mb.attention, exp.prompt_len) * mb.mask
                    vl, clip_stats = value_loss(values, mb.values, mb.returns, mb.mask, self.cfg.value_clip)
                    vstats = {"value_loss": vl.item(), **clip_stats}
                    finite = all_ranks_true(bool(torch.isfinite(vl)), self.device)
                    self.record(finite and self.step_engine(value, vl) and stepped)
                    norms = {"grad_norm": grad_norm(policy), "value_grad_norm": grad_norm(value)}
                    vstats.update({k: v for k, v in norms.items() if v is not None})
                else:
                    self.note_skip()
                for k, v in {"policy_loss": pl.item(), "entropy": entropy.item(), **pstats, **vstats}.items():
                    stats[k].append(v)
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def policy_objective(self, logits, logp, mb):
        """Clipped policy loss minus the entropy bonus; -> (loss, mean entropy, clip stats)."""
        pl, pstats = policy_loss(logp, mb.logp, mb.advantages, mb.mask, self.cfg.clip)
        entropy = masked_mean(entropy_from_logits(logits.detach()), mb.mask)
        if self.cfg.entropy_coef:
            pl = pl - self.cfg.entropy_coef * masked_mean(entropy_from_logits(logits), mb.mask)
        return pl, entropy, pstats

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

    # step 6 -------------------------------------------------------------------------------------------
    def metrics(self, step: int, exp: Experience, update: dict, seconds: float) -> dict:
        lengths = exp.mask.sum(-1)
        local = {"reward_mean": exp.raw_score.mean().item(),
                 "reward_std": exp.raw_score.std().item() if len(exp.texts) > 1 else 0.0,
                 "score_mean": exp.score.mean().item(), "kl": exp.kl.sum(-1).mean().item(),
                 "response_length": lengths.float().mean().item(), "eos_rate": exp.finished.mean().item(),
                 "empty_rate": (lengths <= exp.finished).float().mean().item(), **update, "peak_rss_gb": peak_rss_gb()}
        return {"step": step + 1, **{k: float(f"{v:.6g}") for k, v in mean_over_ranks(local, self.device).items()},
                "kl_coef": round(self.kl_ctl.value, 6), "skipped_steps": self.skipped, "step_time": round(seconds, 3),
                "epoch": round((step + 1) / self.steps_per_epoch, 6)}

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

    def save(self, step: int) -> None:
        state = checkpoint.LoopState(step=step, kl_coef=self.kl_ctl.value, skipped=self.skipped)
        checkpoint.save(self.job.out / "checkpoints", state, self.models.policy, self.models.value, self.rank,
                        self.cfg.keep_checkpoints)

    def restore(self) -> int:
        state = checkpoint.restore(self.job.out / "checkpoints", self.models.policy, self.models.value, self.rank)
        if state is None:
            return 0
        self.kl_ctl.value, self.skipped = state.kl_coef, state.skipped
        self.rollouts.sync()  # sample from the restored weights
        return state.step

    def save_policy(self, folder: Path) -> None:
        """The policy as an HF folder (ZeRO-3 shards gathered; every rank joins)."""
        module = self.models.policy.module
        with gathered(module, self.train.zero_stage):
            if self.rank == 0:
                module.save_pretrained(folder, safe_serialization=True)
                self.models.tokenizer.save_pretrained(folder)

    def save_snapshot(self, step: int) -> None:
        """The policy after `step` steps, for evaluation along the run (ppo@<step>): written aside, then renamed,
        before the checkpoint of the same step, so a resumed run never lacks a snapshot it passed."""
        from cai.checkpoints import snapshot_folder
        from cai.lora import merge_adapter

        final = snapshot_folder(self.job.out, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.save_policy(tmp)
        if self.rank == 0:
            if self.train.lora:  # a plain model folder for `cai eval`, its adapter inside
                merge_adapter(tmp, self.job.policy, "causal_lm", tmp / "adapter")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    # the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        from cai.metrics_log import Reporter
        from cai.progress import PpoLog

        start = self.restore()
        log = PpoLog(self.job.out, self.cfg.steps, start, Reporter(self.job.report)) if self.rank == 0 else None
        try:
            return self.loop(start, log)
        finally:
            if log:
                log.close()

    def loop(self, start: int, log) -> dict:
        """Steps `start`..`steps` (numbered as in the module docstring); rank 0 records each in `log`."""
        last: dict = {}
        for step in range(start, self.cfg.steps):
            self.step, t0 = step, time.time()
            exp = self.rollout(step)                                     # steps 1-3
            t_update, lr = time.time(), self.models.policy.get_lr()[0]  # the schedule's rate for this step
            with recompute.recomputing(self.models.policy.module, self.models.value.module), \
                    self.worker.training_attention():
                update = self.update(exp, step)                          # steps 4-5
            update = {**update, **self.timing, "update_s": time.time() - t_update, "lr": lr}
            last = self.metrics(step, exp, update, time.time() - t0)     # step 6
            self.kl_ctl.update(last["kl"], len(exp.texts) * self.world)
            self.rollouts.sync()
            if log:
                last["warnings"] = self.watch(last)
                log.step(last, exp.prompts, exp.texts, exp.raw_score.tolist(), self.cfg.sample_every)
            every = self.cfg.keep_snapshots_every
            if every and (step + 1) % every == 0 and step + 1 < self.cfg.steps:
                self.save_snapshot(step + 1)
            stop = stopping.agreed(self.device) and step + 1 < self.cfg.steps
            if stop or ((step + 1) % self.cfg.train.save_steps == 0 and step + 1 < self.cfg.steps):
                self.save(step + 1)
            if stop:  # preemption: checkpointed, out
                return {"stopped": True, "step": step + 1}
        self.save_policy(self.job.out / "model.tmp")  # with LoRA, the adapter: the driver merges it on commit
        sizes = held_params(self.models)
        self.models.reference.delete()
        self.models.score.delete()
        return {"steps": self.cfg.steps, "resumed_from_step": start, "skipped_steps": self.skipped,
                "device": str(self.device), "bf16": self.worker.bf16,
                "setup_peak_rss_gb": self.setup_peak_rss_gb, "final": last, "peak_rss_gb": peak_rss_gb(), **sizes}


def held_params(models) -> dict:
    """The policy's trainable share, and the parameters the reference holds of its own: 0 for a LoRA policy,
    whose reference is its own base with the adapters off."""
    from cai.lora import trainable_share

    return {**{f"policy_{k}": v for k, v in trainable_share(models.policy.module).items()},
            "reference_own_params": models.reference.own_params}


def train_worker(job: PpoJob) -> dict:
    """Ray Train entry point."""
    return PPOWorker(job).run()
