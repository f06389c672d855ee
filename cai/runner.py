"""The pipeline runner: the one place that knows the stage order and how artifacts flow.

Each stage writes into <output_dir>/<stage>/ and is done when its marker `_COMPLETE.json` exists
with the stage's current cache key. The key hashes what the stage reads: its config section, the
constitution parts it uses, its models, and the keys of its inputs. A stage whose key changed is
cleared and rerun; so are the stages downstream of it, because their keys include its key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

from cai.config import STAGE_ORDER, PipelineConfig, active_stages, feedback_model
from cai.constitution import load_constitution
from cai.errors import CaiError
from cai.models import resolve_model
from cai.progress import console
from cai.shards import write_atomic
from cai.stages import critique_revise, dpo, ppo, preferences, prompts, reward_model, sft

# stage name -> (module, the stages whose outputs it reads)
STAGES: dict[str, tuple[ModuleType, tuple[str, ...]]] = {
    "prompts": (prompts, ()),
    "critique_revise": (critique_revise, ("prompts",)),
    "sft": (sft, ("critique_revise",)),
    "preferences": (preferences, ("prompts", "sft")),
    "reward_model": (reward_model, ("sft", "preferences")),
    "ppo": (ppo, ("prompts", "sft", "reward_model")),
    "dpo": (dpo, ("sft", "preferences")),
}
MARKER, STARTED, OWNER = "_COMPLETE.json", "_STARTED.json", "cai-run.json"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def claim_output_dir(out: Path, run_name: str) -> None:
    """An output folder belongs to one run name; refuse folders that hold anything else."""
    owner = read_json(out / OWNER)
    if owner is None and out.exists() and any(out.iterdir()):
        raise CaiError(f"output_dir {out}: holds files that are not a cai run's outputs; choose an empty folder")
    if owner is not None and owner.get("name") != run_name:
        raise CaiError(f"output_dir {out}: holds the outputs of run '{owner.get('name')}', not '{run_name}'; "
                       f"choose another output_dir or set name: {owner.get('name')}")
    if owner is None:
        write_atomic(out / OWNER, json.dumps({"name": run_name, "created": time.time()}))


def stage_keys(cfg: PipelineConfig, constitution) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name in STAGE_ORDER:
        module, deps = STAGES[name]
        blob = json.dumps({"stage": name, "reads": module.cache_inputs(cfg, constitution),
                           "inputs": {d: keys[d] for d in deps}}, sort_keys=True)
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return keys


def models_needed(cfg: PipelineConfig, selected: list[str]) -> list[str]:
    needed = []
    if "critique_revise" in selected or ("prompts" in selected and cfg.prompts.expand.new_prompts):
        needed.append(cfg.policy.name)
    if "sft" in selected:
        needed.append(sft.base_model(cfg))
    if "preferences" in selected:
        needed.append(feedback_model(cfg).name)
    if "reward_model" in selected and cfg.reward_model.base_model:
        needed.append(cfg.reward_model.base_model)
    return needed


def is_done(stage_dir: Path, key: str) -> bool:
    marker = read_json(stage_dir / MARKER)
    return marker is not None and marker.get("key") == key


def _clear(stage_dir: Path) -> None:
    """Move aside, then delete: a crash in between never leaves a half-deleted stage in place."""
    if stage_dir.exists():
        trash = stage_dir.with_name(f".{stage_dir.name}.old{os.getpid()}")
        os.replace(stage_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)


def run_pipeline(cfg: PipelineConfig, only: list[str] | None = None) -> dict[str, dict]:
    """Run the configured stages in order, skipping those whose outputs are current."""
    out = Path(cfg.output_dir)
    constitution = load_constitution(cfg.constitution)
    selected = [s for s in STAGE_ORDER if s in only] if only else active_stages(cfg)
    keys = stage_keys(cfg, constitution)
    for model in models_needed(cfg, selected):
        resolve_model(model)  # a missing model fails here, before anything is written
    claim_output_dir(out, cfg.name)
    results: dict[str, dict] = {}
    try:
        for name in selected:
            module, deps = STAGES[name]
            stage_dir = out / name
            for dep in deps:
                if not is_done(out / dep, keys[dep]):
                    raise CaiError(f"stage {name}: needs the current output of stage {dep}; run it first "
                                   f"(add it to --stages)")
            if is_done(stage_dir, keys[name]):
                console.print(f"[green]✓[/] {name}: up to date ({keys[name]}), skipped")
                results[name] = {"status": "cached", **read_json(stage_dir / MARKER)["summary"]}
                continue
            started = read_json(stage_dir / STARTED)
            if stage_dir.exists() and (started is None or started.get("key") != keys[name]):
                _clear(stage_dir)  # outputs of another config: never mix them with this one's
            inputs = {d: out / d for d in deps}
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(stage_dir / STARTED, json.dumps(
                {"key": keys[name], "shards": module.planned_shards(cfg, inputs)}))
            console.print(f"[bold]▶ {name}[/] ({keys[name]})")
            t0 = time.time()
            summary = module.run(cfg, constitution, inputs, stage_dir)
            seconds = round(time.time() - t0, 1)
            write_atomic(stage_dir / MARKER, json.dumps({"key": keys[name], "summary": summary,
                                                         "seconds": seconds}, indent=1))
            console.print(f"[green]✓[/] {name}: done in {seconds}s {json.dumps(summary)}")
            results[name] = {"status": "done", **summary}
    finally:
        _stop_ray()
    for name in selected:  # the per-principle tables, at the end where they are seen
        table = out / name / "attribution.md"
        if table.exists():
            console.print(table.read_text())
    return results


def _stop_ray() -> None:
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def stage_status(out: Path) -> list[tuple[str, str]]:
    """(stage, 'done' | 'partial (n of m shards)' | 'not started') for every stage."""
    rows = []
    for name in STAGE_ORDER:
        stage_dir = Path(out) / name
        marker, started = read_json(stage_dir / MARKER), read_json(stage_dir / STARTED)
        if marker is not None:
            rows.append((name, f"done in {marker['seconds']}s: {json.dumps(marker['summary'])}"))
        elif started is not None:
            plan = started["shards"]
            total = sum(plan.values())
            have = sum(len(list((stage_dir / "shards" / part).glob("shard-*.jsonl"))) for part in plan)
            rows.append((name, f"partial ({have} of {total} shards)"))
        else:
            rows.append((name, "not started"))
    return rows
