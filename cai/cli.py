"""`cai` command line: run a pipeline, print its config, check a constitution, show run status.

  cai run pipelines/default.yaml [key=value ...] [--stages prompts,critique_revise]
  cai config pipelines/default.yaml [key=value ...]
  cai status runs/default
  cai constitution check constitutions/default.yaml
  cai model prepare [smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import os
import sys

from cai.errors import CaiError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI pipeline")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline's stages in order (cached stages are skipped)")
    run.add_argument("pipeline")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. critique_revise.rounds=2")
    run.add_argument("--stages", help="comma-separated subset of stages to run")
    cfg = sub.add_parser("config", help="print the resolved config")
    cfg.add_argument("pipeline")
    cfg.add_argument("overrides", nargs="*")
    status = sub.add_parser("status", help="show each stage of a run: done, partial or not started")
    status.add_argument("output_dir")
    const = sub.add_parser("constitution", help="constitution tools")
    const.add_argument("action", choices=["check"])
    const.add_argument("file")
    model = sub.add_parser("model", help="model tools")
    model.add_argument("action", choices=["prepare"])
    model.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    return p


def _run(args) -> None:
    from cai.config import STAGE_ORDER, load_pipeline
    from cai.runner import run_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    only = None
    if args.stages:
        only = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in only if s not in STAGE_ORDER]
        if unknown:
            raise CaiError(f"--stages: unknown stage '{unknown[0]}' (stages: {', '.join(STAGE_ORDER)})")
    run_pipeline(cfg, only)
    print(f"outputs in {cfg.output_dir}")


def _constitution_check(path: str) -> None:
    from cai.constitution import load_constitution

    c = load_constitution(path)
    aspects = {a: sum(p.aspect == a for p in c.preference) for a in ("harmless", "helpful")}
    print(f"{path}: ok: '{c.name}', {len(c.critique_revision)} critique/revision principles, "
          f"{len(c.preference)} preference principles ({aspects['harmless']} harmless, {aspects['helpful']} "
          f"helpful), {len(c.few_shot_revisions)} few-shot revisions, {len(c.few_shot_labels)} few-shot labels")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            _run(args)
        elif args.command == "config":
            from cai.config import dump_config, load_pipeline

            print(dump_config(load_pipeline(args.pipeline, args.overrides)), end="")
        elif args.command == "status":
            from cai.runner import stage_status

            for name, state in stage_status(args.output_dir):
                print(f"{name:18s} {state}")
        elif args.command == "constitution":
            _constitution_check(args.file)
        elif args.command == "model":
            from cai.models import resolve_model

            print(resolve_model(args.name))
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai: interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
