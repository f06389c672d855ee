"""The constitution: principles a user writes in YAML, loaded and checked with line numbers.

Format: constitutions/README.md. Stages hash only the parts they read (`part_hash`), so editing a
preference principle does not rerun critique_revise.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai.errors import CaiError, bad_character, where
from cai.yamlfile import line_of, read_yaml, validate_yaml

ID_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _not_blank(cls, v):
        if isinstance(v, str) and not v.strip():
            raise ValueError("must not be empty")
        if isinstance(v, str) and (problem := bad_character(v)):
            raise ValueError(f"holds {problem}")
        return v.strip() if isinstance(v, str) else v


class CritiqueRevisionPrinciple(Item):
    id: str = Field(pattern=ID_PATTERN)
    critique: str
    revision: str


class PreferencePrinciple(Item):
    id: str = Field(pattern=ID_PATTERN)
    aspect: Literal["harmless", "helpful"] = "harmless"
    question: str
    cot_question: str | None = None


class FewShotRevision(Item):
    id: str = Field(pattern=ID_PATTERN)
    principle: str
    prompt: str
    response: str
    critique: str
    revision: str


class FewShotLabel(Item):
    id: str = Field(pattern=ID_PATTERN)
    aspect: Literal["harmless", "helpful"] = "harmless"
    prompt: str
    response_a: str
    response_b: str
    answer: Literal["A", "B"]
    reasoning: str | None = None


class Constitution(Item):
    name: str = Field(pattern=ID_PATTERN)
    description: str
    critique_revision: list[CritiqueRevisionPrinciple] = Field(min_length=1)
    preference: list[PreferencePrinciple] = Field(min_length=1)
    few_shot_revisions: list[FewShotRevision] = Field(min_length=1)
    few_shot_labels: list[FewShotLabel] = []

    def principle(self, principle_id: str) -> CritiqueRevisionPrinciple:
        return next(p for p in self.critique_revision if p.id == principle_id)

    def part_hash(self, *parts: str) -> str:
        """Hash of the named parts only; the cache key of a stage includes the parts it reads."""
        blob = json.dumps({p: self.model_dump(mode="json")[p] for p in parts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


LIST_PARTS = ("critique_revision", "preference", "few_shot_revisions", "few_shot_labels")


def _check_references(c: Constitution, file: Path, lines: dict) -> None:
    seen: dict[str, tuple] = {}
    for part in LIST_PARTS:
        for i, item in enumerate(getattr(c, part)):
            loc = (part, i, "id")
            if item.id in seen:
                first = line_of(lines, seen[item.id])
                raise CaiError(f"{where(file, line_of(lines, loc), f'{part}.{i}.id')}: "
                               f"duplicate id '{item.id}' (first used on line {first})")
            seen[item.id] = loc
    known = {p.id for p in c.critique_revision}
    for i, shot in enumerate(c.few_shot_revisions):
        if shot.principle not in known:
            loc = ("few_shot_revisions", i, "principle")
            raise CaiError(f"{where(file, line_of(lines, loc), f'few_shot_revisions.{i}.principle')}: "
                           f"unknown critique_revision id '{shot.principle}'")


def load_constitution(file: str | Path) -> Constitution:
    """Load and check a constitution; any problem is one CaiError naming file, line and key."""
    file = Path(file)
    data, lines = read_yaml(file)
    if not isinstance(data, dict):
        raise CaiError(f"{file}: expected a mapping with name, description, critique_revision, ...")
    constitution = validate_yaml(Constitution, data, file, lines)
    _check_references(constitution, file, lines)
    return constitution
