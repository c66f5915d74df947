"""Launch a short 2-rank ``fsam-train`` job again and again and count how each launch ended.

A finished run must exit 0 every time (no rank dying at exit). Each launch trains the tiny model
for a few steps through the deepspeed launcher (CPU ranks), saves, and is checked for its exit
status and its final ``latest`` checkpoint. The report (``--report``, JSON) counts launches, exit
statuses and the wall time; the exit status of this script is 0 only if every launch exited 0.

    python -m tools.exit_soak --launches 25 --report docs/reliability/exit_soak.json
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Union

REPO = Path(__file__).resolve().parents[1]


def launch(work: Path, i: int, steps: int, config: str, timeout: float) -> dict:
    from fsam_ds.distributed import free_port, without_process_group_env
    from fsam_ds.names import LATEST
    from fsam_ds.train import train_argv

    save = work / f"run{i}"
    env = without_process_group_env()
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "fsam_ds" / "train.py"),
        *train_argv(REPO / "ds_configs" / config, save, steps, eval_every=steps),
    ]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
        rc: Union[int, str] = proc.returncode
        tail = (proc.stdout + proc.stderr).splitlines()[-3:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", []
    return {
        "launch": i,
        "exit": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "latest": (save / LATEST).is_file(),
        "tail": tail if rc != 0 else [],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="exit_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=25, help="how many launches (default 25)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per launch (default 4)")
    p.add_argument("--config", default="preconditioned_functional_sam.json", help="a file in ds_configs/")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per launch (default 300)")
    p.add_argument("--report", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    if a.launches < 1 or a.steps < 1:
        p.error("--launches and --steps must be integers >= 1")
    if not (REPO / "ds_configs" / a.config).is_file():
        p.error(f"--config {a.config!r}: no such file in ds_configs/")
    runs = []
    with tempfile.TemporaryDirectory(prefix="fsam-exit-soak-") as tmp:
        for i in range(a.launches):
            r = launch(Path(tmp), i, a.steps, a.config, a.timeout)
            runs.append(r)
            print(f"launch {i + 1}/{a.launches}: exit {r['exit']} in {r['wall_s']} s", flush=True)
    counts = collections.Counter(str(r["exit"]) for r in runs)
    report = {
        "launches": a.launches,
        "steps": a.steps,
        "config": a.config,
        "exit_counts": dict(counts),
        "all_exit_0": counts.get("0", 0) == a.launches,
        "all_saved": all(r["latest"] for r in runs),
        "wall_s": round(sum(r["wall_s"] for r in runs), 1),
        "failures": [r for r in runs if r["exit"] != 0],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["all_exit_0"] and report["all_saved"] else 1


if __name__ == "__main__":
    sys.exit(main())
