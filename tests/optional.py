"""Optional parts of the test suite: skipped on a developer's machine when absent, a failure in CI.

``CI=true`` (what GitHub Actions, GitLab CI and most CI services set) or
``FSAM_REQUIRE_OPTIONAL=1`` turns every skip for a missing optional part (megatron-core, a corpus)
into a failure naming the part, so that a CI run reporting green has run every test.

Test texts: :func:`data_file` returns the corpus under ``../shared/data`` when that folder exists
and otherwise the excerpt shipped in ``tests/data`` (see tests/data/README.md).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional, Tuple

import pytest

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parents[1] / "shared" / "data"
BUNDLED_DATA = HERE / "data"

#: shared corpus path -> the excerpt shipped in tests/data
BUNDLED = {"wikitext-2/valid.txt": "wikitext-2/valid-excerpt.txt"}


def optional_required() -> bool:
    """True in CI (``CI`` set to true/1/yes) or with ``FSAM_REQUIRE_OPTIONAL=1``."""
    flag = lambda name: os.environ.get(name, "").strip().lower() in ("1", "true", "yes")  # noqa: E731
    return flag("CI") or flag("FSAM_REQUIRE_OPTIONAL")


def missing(reason: str) -> None:
    """Skip (or, in CI, fail) the calling test or module for a missing optional part."""
    if optional_required():
        pytest.fail(f"{reason} (CI=true / FSAM_REQUIRE_OPTIONAL=1: optional parts are required, not skipped)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: Optional[str] = None):
    """``pytest.importorskip(name)``, except that in CI a missing module fails."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{reason or name + ' is not installed'}: {exc}")


def data_file(name: str) -> Tuple[Path, bool]:
    """``(path, full)``: ``../shared/data/<name>`` when present (``full`` True), else the excerpt
    shipped in tests/data (``full`` False). Skips (fails in CI) when neither exists."""
    shared = SHARED_DATA / name
    if shared.is_file():
        return shared, True
    bundled = BUNDLED_DATA / BUNDLED.get(name, name)
    if bundled.is_file():
        return bundled, False
    missing(f"test text {name} is neither in {SHARED_DATA} nor in {BUNDLED_DATA}")
