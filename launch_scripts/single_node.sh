#!/usr/bin/env bash
# Data-parallel training on one machine with the DeepSpeed launcher.
#
#   launch_scripts/single_node.sh CONFIG [NUM_GPUS] [fsam-train args...]
#
#   CONFIG    a DeepSpeed JSON config; its optimizer.type picks the method
#             (ds_configs/*.json: fp32, also runs on CPU; ds_configs/bf16/*.json for GPUs)
#   NUM_GPUS  ranks to start (default: every GPU DeepSpeed finds; on a CPU-only machine give a
#             number, each rank is then one CPU process talking over gloo)
#   the rest  passed to fsam-train unchanged, e.g. --model 24m --steps 2000 --save-dir runs/x
#
# Examples:
#   launch_scripts/single_node.sh ds_configs/bf16/preconditioned_functional_sam.json 8 --model 118m
#   launch_scripts/single_node.sh ds_configs/functional_sam.json 2 --model tiny --steps 20
#
# Environment: MASTER_PORT (default 29500) for the rendezvous port when several jobs share a host.
set -euo pipefail

usage() {
    # the comment block at the top of this file
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
CONFIG=$1
shift
[[ -f "$CONFIG" ]] || { echo "single_node.sh: error: config $CONFIG not found" >&2; exit 2; }

# an optional second argument that is a plain number is the rank count
GPU_ARGS=()
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then
    GPU_ARGS=(--num_gpus "$1")
    shift
fi

# --module runs `python -m fsam_ds.train` in every rank (the package must be installed, e.g.
# `pip install -e .`); the launcher appends --local_rank=N, which fsam-train accepts and ignores.
exec deepspeed "${GPU_ARGS[@]}" --master_port "${MASTER_PORT:-29500}" \
    --module fsam_ds.train --deepspeed_config "$CONFIG" "$@"
