#!/usr/bin/env bash
# The tiny pipeline on GPUs: generation actors on a GPU, every training stage (sft, reward_model, ppo, then dpo)
# on 2 workers (1 when the machine has one GPU: NCCL puts one rank on a GPU) with bf16 and ZeRO-3. Checks that
# every training stage ran on cuda and that its model loads. For the day a GPU is at hand:
#   scripts/gpu-check.sh                  # sets up .venv with CUDA torch if it has none, then runs
#   PYTHON=/path/to/python scripts/gpu-check.sh   # an environment that already has cai and CUDA torch
# Prints one line per check and "gpu-check: ok" at the end; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-$(mktemp -d)/gpu-check}
if [ -z "${PYTHON:-}" ]; then
  [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
    || TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128} scripts/install.sh
  PYTHON=.venv/bin/python
fi
nvidia-smi -L
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu-check: torch sees no GPU" >&2; exit 1; }
WORKERS=$(( GPUS >= 2 ? 2 : 1 ))
echo "gpu-check: $GPUS GPU(s), $WORKERS training workers, outputs in $OUT"
"$PYTHON" -m cai.tiny "$OUT/tiny-model" >/dev/null
train=()
for stage in sft reward_model ppo dpo; do
  train+=("$stage.train.workers=$WORKERS" "$stage.train.gpus_per_worker=1" "$stage.train.cpus_per_worker=2"
          "$stage.train.bf16=true" "$stage.train.zero_stage=3")
done
common=(pipelines/tiny.yaml "policy.name=$OUT/tiny-model" "output_dir=$OUT/run" "ray.gpus_per_actor=0.5" "${train[@]}")
time "$PYTHON" -m cai.cli run "${common[@]}"
time "$PYTHON" -m cai.cli run "${common[@]}" policy_optimization=dpo --stages dpo
"$PYTHON" - "$OUT/run" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
run = Path(sys.argv[1])
for stage in ("sft", "reward_model", "ppo", "dpo"):
    summary = json.loads((run / stage / "_COMPLETE.json").read_text())["summary"]
    assert summary["device"].startswith("cuda"), (stage, summary["device"])
    head = AutoModelForSequenceClassification if stage == "reward_model" else AutoModelForCausalLM
    head.from_pretrained(run / stage / "model")
    print(f"gpu-check: {stage} trained on {summary['device']}, its model loads: {json.dumps(summary)[:300]}")
PY
echo "gpu-check: ok"
