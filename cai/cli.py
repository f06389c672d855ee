"""`cai` command line: run a pipeline, print its config, check a constitution, show run status.

  cai run pipelines/default.yaml [key=value ...] [--stages prompts,critique_revise]
  cai config pipelines/default.yaml [key=value ...]
  cai plan pipelines/default.yaml [key=value ...] [--stages sft,preferences]
  cai eval pipelines/default.yaml [key=value ...] [--checkpoints base,sft,policy,ppo@10,runs/concise:policy]
  cai audit arca runs/default/ppo/model --target "TEXT" [--prompt-tokens 4] [--budget 6000] [--out DIR]
  cai mwe pipelines/default.yaml [key=value ...] --behaviour avoid-shutdown [--checkpoints base,policy] [--probes F]
  cai redteam pipelines/default.yaml --checkpoint policy [--rounds 3] [--attacks 64] [--adversarial] [--out DIR]
  cai status runs/default
  cai constitution check constitutions/default.yaml
  cai judge-check smollm2-135m-instruct
  cai model prepare [smollm2-135m-instruct]
  cai cluster wait --address HOST:PORT --nodes 2 --gpus 16 --timeout 300
"""
from __future__ import annotations

import argparse
import os
import sys

from cai import stopping
from cai.errors import CaiError
from cai.stopping import Stopped


