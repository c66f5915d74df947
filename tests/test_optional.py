"""tests/optional.py: a missing optional part skips locally and fails in CI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci,outcome", [("", "1 skipped"), ("true", "1 failed")])
def test_missing_module_skips_locally_and_fails_in_ci(tmp_path, ci, outcome):
    test = tmp_path / "test_needs_missing.py"
    test.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from optional import require_module, data_file

        def test_needs():
            require_module("fsam_no_such_module", "an optional part")
    """)
    )
    env = {"PATH": "/usr/bin:/bin", "CI": ci, "FSAM_REQUIRE_OPTIONAL": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    if ci:
        assert "optional parts are required" in proc.stdout


def test_shipped_texts_are_small():
    files = [p for p in (HERE / "data").rglob("*") if p.is_file()]
    assert files and sum(p.stat().st_size for p in files) < 400_000
