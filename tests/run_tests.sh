#!/usr/bin/env bash
# Set up ./.venv (if needed) and run the whole test suite (CPU only, about 15 minutes on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch_scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest -q -p no:cacheprovider tests "$@"
