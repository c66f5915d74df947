#!/usr/bin/env bash
# The Hugging Face Trainer door: set up ./.venv, then run launch_scripts/hf_trainer.py (FSAMTrainer,
# preconditioned Functional-SAM from ds_configs/hf/, ZeRO-2) with two CPU ranks under the deepspeed
# launcher on the embedded corpus. Extra arguments go to the script (e.g. --steps 200 --model tiny).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch_scripts/setup_env.sh
. .venv/bin/activate
exec deepspeed --num_gpus "${NUM_RANKS:-2}" launch_scripts/hf_trainer.py "$@"