def pipeline_parser(sub, name: str, summary: str, example: str | None = None):
    """A subcommand that reads a pipeline file and dotted overrides of it."""
    parser = sub.add_parser(name, help=summary)
    parser.add_argument("pipeline")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, {example}" if example else None)
    return parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cai", description="Constitutional AI pipeline")
    sub = p.add_subparsers(dest="command", required=True)
    run = pipeline_parser(sub, "run", "run a pipeline's stages in order (cached stages are skipped)",
                          "e.g. critique_revise.rounds=2")
    run.add_argument("--stages", help="comma-separated subset of stages to run")
    ev = pipeline_parser(sub, "eval", "evaluate checkpoints side by side (the evaluate stage alone); writes "
                                      "<output_dir>/evaluate/report.html and eval.json", "e.g. evaluate.max_prompts=20")
    ev.add_argument("--checkpoints", help="comma-separated: base, sft, policy, ppo, dpo, ppo@<step>, "
                                          "<run folder>:<checkpoint>, or model folders (evaluate.checkpoints)")
    plan = pipeline_parser(sub, "plan", "show which stages `cai run` would run and what changed, running nothing",
                           "as for run")
    plan.add_argument("--stages", help="comma-separated subset of stages, as for run")
    pipeline_parser(sub, "config", "print the resolved config")
    status = sub.add_parser("status", help="show each stage of a run: done, partial or not started")
    status.add_argument("output_dir")
    const = sub.add_parser("constitution", help="constitution tools")
    const.add_argument("action", choices=["check"])
    const.add_argument("file")
    judge = sub.add_parser("judge-check", help="score a feedback model on labelled comparison pairs")
    judge.add_argument("model", help="alias, local folder or hub id")
    judge.add_argument("--pairs", default="builtin:judge_check", help="jsonl of prompt/better/worse[/aspect]")
    judge.add_argument("--constitution", default="constitutions/default.yaml")
    judge.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    judge.add_argument("--few-shot", type=int, default=2)
    judge.add_argument("--fail-below", type=float, help="exit 1 when accuracy is below this")
    audit = sub.add_parser("audit", help="audit a checkpoint")
    audit.add_argument("action", choices=["arca"], help="arca: search for prompts that make it emit --target")
    audit.add_argument("checkpoint", help="alias, local model folder or hub id")
    audit.add_argument("--target", required=True, help="the output to elicit")
    audit.add_argument("--prefix", default="", help="fixed text before the searched prompt tokens")
    audit.add_argument("--prompt-tokens", type=int, default=4)
    audit.add_argument("--budget", type=int, default=6000, help="sequence forwards per search")
    audit.add_argument("--batch", type=int, default=32, help="candidates scored per step")
    audit.add_argument("--restarts", type=int, default=3, help="seeds per method")
    audit.add_argument("--raw", action="store_true", help="no chat template around the prompt")
    audit.add_argument("--out", help="folder for arca.json and report.html (in <output_dir>/audit/: the run's "
                                      "report.html too)")
    mwe = pipeline_parser(sub, "mwe", "model-written evaluations: yes/no probes for a behaviour, written and checked "
                                      "by models, answered by checkpoints; writes <output_dir>/audit/mwe/<behaviour>/",
                          "e.g. mwe.min_label_confidence=0.7")
    mwe.add_argument("--behaviour", help="a behaviour of mwe.behaviours (shipped: sycophancy, avoid-shutdown, "
                                         "power-seeking, self-preservation); with --probes, the output's name")
    mwe.add_argument("--checkpoints", help="comma-separated, named as for eval (mwe.checkpoints; default: base)")
    mwe.add_argument("--probes", help="jsonl in Anthropic's layout (question, answer_matching_behavior, "
                                      "answer_not_matching_behavior): scored as given, nothing generated")
    mwe.add_argument("--n", type=int, help="writer outputs per side (mwe.n)")
    rt = pipeline_parser(sub, "redteam", "red-team a checkpoint with a red LM (Perez et al. 2022); writes "
                                         "<output_dir>/audit/redteam/", "e.g. redteam.few_shot=3")
    rt.add_argument("--checkpoint", required=True, help="base, sft, policy, ppo, dpo, ppo@<step>, "
                                                        "<run folder>:<checkpoint>, or a model folder")
    rt.add_argument("--rounds", type=int, help="rounds of attacks (redteam.rounds)")
    rt.add_argument("--attacks", type=int, help="red-LM completions per round (redteam.attacks)")
    rt.add_argument("--reward-model", help="a preference model must also score the answer low (redteam.reward_model)")
    rt.add_argument("--adversarial", action="store_true", help="fine-tune the attacker and train an input filter "
                                                               "each round (under .../redteam/adversarial/)")
    rt.add_argument("--out", help="output folder instead of <output_dir>/audit/redteam/")
    model = sub.add_parser("model", help="model tools")
    model.add_argument("action", choices=["prepare"])
    model.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    cluster = sub.add_parser("cluster", help="Ray cluster tools (the Slurm script uses them)")
    cluster.add_argument("action", choices=["wait"], help="wait until the cluster has the nodes, CPUs and GPUs")
    cluster.add_argument("--address", required=True)
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--cpus", type=float, default=0)
    cluster.add_argument("--gpus", type=float, default=0)
    cluster.add_argument("--timeout", type=float, default=300)
    return p


def _run(args) -> None:
    from cai.config import load_pipeline
    from cai.runner import run_pipeline
    from cai.stages import ORDER

    cfg = load_pipeline(args.pipeline, args.overrides)
    only = None
    if args.stages:
        only = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in only if s not in ORDER]
        if unknown:
            raise CaiError(f"--stages: unknown stage '{unknown[0]}' (stages: {', '.join(ORDER)})")
    run_pipeline(cfg, only)
    print(f"outputs in {cfg.output_dir}")


def _eval(args) -> None:
    import json

    from cai.config import load_pipeline
    from cai.runner import run_pipeline

    overrides = list(args.overrides)
    if args.checkpoints:
        names = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
        overrides.append(f"evaluate.checkpoints={json.dumps(names)}")
    cfg = load_pipeline(args.pipeline, overrides)
    run_pipeline(cfg, ["evaluate"])
    print(f"report: {cfg.output_dir}/evaluate/report.html (with the audits: {cfg.output_dir}/report.html)")


