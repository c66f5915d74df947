import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU ops (shared-memory allreduce, FusedAdam) on first use into
# TORCH_EXTENSIONS_DIR; one folder per environment keeps two virtualenvs from rebuilding each
# other's builds. Launched ranks inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

# Optional parts (megatron-core, corpora): skipped locally when absent, failures under CI=true or
# FSAM_REQUIRE_OPTIONAL=1. Tests import the helpers from tests/optional.py.
import pytest  # noqa: E402
import torch  # noqa: E402
from optional import data_file, missing, optional_required, require_module  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _restore_functional_linear():
    """A ZeRO-3 engine built in this process replaces torch.nn.functional.linear with DeepSpeed's
    wrapper for the rest of the process; every test starts and ends with torch's own."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


@pytest.fixture(scope="session")
def repo_root():
    """The repository's root folder (the working directory of every child process)."""
    from launch import ROOT

    return ROOT


@pytest.fixture
def clean_env(tmp_path):
    """The environment of a child process of this test (``launch.child_env``): no process-group
    variables, the repository on ``PYTHONPATH``, ``FSAM_DS_CACHE`` in this test's own folder."""
    from launch import child_env

    return child_env(cache=tmp_path / "cache")


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request):
    """One temporary folder per test module, named after it: the home of a module's launch."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"))
