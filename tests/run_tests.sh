#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the whole test suite (CPU only, about 15 minutes on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch_scripts/setup_env.sh
. .venv/bin/activate
# DeepSpeed's CPU allreduce leaves one shared-memory segment per rank and port in /dev/shm;
# clear those of earlier runs when no DeepSpeed job is running
if ! pgrep -f "deepspeed.launcher" >/dev/null 2>&1; then
  rm -f /dev/shm/deepspeed_allreduce_buffer_* 2>/dev/null || true
fi
# the environment above has every optional part (megatron-core, the test texts are in tests/data):
# a missing one is a failure here, not a skip (tests/optional.py); FSAM_REQUIRE_OPTIONAL=0 to relax
export FSAM_REQUIRE_OPTIONAL="${FSAM_REQUIRE_OPTIONAL:-1}"
exec python -m pytest -q -p no:cacheprovider tests "$@"
