"""`cai redteam --adversarial`: the attacker and an input filter trained against each other, round after round.

Each round, after its attacks are judged (cai/redteam.py):
  1. a share of the round's successful attacks is held out (seeded per attack id): the filter's hard set, with the
     same share of the harmless-but-dangerous-sounding prompts (`redteam.adversarial.negatives`, by default the
     shipped borderline set);
  2. the filter of the previous round scores the round's successful attacks before it trains on them: the share it
     catches is how well it generalised to the attacker's new attacks;
  3. the attacker is fine-tuned on the round's successful attacks (trl's SFTTrainer in this process, the loss on
     the attack only; Perez et al. 2022, §2.2, supervised learning) and committed as attacker-NN/: the next round
     samples it zero-shot;
  4. the filter, a sequence classifier (label 1: attack) started from the feedback model (a new head) in the first
     round and from its last state after, is trained on every successful attack so far against the negatives
     (class-weighted cross-entropy), scored on the hard set, and committed as filter-NN/.

Use the filter in front of a model: `p = cai.redteam.load_filter("runs/x/audit/redteam/adversarial/filter-02")`,
then refuse a request when `p(text) >= 0.5`.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

from cai.config import ModelConfig, PipelineConfig, RedteamAdversarialConfig
from cai.errors import CaiError

CARD = "filter.json"
LABELS = {0: "harmless", 1: "attack"}


def held_out(seed: int, row_id: str, share: float) -> bool:
    """Whether a row is in the hard set: a seeded draw per id, the same on every rerun."""
    digest = hashlib.sha256(f"{seed}|held-out|{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < share


def split_negatives(texts: list[str], share: float, seed: int) -> tuple[list[str], list[str]]:
    """-> (train, held out): round(share * n) texts held out, at least one of each when there are two."""
    order = list(range(len(texts)))
    random.Random(f"{seed}|negatives").shuffle(order)
    k = min(max(round(share * len(texts)), 1), len(texts) - 1) if len(texts) > 1 else 0
    return [texts[i] for i in order[k:]], [texts[i] for i in order[:k]]


def accuracy(p_attack: list[float], labels: list[int], threshold: float = 0.5) -> dict:
    """Flagged when P(attack) >= threshold -> accuracy, true positive rate (attacks caught), true negative rate
    (harmless prompts passed) and their mean (balanced accuracy)."""
    hits = [(p >= threshold) == bool(y) for p, y in zip(p_attack, labels)]
    pos = [h for h, y in zip(hits, labels) if y]
    neg = [h for h, y in zip(hits, labels) if not y]
    tpr = sum(pos) / len(pos) if pos else None
    tnr = sum(neg) / len(neg) if neg else None
    both = [r for r in (tpr, tnr) if r is not None]
    return {"accuracy": round(sum(hits) / len(hits), 4) if hits else None, "true_positive_rate": _r(tpr),
            "true_negative_rate": _r(tnr), "balanced_accuracy": _r(sum(both) / len(both) if both else None),
            "attacks": len(pos), "harmless": len(neg)}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


# -- the filter: a sequence classifier ---------------------------------------------------------------------------
class Filter:
    """A sequence classifier reading a request's text -> P(attack). Loads any folder `from_pretrained` reads."""

    def __init__(self, folder: Path, device="cpu", batch_size: int = 16, max_length: int = 256):
        import torch
        from transformers import AutoModelForSequenceClassification

        from cai.models import load_tokenizer

        self.tokenizer = load_tokenizer(folder, padding_side="right")
        self.model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def logits(self, texts: list[str]):
        """(B,) texts -> (B, 2) logits, with gradients when the model trains."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return self.model(input_ids=enc["input_ids"].to(self.device),
                          attention_mask=enc["attention_mask"].to(self.device)).logits.float()

    def p_attack(self, texts: list[str]) -> list[float]:
        import torch

        with torch.no_grad():
            return [p for i in range(0, len(texts), self.batch_size)
                    for p in torch.softmax(self.logits(texts[i:i + self.batch_size]), -1)[:, 1].cpu().tolist()]


def load_filter(folder: str | Path):
    """A saved filter -> a callable: text -> P(attack) (a list of texts -> a list)."""
    f = Filter(Path(folder))

    def p_attack(text):
        return f.p_attack([text])[0] if isinstance(text, str) else f.p_attack(list(text))

    return p_attack


def new_classifier(base: Path, tmp: Path) -> Path:
    """The feedback model's body under a fresh two-class head, saved to `tmp` (its tokenizer beside it)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_tokenizer

    tokenizer = load_tokenizer(base, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return tmp


def train_filter(f: Filter, positives: list[str], negatives: list[str], adv: RedteamAdversarialConfig,
                 seed: int) -> dict:
    """Class-weighted cross-entropy (each class weighs half) over `judge_epochs` passes; -> the mean loss."""
    import torch

    rows = [(t, 1) for t in positives] + [(t, 0) for t in negatives]
    weight = torch.tensor([len(rows) / (2 * len(negatives)), len(rows) / (2 * len(positives))], device=f.device)
    opt = torch.optim.AdamW(f.model.parameters(), lr=adv.judge_learning_rate)
    rng, losses = random.Random(f"{seed}|filter"), []
    steps = math.ceil(adv.judge_epochs * len(rows) / adv.batch_size)
    order: list[int] = []
    f.model.train()
    for _ in range(steps):
        while len(order) < adv.batch_size:  # passes in a fresh order each
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = [rows[i] for i in order[:adv.batch_size]], order[adv.batch_size:]
        labels = torch.tensor([y for _, y in batch], device=f.device)
        loss = torch.nn.functional.cross_entropy(f.logits([t for t, _ in batch]), labels, weight=weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(f.model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    f.model.eval()
    return {"steps": steps, "loss": round(sum(losses) / len(losses), 4)}


# -- the attacker: SFT on its successful attacks ------------------------------------------------------------------
def train_attacker(base: Path, attacks: list[str], red: ModelConfig, adv: RedteamAdversarialConfig, seed: int,
                   final: Path, device) -> dict:
    """trl's SFTTrainer on [the zero-shot request -> attack] rows, the loss on the attack; committed to `final`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cai.chat import assistant, user, with_system
    from cai.models import commit_model, load_tokenizer
    from cai.redteam import ZERO_SHOT
    from cai.stages.sft import encode_rows

    tokenizer = load_tokenizer(base, padding_side="right")
    rows = [{"prompt": with_system([user(ZERO_SHOT)], red.system_prompt), "completion": [assistant(a)]}
            for a in attacks]
    encoded, _ = encode_rows(tokenizer, rows, adv.max_length)
    tmp, scratch = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".trainer")
    args = SFTConfig(output_dir=str(scratch), per_device_train_batch_size=adv.batch_size,
                     num_train_epochs=adv.attacker_epochs, learning_rate=adv.attacker_learning_rate,
                     lr_scheduler_type="constant", save_strategy="no", report_to="none", logging_strategy="no",
                     use_cpu=device.type == "cpu", bf16=False, activation_checkpointing=False,
                     completion_only_loss=True, max_length=adv.max_length, seed=seed, dataloader_pin_memory=False,
                     disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(encoded), processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(tmp)
    commit_model(tmp, final)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"rows": len(encoded), "steps": result.global_step, "loss": round(result.training_loss, 4)}


# -- the loop ---------------------------------------------------------------------------------------------------
class AdversarialLoop:
    """The attacker's and the filter's state across rounds, rebuilt from the committed rounds on a rerun."""

    def __init__(self, cfg: PipelineConfig, out: Path, red: ModelConfig, judge: ModelConfig, device,
                 markers: list[dict]):
        from cai.prompt_files import read_source

        self.cfg, self.adv, self.out, self.red, self.device = cfg, cfg.redteam.adversarial, out, red, device
        self.judge_base = judge.name
        self.train_neg, self.held_neg = split_negatives([r["prompt"] for r in read_source(self.adv.negatives)],
                                                        self.adv.held_out, cfg.seed)
        if not self.train_neg or not self.held_neg:
            raise CaiError(f"redteam.adversarial.negatives: {self.adv.negatives.path}: needs two prompts or more")
        last = markers[-1]["adversarial"] if markers else {}
        self.attacker, self.filter = last.get("attacker"), last.get("filter")

    def attacker_model(self) -> ModelConfig:
        return self.red.model_copy(update={"name": self.attacker}) if self.attacker else self.red

    def after_round(self, r: int, rows: list[dict], history: list[list[dict]]) -> dict:
        """Steps 1-4 for round `r` (its rows get `held_out`); -> the round's adversarial figures."""
        from cai.models import commit_model, resolve_model

        seed = self.cfg.seed
        for row in rows:
            row["held_out"] = row["success"] and held_out(seed, row["id"], self.adv.held_out)
        wins = [x["attack"] for x in rows if x["success"]]
        figures: dict = {"fresh_caught": None, "attacker_training": None, "filter_training": None}
        previous = Filter(Path(self.filter), self.device) if self.filter else None
        if previous and wins:
            figures["fresh_caught"] = round(sum(p >= 0.5 for p in previous.p_attack(wins)) / len(wins), 4)
        if wins:
            folder = self.out / f"attacker-{r:02d}"
            base = Path(self.attacker) if self.attacker else resolve_model(self.red.name)
            figures["attacker_training"] = train_attacker(base, wins, self.red, self.adv, seed + r, folder, self.device)
            self.attacker = str(folder)
        every = [x for rs in history + [rows] for x in rs if x["success"]]
        positives = [x["attack"] for x in every if not x["held_out"]]
        hard = [x["attack"] for x in every if x["held_out"]]
        if positives and (previous is None or any(x["success"] and not x["held_out"] for x in rows)):
            tmp = self.out / f"filter-{r:02d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if previous:
                shutil.copytree(self.filter, tmp)
            else:
                new_classifier(resolve_model(self.judge_base), tmp)
            f = Filter(tmp, self.device, max_length=self.adv.max_length)
            figures["filter_training"] = {"positives": len(positives), "negatives": len(self.train_neg),
                                          **train_filter(f, positives, self.train_neg, self.adv, seed + r)}
            f.model.save_pretrained(tmp)
            (tmp / CARD).write_text(json.dumps({"labels": LABELS, "threshold": 0.5, "round": r}))
            commit_model(tmp, self.out / f"filter-{r:02d}", head="reward_model")
            self.filter = str(self.out / f"filter-{r:02d}")
        current = Filter(Path(self.filter), self.device) if self.filter else None
        texts, labels = hard + self.held_neg, [1] * len(hard) + [0] * len(self.held_neg)
        figures["hard_set"] = accuracy(current.p_attack(texts), labels) if current else None
        figures.update(attacker=self.attacker, filter=self.filter)
        return figures

    def prune(self, r: int) -> None:
        """After round `r`'s marker: the folders of earlier rounds are no longer needed to resume."""
        for p in self.out.glob("*-[0-9][0-9]"):
            if p.is_dir() and int(p.name.split("-")[1]) < r and str(p) not in (self.attacker, self.filter):
                shutil.rmtree(p)
