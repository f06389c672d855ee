"""Cards for what a run writes, in the Hugging Face Hub's form (README.md: YAML front matter, then Markdown).

A model card in every model folder (sft, reward_model, ppo, dpo, PPO snapshots): the base model, the data with
row counts, the constitution's name and hash, the stage's settings and its headline numbers. A dataset card in
every stage folder: a `configs:` entry per JSONL file (so `load_dataset(folder, name)` reads it), each file's
columns with their types and meaning, row counts, the constitution, and the trl dataset format a file matches.

A model's card is written into model.tmp/ before the rename that commits it (cai/models.py: commit_model), a
stage's before its marker (cai/runner.py); neither is part of any cache key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from cai import card_glossary as text
from cai.shards import write_atomic

CARD = "README.md"
TAGS = ("cai", "constitutional-ai", "rlaif")
EMBEDDED_ON_HUB = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}  # (id, license)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TYPE_ROWS = 2000  # rows read for the column types (every row is counted)
TRL_FORMATS = "https://huggingface.co/docs/trl/dataset_formats"


@dataclass(frozen=True)
class ConstitutionRef:
    name: str
    path: str
    hash: str  # of the whole constitution; a stage's cache key hashes only the parts it reads

    @classmethod
    def of(cls, constitution, path) -> ConstitutionRef:
        return cls(constitution.name, str(path), constitution.part_hash(*type(constitution).model_fields))

    def as_dict(self) -> dict:
        return {"name": self.name, "hash": self.hash, "path": self.path}


@dataclass(frozen=True)
class DataFile:
    stage: str  # the stage folder it is in
    file: str
    rows: int

    @classmethod
    def of(cls, folder: Path, stage: str, file: str) -> DataFile | None:
        """None when the file is not there (a stage run on a hand-made folder): a card never fails a stage."""
        path = Path(folder) / file
        return cls(stage, file, count_rows(path)) if path.is_file() else None


def count_rows(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def hub_model(name: str) -> tuple[str | None, str | None]:
    """A configured model name -> (its Hub id, its license), each None when unknown. A local folder has no Hub id:
    the Hub rejects a path as `base_model`, so the card names it in its body and in `cai.base_model` only."""
    if name in EMBEDDED_ON_HUB:
        return EMBEDDED_ON_HUB[name]
    if HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name, None
    return None, None


def _yaml(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100).strip()


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def _sentence(phrase: str) -> str:
    return phrase[:1].upper() + phrase[1:]


def _front(card_data) -> str:
    return f"---\n{card_data.to_yaml()}\n---\n"


# -- model cards -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCard:
    stage: str                 # the stage that trained it: sft, reward_model, ppo or dpo
    run: str                   # the run's name
    base_model: str            # where its lineage starts, as configured: an alias, a Hub id or a folder
    fine_tuned_from: str       # what this stage trained from: base_model, or this run's sft/model
    constitution: ConstitutionRef
    data: tuple[DataFile, ...]
    settings: dict             # the stage's settings, as its cache key hashes them
    metrics: dict              # headline numbers, picked from the stage's summary (card_glossary.HEADLINE)
    head: str = "causal_lm"    # or "reward_model": a sequence classifier with one scalar output
    step: int | None = None    # a PPO snapshot's step

    def front_matter(self) -> dict:
        hub_id, license_id = hub_model(self.base_model)
        up = "../" * (3 if self.step else 2)  # from the model folder to the run folder
        tags = [*TAGS, self.stage.replace("_", "-")] + (["trl"] if self.stage in ("sft", "dpo") else [])
        return {"library_name": "transformers", "base_model": hub_id, "license": license_id,
                "pipeline_tag": "text-generation" if self.head == "causal_lm" else "text-classification",
                "tags": tags, "datasets": sorted({up + d.stage for d in self.data}),
                "cai": {"stage": self.stage, "run": self.run, "step": self.step, "base_model": self.base_model,
                        "fine_tuned_from": self.fine_tuned_from, "constitution": self.constitution.as_dict()}}

    def render(self) -> str:
        from huggingface_hub import ModelCardData

        meta = self.front_matter()
        meta["cai"] = {k: v for k, v in meta["cai"].items() if v is not None}
        hub_id = meta["base_model"]
        title = f"{self.run}: {self.stage}" + (f" after {self.step} steps" if self.step else "")
        started = f"`{self.base_model}`" + (f" ([{hub_id}](https://huggingface.co/{hub_id}))" if hub_id and
                                             hub_id != self.base_model else "")
        lines = [_front(ModelCardData(**meta)), f"# {title}", "",
                 f"{_sentence(text.MODELS[self.stage])}, trained by cai's `{self.stage}` stage, after "
                 f"*{text.PAPER}*.", "",
                 "## Lineage", "", f"- started from: {started}",
                 "- fine-tuned from: " + ("that model" if self.fine_tuned_from == self.base_model else
                                          f"`{self.fine_tuned_from}` (in this run's folder)"),
                 "", "## Constitution", "",
                 f"`{self.constitution.name}` (hash `{self.constitution.hash}`, from `{self.constitution.path}`): its "
                 f"principles steered the data this model learned from.", "",
                 "## Data", "", "| file (in the run folder) | rows |", "|---|---|",
                 *[f"| `{d.stage}/{d.file}` | {d.rows} |" for d in self.data], "",
                 "## Results", "", "| metric | value | meaning |", "|---|---|---|",
                 *[f"| {k} | {_value(v)} | {text.METRICS.get(k, '')} |" for k, v in self.metrics.items()], "",
                 "## Settings", "", f"The `{self.stage}` stage's settings (what its cache key hashes):", "",
                 "```yaml", _yaml(self.settings), "```", "", "## Use", "", *self._usage()]
        return "\n".join(lines) + "\n"

    def _usage(self) -> list[str]:
        if self.head == "reward_model":
            return ["```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                    'model = AutoModelForSequenceClassification.from_pretrained("path/to/this/folder")', "```", "",
                    "The score is the output at the conversation's last token. `reward_stats.json` holds the "
                    "truncation length and the score mean and standard deviation PPO normalises with "
                    "(cai/preference_model.py reads a conversation exactly as training did)."]
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
                "Or side by side with other checkpoints: `cai eval PIPELINE --checkpoints base,path/to/this/folder`."]


def headline(stage: str, summary: dict) -> dict:
    return {k: summary[k] for k in text.HEADLINE[stage] if summary.get(k) is not None}


def lineage_root(cfg) -> str:
    """The model the run's policies start from (the SFT stage's base)."""
    return cfg.sft.base_model or cfg.policy.name


def model_card(cfg, constitution, stage: str, summary: dict, settings: dict, data: list[DataFile | None], *,
               base_model: str | None = None, fine_tuned_from: str = "sft/model",
               head: str = "causal_lm") -> ModelCard:
    """The card of a stage's model, from the config, the constitution and the stage's summary."""
    return ModelCard(stage=stage, run=cfg.name, base_model=base_model or lineage_root(cfg),
                     fine_tuned_from=fine_tuned_from, constitution=ConstitutionRef.of(constitution, cfg.constitution),
                     data=tuple(d for d in data if d), settings=settings, metrics=headline(stage, summary), head=head)


def write_snapshot_cards(stage_dir: Path, card: ModelCard) -> int:
    """A card in each PPO snapshot folder, with that step's numbers from metrics.jsonl. -> cards written."""
    from cai.checkpoints import SNAPSHOTS

    metrics_file = Path(stage_dir) / "metrics.jsonl"
    by_step = {m["step"]: m for m in map(json.loads, metrics_file.read_text().splitlines())} \
        if metrics_file.exists() else {}
    written = 0
    for folder in sorted(Path(stage_dir, SNAPSHOTS).glob("step-??????")):
        step = int(folder.name.split("-")[1])
        m = by_step.get(step, {})
        numbers = {k: m[k] for k in ("reward_mean", "kl", "response_length", "eos_rate") if k in m}
        write_atomic(folder / CARD, replace(card, step=step, metrics={"steps": step, **numbers}).render())
        written += 1
    return written


