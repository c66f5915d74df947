#!/usr/bin/env bash
# The prepared GPU check (loops, GPU paths, numbers): one command on a one-GPU machine, under 10 minutes,
# one report (runs/gpu_check/<UTC time>/report.md, meant to become a section of docs/gpu.md).
#
#   bash tools/gpu_check.sh                # the whole plan (needs CUDA); exit 0 only if every step passed
#   bash tools/gpu_check.sh --dry-run      # print the plan, each step's time budget and its commands
#   bash tools/gpu_check.sh --cpu-smoke    # each step in its smallest form on CPU (GPU-only steps skipped)
#   bash tools/gpu_check.sh --only fp16,megatron --out runs/gpu_check/retry   # a subset of the steps
#
# It installs nothing. The environment is launch_scripts/setup_env.sh's with a CUDA build of torch:
#
#   * A machine that reaches the package index: pick the torch build of its CUDA, e.g.
#       TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=<the PyTorch wheel index of your CUDA> \
#         bash launch_scripts/setup_env.sh
#     (setup_env.sh keeps a torch that is already importable; the .[test,megatron] extras bring
#     deepspeed, transformers, accelerate, peft, lightning, pytest and megatron-core). Optional:
#     pytest-xdist (the pytest step then runs 4 workers, --dist loadfile), TransformerEngine or apex
#     (the Megatron step then uses their FusedAdam: the real proof that Adam's step count is found there).
#   * A machine without the package index whose Python already has a CUDA torch (and possibly
#     transformers, accelerate, peft, lightning, pytest): download the missing wheels for its Python
#     and platform elsewhere into .whl/ (`pip download --no-deps --only-binary=:all: --python-version
#     3.12 ...`; deepspeed ships an sdist only: `pip wheel --no-deps deepspeed==0.19.8 -w .whl`):
#     deepspeed hjson pydantic pydantic-core annotated-types typing-inspection megatron-core; for the
#     paired-seed step copy WikiText-2 into .gpu_data/wikitext-2. Then, on that machine:
#       python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#       export PYTHONPATH=/tmp/site:$PWD && PYTHON=python3 bash tools/gpu_check.sh --out runs/gpu_check/run
#     (report.md and summary.json carry every step's result.)
#
# PYTHON picks the interpreter (default: .venv/bin/python when it exists, else python3).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # H200 (sm_90): DeepSpeed's JIT ops for it alone
exec "$PYTHON" -m tools.gpu_check "$@"
