#!/usr/bin/env bash
# The megatron-core trainer on one node with torchrun (set up .venv with megatron-core first).
#   bash launch_scripts/megatron_torchrun.sh NPROC [fsam-megatron-train options...]
#   bash launch_scripts/megatron_torchrun.sh 4 --model 2m --tensor-model-parallel-size 2 \
#        --pipeline-model-parallel-size 2 --sam-type PreconditionedFunctionalSAM --sam-rho 0.1
# Several nodes: run on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
nproc="${1:?usage: megatron_torchrun.sh NPROC [options]}"; shift
bash launch_scripts/setup_env.sh >/dev/null
. .venv/bin/activate
exec torchrun --nproc_per_node "$nproc" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m megatron_patches.trainer "$@"
