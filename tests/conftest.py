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
