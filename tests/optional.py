"""Optional parts of the test suite: skipped on a developer's machine when absent, a failure in CI.

``CI=true`` (what GitHub Actions, GitLab CI and most CI services set) or
``FSAM_REQUIRE_OPTIONAL=1`` turns every skip for a missing optional part (megatron-core, a corpus)
into a failure naming the part, so that a CI run reporting green has run every test.

Test texts: :func:`data_file` returns the excerpt shipped in ``tests/data`` (see
tests/data/README.md); no test reads anything outside the repository.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
BUNDLED_DATA = HERE / "data"

#: corpus file -> the excerpt of it shipped in tests/data
BUNDLED = {"wikitext-2/valid.txt": "wikitext-2/valid-excerpt.txt"}


def optional_required() -> bool:
    """True in CI (``CI`` set to true/1/yes) or with ``FSAM_REQUIRE_OPTIONAL=1``."""
    flag = lambda name: os.environ.get(name, "").strip().lower() in ("1", "true", "yes")  # noqa: E731
    return flag("CI") or flag("FSAM_REQUIRE_OPTIONAL")


def missing(reason: str) -> None:
    """Skip (or, in CI, fail) the calling test or module for a missing optional part."""
    if optional_required():
        pytest.fail(
            f"{reason} (CI=true / FSAM_REQUIRE_OPTIONAL=1: optional parts are required, not skipped)", pytrace=False
        )
    pytest.skip(reason, allow_module_level=True)


def require_module(name: str, reason: Optional[str] = None):
    """``pytest.importorskip(name)``, except that in CI a missing module fails."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{reason or name + ' is not installed'}: {exc}")


def data_file(name: str) -> Path:
    """The excerpt of corpus file ``name`` shipped in tests/data. Skips (fails in CI) when absent."""
    bundled = BUNDLED_DATA / BUNDLED.get(name, name)
    if bundled.is_file():
        return bundled
    missing(f"test text {name} is not in {BUNDLED_DATA}")
