#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything fsam-ds needs, from a bare Python 3.10+ machine.
#   bash launch_scripts/setup_env.sh            # then: . .venv/bin/activate
# TORCH_SPEC overrides the torch requirement (default: the 2.13.0 wheel; on a GPU machine pick
# the build matching your CUDA, e.g. TORCH_SPEC="torch==2.13.0" with the right index URL).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
# dev: the tests (test), megatron-core, every optional part the tests use, ruff and mypy
python -m pip install --quiet -e ".[dev]"
python - <<'PY'
import torch, deepspeed, transformers
print(f"fsam-ds environment ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
      f"transformers {transformers.__version__}")
PY
