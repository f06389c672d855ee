"""Stage `prompts`: the red-team and helpfulness prompt sets (Bai et al. 2022, §3.2).

Steps:
  1. read every configured source (shipped seeds or user files), drop exact duplicates, cap counts;
  2. optionally expand each set by few-shot generation: the policy sees a few seed prompts and
     writes one more; outputs are cleaned, and exact and near duplicates are dropped;
  3. write red_team.jsonl and helpful.jsonl ({id, prompt, source}).
Run alone: `cai run pipelines/default.yaml --stages prompts`.
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

from cai.config import PipelineConfig
from cai.constitution import Constitution
from cai.prompt_files import NearDuplicateFilter, fingerprint, read_source
from cai.chat import user
from cai.shards import ShardStore, chunk, write_jsonl
from cai.stages import Reads

PARTS = ("red_team", "helpful")
EXPAND_SHARD = 32
ASK = {
    "red_team": "Below are messages that people have sent to an AI assistant to test whether it can be "
                "talked into something harmful, unethical or dangerous.",
    "helpful": "Below are everyday questions and tasks that people have sent to an AI assistant.",
}


READS = Reads()
WORKERS = "generation"


def settings(cfg: PipelineConfig) -> dict:
    expand = cfg.prompts.expand.new_prompts > 0
    return {"prompts": cfg.prompts.model_dump(mode="json"), "seed": cfg.seed,
            "sources": {p: [fingerprint(s) for s in getattr(cfg.prompts, p)] for p in PARTS},
            "policy": cfg.policy.model_dump(mode="json") if expand else None}


def models(cfg: PipelineConfig) -> dict[str, str]:
    return {"policy": cfg.policy.name} if cfg.prompts.expand.new_prompts else {}


def planned_shards(cfg: PipelineConfig, inputs: dict[str, Path]) -> dict[str, int]:
    n = cfg.prompts.expand.new_prompts
    return {p: -(-2 * n // EXPAND_SHARD) for p in PARTS} if n else {}


def expansion_request(seed_prompts: list[str], part: str) -> list[dict]:
    listing = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(seed_prompts))
    return [user(f"{ASK[part]}\n\n{listing}\n\nWrite one new message of the same kind, on a different topic "
                 f"from all of these. Reply with the message only, on one line.")]


def clean_generated(text: str) -> str | None:
    """First line of a generated prompt, numbering and quotes stripped; None when unusable."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r'^\s*(\d+[.)]|[-*]|message:|new message:)\s*', "", line, flags=re.IGNORECASE)
    line = line.strip().strip('"“”\'').strip()
    return line if 15 <= len(line) <= 500 and any(c.isalpha() for c in line) else None


def expand_shard(generator, rows: list[dict], seed: int, *, generation) -> tuple[list[dict], int]:
    """Runs on a Ray actor: one generated prompt per request row."""
    outs = generator.generate_chat([r["messages"] for r in rows], generation, seed)
    return [{"request": r["index"], "text": o.text} for r, o in zip(rows, outs)], sum(o.new_tokens for o in outs)


def _expand(cfg: PipelineConfig, part: str, seeds: list[dict], pool, out: Path) -> list[dict]:
    ex = cfg.prompts.expand
    rng = random.Random(f"{cfg.seed}|expand|{part}")
    texts = [s["prompt"] for s in seeds]
    requests = [{"index": i, "messages": expansion_request(rng.sample(texts, min(ex.few_shot, len(texts))), part)}
                for i in range(2 * ex.new_prompts)]  # ask for twice as many: some fail the filters
    store = ShardStore(out / "shards" / part, total=len(chunk(requests, EXPAND_SHARD)))
    pool.map_shards(functools.partial(expand_shard, generation=ex.generation), chunk(requests, EXPAND_SHARD),
                    store, cfg.seed, f"expand {part}")
    dedupe = NearDuplicateFilter(ex.near_duplicate_threshold)
    for t in texts:
        dedupe.add(t)
    new = []
    for row in store.rows():
        text = clean_generated(row["text"])
        if text and dedupe.add(text) and len(new) < ex.new_prompts:
            new.append({"id": f"gen-{part}-{row['request']:05d}", "prompt": text, "source": "generated"})
    return new


def run(cfg: PipelineConfig, constitution: Constitution, inputs: dict[str, Path], out: Path) -> dict:
    summary: dict = {}
    sets: dict[str, list[dict]] = {}
    # step 1: read sources, exact dedupe, cap
    for part in PARTS:
        seen, rows = set(), []
        for src in getattr(cfg.prompts, part):
            for row in read_source(src):
                if row["prompt"] not in seen:
                    seen.add(row["prompt"])
                    rows.append(row)
        cap = getattr(cfg.prompts, f"max_{part}")
        sets[part] = rows[:cap] if cap else rows
        summary[part] = {"seed_prompts": len(sets[part])}
    # step 2: optional expansion by few-shot generation
    if cfg.prompts.expand.new_prompts:
        from cai.pool import GenerationPool

        pool = GenerationPool(cfg.policy, cfg.ray)
        try:
            for part in PARTS:
                new = _expand(cfg, part, sets[part], pool, out)
                summary[part]["generated_kept"] = len(new)
                sets[part] += new
        finally:
            pool.shutdown()
    # step 3: write the sets
    for part in PARTS:
        write_jsonl(out / f"{part}.jsonl", sets[part])
        summary[part]["total"] = len(sets[part])
    return summary
