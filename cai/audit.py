"""`cai audit arca`: search for prompts that make a checkpoint emit a given output (cai/arca.py), beside a
random-search baseline given the same forwards, and write what was found to arca.json.

  cai audit arca CHECKPOINT --target "TEXT" [--prompt-tokens 4] [--budget 6000] [--restarts 3] [--raw]
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cai.errors import CaiError

PLACEHOLDER = "\u2063CAI-PROMPT\u2063"


def template_parts(tokenizer, system_prompt: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The chat template's tokens before and after a user turn's text, up to the assistant's turn."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": PLACEHOLDER}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(PLACEHOLDER)
    ids = lambda t: tuple(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return ids(before), ids(after)


def arca_audit(checkpoint: str, target: str, *, prefix: str = "", prompt_tokens: int = 4, budget: int = 6000,
               batch: int = 32, restarts: int = 3, chat: bool = True, system_prompt: str | None = None,
               ban_target_tokens: bool = True) -> dict:
    """ARCA and random search from `restarts` seeds each; -> the JSON of what each found."""
    import torch

    from cai.arca import Search, arca, random_search
    from cai.cluster import Resources, worker_init
    from cai.models import load_causal_lm, load_tokenizer, resolve_model

    if not target.strip():
        raise CaiError("audit arca: --target is empty; give the output to elicit")
    path = resolve_model(checkpoint)
    worker = worker_init(Resources(os.cpu_count() or 1, 1 if torch.cuda.is_available() else 0, False, "audit"), 0)
    model = load_causal_lm(path).to(worker.device)
    tok = load_tokenizer(path)
    before, after = template_parts(tok, system_prompt) if chat else ((), ())
    fixed = tuple(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else ()
    target_ids = tuple(tok(target, add_special_tokens=False)["input_ids"])
    length = len(before) + len(fixed) + prompt_tokens + len(after) + len(target_ids)
    context = getattr(model.config, "max_position_embeddings", 2048)
    if length > context:
        raise CaiError(f"audit arca: prompt and target take {length} tokens, over the model's context of {context}")
    search = Search(prefix=before + fixed, suffix=after, target=target_ids, prompt_len=prompt_tokens,
                    banned=frozenset(target_ids) if ban_target_tokens else frozenset())
    runs = []
    for method, fn in (("arca", arca), ("random_search", random_search)):
        for seed in range(restarts):
            t0 = time.time()
            found = fn(model, search, budget, batch=batch, seed=seed)
            runs.append({"method": method, "seed": seed, "prompt": (prefix + tok.decode(list(found.prompt))),
                         "prompt_ids": list(found.prompt), "objective": round(found.objective, 4),
                         "success": found.success, "forwards": found.forwards, "steps": found.steps,
                         "seconds": round(time.time() - t0, 1)})
    rate = {m: sum(r["success"] for r in runs if r["method"] == m) / restarts for m in ("arca", "random_search")}
    return {"checkpoint": str(path), "target": target, "prefix": prefix, "chat": chat, "prompt_tokens": prompt_tokens,
            "budget_forwards": budget, "success_rate": rate, "runs": runs}


def write(result: dict, out: Path) -> Path:
    """arca.json and, beside it, report.html (cai/report_arca.py); the run's report too when `out` is in a run's
    audit/ folder (cai/report_run.py)."""
    from cai.report_arca import write_report
    from cai.report_run import update_run_report
    from cai.shards import write_atomic

    path = Path(out) / "arca.json"
    write_atomic(path, json.dumps(result, indent=1, ensure_ascii=False))
    write_report(result, Path(out))
    update_run_report(out)
    return path


def format_table(result: dict) -> str:
    lines = ["| method | seed | success | forwards | log p(target) | prompt |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['seed']} | {r['success']} | {r['forwards']} | {r['objective']:.3f} | "
              f"{json.dumps(r['prompt'])} |" for r in result["runs"]]
    rate = result["success_rate"]
    return "\n".join(lines + [f"success within {result['budget_forwards']} forwards: ARCA {rate['arca']:.0%}, "
                              f"random search {rate['random_search']:.0%}"])
