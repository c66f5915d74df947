#!/usr/bin/env bash
# The fast first step of CI (about a minute): lint, types, the pure-function tests.
#   bash tests/fast_checks.sh                # sets up .venv like tests/run_tests.sh, then checks
#   FSAM_SKIP_SETUP=1 bash tests/fast_checks.sh   # use the active environment as it is
# FSAM_LINT=full: ruff on every file (rules and format) and mypy on fsam_ds, megatron_patches and tools;
# the default checks what the tree passes today: pyflakes' errors everywhere, every rule on the files
# listed in LINT_CLEAN, mypy on the files listed in TYPED.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ "${FSAM_SKIP_SETUP:-0}" != 1 ]; then
  bash launch_scripts/setup_env.sh
  . .venv/bin/activate
fi
mode="${FSAM_LINT:-partial}"
case "$mode" in full|partial) ;; *) echo "fast_checks: FSAM_LINT must be full or partial, got '$mode'" >&2; exit 2;; esac

# files that pass every rule of [tool.ruff] today
LINT_CLEAN=(fsam_ds/method.py fsam_ds/plot.py fsam_ds/sharpness_report.py
            fsam_ds/bench.py fsam_ds/plan.py fsam_ds/convert.py tools/__init__.py tools/targets.py tools/verdicts.py)
TYPED=(fsam_ds/method.py fsam_ds/config.py)   # strict (pyproject); fsam_ds/shards.py joins when it passes

t0=$SECONDS
echo "== ruff ($mode)"
if [ "$mode" = full ]; then
  ruff check .
  ruff format --check .
else
  ruff check --select F --ignore F401,F541 .   # undefined names, redefinitions, ... everywhere
  ruff check "${LINT_CLEAN[@]}"
fi
echo "== mypy ($mode)"
if [ "$mode" = full ]; then
  mypy
else
  mypy --follow-imports=silent --no-warn-unused-configs "${TYPED[@]}"
fi
echo "== pure-function tests"
python -m pytest -q -p no:cacheprovider tests/test_method.py tests/test_config.py tests/test_verdicts.py \
  tests/test_targets.py tests/test_optional.py
echo "fast checks passed in $((SECONDS - t0)) s"
