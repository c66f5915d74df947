import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU ops (shared-memory allreduce, FusedAdam) on first use into
# TORCH_EXTENSIONS_DIR; one folder per environment keeps two virtualenvs from rebuilding each
# other's builds. Launched ranks inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(sys.prefix) / "torch_extensions"))

# Optional parts (megatron-core, corpora): skipped locally when absent, failures under CI=true or
# FSAM_REQUIRE_OPTIONAL=1. Tests import the helpers from tests/optional.py.
from optional import data_file, missing, optional_required, require_module  # noqa: E402,F401
