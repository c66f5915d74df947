"""Kept for old command lines: ``python tools/step_time.py ...`` is ``fsam-bench`` (tools/bench_step.py),
which times AdamW and every method variant in one run; ``--methods`` is its ``--variants``."""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_step import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
