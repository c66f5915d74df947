#!/usr/bin/env bash
# The main job on a fresh machine: set up ./.venv, then train the ~2M-parameter model with
# preconditioned Functional-SAM on the embedded corpus with two CPU ranks through the deepspeed
# launcher, and print the eval loss. Extra arguments go to fsam-train (e.g. --steps 400).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash launch_scripts/setup_env.sh
. .venv/bin/activate
exec deepspeed --num_gpus "${NUM_RANKS:-2}" fsam_ds/train.py \
  --deepspeed_config ds_configs/preconditioned_functional_sam.json \
  --model 2m --seq-len 128 --steps 150 --eval-every 50 --save-dir runs/quickstart "$@"