# -- dataset cards -----------------------------------------------------------------------------------------------
def type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float, str)):
        return {int: "int", float: "float", str: "string"}[type(v)]
    if isinstance(v, dict):
        return "object"
    if v and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in v):
        return "conversation"
    inner = sorted({type_name(x) for x in v[:50]})
    return f"list[{' or '.join(inner)}]" if inner else "list"


def column_types(path: Path) -> dict[str, set[str]]:
    """Column -> the types its values take (in the first TYPE_ROWS rows), in order of first appearance."""
    columns: dict[str, set[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if n >= TYPE_ROWS:
                break
            for k, v in json.loads(line).items():
                columns.setdefault(k, set()).add(type_name(v))
    for types in columns.values():  # an empty list says nothing beside a typed one
        if "list" in types and any(t.startswith("list[") for t in types):
            types.discard("list")
    return columns


def types_text(types: set[str]) -> str:
    """A column's types for a Markdown cell (no pipes): 'string', 'float or int', 'string (nullable)'."""
    named = " or ".join(sorted(types - {"null"})) or "null"
    return f"{named} (nullable)" if "null" in types and named != "null" else named


def trl_format(columns: dict[str, set[str]]) -> str | None:
    """The trl dataset format (TRL_FORMATS) a file's columns match, or None."""
    names = set(columns)

    def style(*cols: str) -> str | None:
        kinds = {frozenset(columns[c] - {"null"}) for c in cols}
        return {frozenset({"conversation"}): "conversational", frozenset({"string"}): "standard"}.get(
            next(iter(kinds))) if len(kinds) == 1 else None

    for needed, kind in ((("messages",), "language modeling"),
                         (("prompt", "chosen", "rejected"), "preference"),
                         (("chosen", "rejected"), "preference, implicit prompt"),
                         (("prompt", "completion"), "prompt-completion")):
        if set(needed) <= names and (s := style(*needed)):
            return f"{s} {kind} ({', '.join(f'`{c}`' for c in needed)})"
    if {"input_ids", "completion_mask"} <= names:
        return "tokenised prompt-completion (`input_ids`, `completion_mask`)"
    if "prompt" in names and names <= {"prompt", "id", "source"} and (s := style("prompt")):
        return f"{s} prompt-only (`prompt`)"
    return None


@dataclass(frozen=True)
class FileCard:
    file: str
    rows: int
    columns: tuple[tuple[str, str, str], ...]  # (name, types, description)
    trl_format: str | None

    @property
    def config(self) -> str:
        return Path(self.file).stem


def file_cards(stage_dir: Path, stage: str) -> list[FileCard]:
    cards = []
    for path in sorted(Path(stage_dir).glob("*.jsonl")):
        columns = column_types(path)
        described = {**text.COLUMNS["*"], **text.COLUMNS.get(stage, {})}
        cards.append(FileCard(path.name, count_rows(path),
                              tuple((c, types_text(t), described.get(c, "")) for c, t in columns.items()),
                              trl_format(columns)))
    return cards


def render_dataset_card(stage: str, run: str, constitution: ConstitutionRef, files: list[FileCard], settings: dict,
                        summary: dict) -> str:
    from huggingface_hub import DatasetCardData

    meta = DatasetCardData(
        pretty_name=f"{run}: {stage}", tags=[*TAGS, stage.replace("_", "-")],
        configs=[{"config_name": f.config, "data_files": [{"split": "train", "path": f.file}]} for f in files],
        cai={"stage": stage, "run": run, "constitution": constitution.as_dict(),
             "rows": {f.file: f.rows for f in files}})
    lines = [_front(meta), f"# {run}: {stage}", "", text.STAGES.get(stage, ""), "",
             f"Written by cai's `{stage}` stage (*{text.PAPER}*) under the constitution `{constitution.name}` "
             f"(hash `{constitution.hash}`, from `{constitution.path}`).", "", "## Files", ""]
    for f in files:
        fmt = f"[trl format]({TRL_FORMATS}): {f.trl_format}" if f.trl_format else "Not one of trl's formats"
        lines += [f"### `{f.file}`: config `{f.config}`, {f.rows} rows", "",
                  " ".join(filter(None, (text.FILES.get(f"{stage}/{f.file}", ""), fmt + "."))), "",
                  "| column | type | description |", "|---|---|---|",
                  *[f"| `{name}` | {types} | {desc} |" for name, types, desc in f.columns], ""]
    example = files[0].config if files else "NAME"
    lines += ["## Load", "", "```python", "from datasets import load_dataset", "",
              f'rows = load_dataset("path/to/this/folder", "{example}", split="train")', "```", "",
              "## Summary", "", "```yaml", _yaml(summary), "```", "",
              "## Settings", "", f"The `{stage}` stage's settings (what its cache key hashes):", "",
              "```yaml", _yaml(settings), "```"]
    return "\n".join(lines) + "\n"


def write_dataset_card(stage_dir: Path, stage: str, run: str, constitution: ConstitutionRef, settings: dict,
                       summary: dict) -> bool:
    """README.md in a stage folder describing its JSONL files; False (nothing written) when it has none."""
    files = file_cards(stage_dir, stage)
    if not files:
        return False
    write_atomic(Path(stage_dir) / CARD, render_dataset_card(stage, run, constitution, files, settings, summary))
    return True