def _constitution_check(path: str) -> None:
    from cai.constitution import load_constitution

    c = load_constitution(path)
    aspects = {a: sum(p.aspect == a for p in c.preference) for a in ("harmless", "helpful")}
    print(f"{path}: ok: '{c.name}', {len(c.critique_revision)} critique/revision principles, "
          f"{len(c.preference)} preference principles ({aspects['harmless']} harmless, {aspects['helpful']} "
          f"helpful), {len(c.few_shot_revisions)} few-shot revisions, {len(c.few_shot_labels)} few-shot labels")


def _judge_check(args) -> int:
    import torch

    from cai.cluster import Resources, worker_init
    from cai.constitution import load_constitution
    from cai.feedback import label_pairs
    from cai.generation import ChatGenerator
    from cai.judge_check import format_report, judge_report, load_check_pairs, verdict
    from cai.models import load_causal_lm, load_tokenizer, resolve_model

    constitution = load_constitution(args.constitution)
    pairs = load_check_pairs(args.pairs)
    path = resolve_model(args.model)
    gpus = 1 if torch.cuda.is_available() else 0
    worker = worker_init(Resources(os.cpu_count() or 1, gpus, False, "judge-check"), seed=0)
    model = load_causal_lm(path, worker.resolve_dtype(args.dtype)).to(worker.device)
    judge = ChatGenerator(model, load_tokenizer(path), device=worker.device)
    labels, _ = label_pairs(judge, pairs, constitution, seed=0, both_orders=True, n_shots=args.few_shot, cot=False,
                            cot_generation=None, cot_clamp=(0.0, 1.0), max_tokens=4096, batch_size=8)
    report = judge_report(labels, pairs)
    print(f"judge check of {args.model} on {len(pairs)} pairs:\n{format_report(report)}")
    warning = verdict(report, 0.6)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 1 if args.fail_below is not None and report["accuracy"] < args.fail_below else 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`--stages ppo ppo.steps=3`): argparse leaves them over
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        if args.command == "run":
            _run(args)
        elif args.command == "eval":
            _eval(args)
        elif args.command == "plan":
            from cai.config import load_pipeline
            from cai.plan import format_plan, parse_stages, plan_pipeline, refusals

            cfg, only = load_pipeline(args.pipeline, args.overrides), parse_stages(args.stages)
            print(format_plan(cfg, plan_pipeline(cfg, only), refusals(cfg, only)))
        elif args.command == "config":
            from cai.config import dump_config, load_pipeline

            print(dump_config(load_pipeline(args.pipeline, args.overrides)), end="")
        elif args.command == "status":
            from cai.runner import stage_status

            for name, state in stage_status(args.output_dir):
                print(f"{name:18s} {state}")
        elif args.command == "constitution":
            _constitution_check(args.file)
        elif args.command == "judge-check":
            return _judge_check(args)
        elif args.command == "audit":
            from cai.audit import arca_audit, format_table, write

            result = arca_audit(args.checkpoint, args.target, prefix=args.prefix, prompt_tokens=args.prompt_tokens,
                                budget=args.budget, batch=args.batch, restarts=args.restarts, chat=not args.raw)
            print(format_table(result))
            if args.out:
                print(f"written: {write(result, args.out)} and report.html")
        elif args.command == "mwe":
            from cai.mwe import main as mwe_main

            mwe_main(args)
        elif args.command == "redteam":
            from cai.redteam import cli as redteam_cli

            redteam_cli(args)
        elif args.command == "cluster":
            from cai.cluster import wait_for_cluster

            have = wait_for_cluster(args.address, args.nodes, args.cpus, args.gpus, args.timeout)
            print(f"Ray cluster at {args.address}: {have['nodes']} nodes, {have['CPU']:g} CPUs, {have['GPU']:g} GPUs")
        elif args.command == "model":
            from cai.models import resolve_model

            print(resolve_model(args.name))
    except Stopped as e:
        waited = stopping.seconds_since_signal()
        tail = f" ({waited:.1f}s from signal to exit)" if waited is not None else ""
        print(f"cai: {e}{tail}", file=sys.stderr)
        return stopping.STOPPED_EXIT_CODE
    except CaiError as e:
        print(f"cai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cai: interrupted; committed shards are kept, rerun to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
