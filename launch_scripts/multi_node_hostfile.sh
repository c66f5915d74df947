#!/usr/bin/env bash
# Data-parallel training over several machines with the DeepSpeed launcher and a hostfile.
#
#   launch_scripts/multi_node_hostfile.sh HOSTFILE CONFIG [fsam-train args...]
#
#   HOSTFILE  one line per machine, "hostname slots=GPUS", e.g.
#                 node-a slots=8
#                 node-b slots=8
#             Run this on the first machine; it must reach the others by passwordless ssh
#             (DeepSpeed uses pdsh by default; set DS_LAUNCHER=openmpi, mvapich, ... otherwise)
#             and every machine needs the same Python environment and paths.
#   CONFIG    a DeepSpeed JSON config (ds_configs/bf16/*.json on GPUs)
#   the rest  passed to fsam-train unchanged, e.g. --model 1.2b --steps 20000
#
# Environment: MASTER_ADDR (default: DeepSpeed picks the first host), MASTER_PORT (default 29500),
# DS_LAUNCHER (default pdsh). Point --save-dir at a shared file system, so that --resume finds
# the checkpoint on every machine; FSAM_DS_CACHE (tokenizer and token caches) may be shared or
# local to each machine.
set -euo pipefail

usage() {
    # the comment block at the top of this file
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
HOSTFILE=$1
CONFIG=$2
shift 2
[[ -f "$HOSTFILE" ]] || { echo "multi_node_hostfile.sh: error: hostfile $HOSTFILE not found" >&2; exit 2; }
[[ -f "$CONFIG" ]] || { echo "multi_node_hostfile.sh: error: config $CONFIG not found" >&2; exit 2; }

ADDR_ARGS=()
[[ -n "${MASTER_ADDR:-}" ]] && ADDR_ARGS=(--master_addr "$MASTER_ADDR")

exec deepspeed --hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}" "${ADDR_ARGS[@]}" \
    --master_port "${MASTER_PORT:-29500}" \
    --module fsam_ds.train --deepspeed_config "$CONFIG" "$@"
