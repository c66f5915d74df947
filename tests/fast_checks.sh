#!/usr/bin/env bash
# The fast first step of CI (about a minute): lint, format, types, the pure-function tests.
#   bash tests/fast_checks.sh                     # sets up .venv like tests/run_tests.sh, then checks
#   FSAM_SKIP_SETUP=1 bash tests/fast_checks.sh   # use the active environment as it is
# ruff (rules and format) on every file, mypy on fsam_ds, megatron_patches and tools (strict on the
# modules pyproject.toml names), all as configured in pyproject.toml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "${FSAM_SKIP_SETUP:-0}" != 1 ]; then
  bash launch_scripts/setup_env.sh
  . .venv/bin/activate
fi

t0=$SECONDS
echo "== ruff check"
ruff check .
echo "== ruff format --check"
ruff format --check .
echo "== mypy"
mypy
echo "== pure-function tests"
python -m pytest -q -p no:cacheprovider tests/test_method.py tests/test_config.py tests/test_verdicts.py \
  tests/test_targets.py tests/test_optional.py
echo "fast checks passed in $((SECONDS - t0)) s"
