"""Starting multi-rank test jobs, and the files their ranks leave behind.

Test side: :func:`child_env` (this process's environment without any process-group variable an
earlier in-process engine left behind, the repository on ``PYTHONPATH``), :func:`deepspeed`
(the real deepspeed launcher with N ranks on this machine), :func:`torchrun`, :func:`run` (any
command; a non-zero exit fails the test with the output's tail) and :func:`load_rank_results` /
:func:`load_case` (what every rank wrote).

Worker side (a script started under the launcher imports this module too): :func:`worker_parser`
(``--out`` and the launcher's ``--local_rank``), :func:`save_rank_result` writes
``<name>.<kind><rank>.json`` and, when given, rank 0's ``<name>.pt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from fsam_ds.distributed import PROCESS_GROUP_ENV, free_port, without_process_group_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: set by torch.distributed / the launchers (or an in-process engine of an earlier test in this
#: pytest process); a child started by a test must never inherit them
DIST_ENV = PROCESS_GROUP_ENV


def child_env(cache: Optional[Path] = None, tmp: Optional[Path] = None, **extra: str) -> dict:
    """The environment of a child process: this one's without :data:`DIST_ENV`, the repository
    first on ``PYTHONPATH``, unbuffered output, no tokenizer threads; ``FSAM_DS_CACHE`` set to
    ``cache`` and ``TMPDIR`` to ``tmp`` (created) when given; ``extra`` on top."""
    env = without_process_group_env()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    )
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if cache is not None:
        env["FSAM_DS_CACHE"] = str(cache)
    if tmp is not None:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _failure(cmd, proc: subprocess.CompletedProcess, tail: int) -> str:
    err = proc.stderr or ""
    first = err.find("Traceback")  # the failing rank's own traceback, before the launcher's summary
    line = " ".join(map(str, cmd))
    head = f"{line if len(line) <= 600 else line[:600] + ' ...'} exited {proc.returncode}:\n"
    return (
        head
        + (proc.stdout or "")[-tail:]
        + "\n"
        + (err[first : first + tail] + "\n...\n" if first >= 0 else "")
        + err[-tail:]
    )


def run(
    cmd: Iterable,
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    timeout: int = 600,
    check: bool = True,
    tail: int = 4000,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` (captured, text) in ``cwd`` (the repository) with ``env`` (:func:`child_env`);
    with ``check`` a non-zero exit fails the calling test with the output's tail."""
    cmd = [str(c) for c in cmd]

    def once() -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            cwd=str(cwd or ROOT),
            env=child_env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    proc = once()
    if check and proc.returncode != 0 and _native_abort(proc):
        import warnings

        warnings.warn(f"a rank aborted in native code, without a Python error; started once more: {cmd[:6]}")
        proc = once()
    if check and proc.returncode != 0:
        import pytest

        pytest.fail(_failure(cmd, proc, tail), pytrace=False)
    return proc


def _native_abort(proc: subprocess.CompletedProcess) -> bool:
    """A rank ended by the C++ runtime's ``terminate`` (SIGABRT, exit -6 in the deepspeed launcher's or
    torchrun's summary, no Python traceback), as seen once from a rank of two CPU ranks on two cores
    and not again when the same suite ran at once after it. Such a run is started once more: a
    deterministic failure fails twice, and a failure with a Python error is never retried."""
    out = (proc.stdout or "") + (proc.stderr or "")
    aborted = re.search(r"(return code = |exitcode\s*:\s*)-6\b", out) is not None
    return aborted and "terminate called" in out and "Traceback" not in out


def deepspeed_cmd(script, *args, ranks: int = 2, port: Optional[int] = None) -> List[str]:
    """The deepspeed launcher starting ``ranks`` copies of ``script`` on this machine."""
    return [
        "deepspeed",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port or free_port()),
        str(script),
        *map(str, args),
    ]


def torchrun_cmd(ranks: int, *args, port: Optional[int] = None) -> List[str]:
    """torchrun (``python -m torch.distributed.run``) starting ``ranks`` processes of ``args``
    (a script and its arguments, or ``-m module ...``)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(port or free_port()),
        *map(str, args),
    ]


def deepspeed(
    script,
    *args,
    ranks: int = 2,
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    timeout: int = 900,
    check: bool = True,
    tail: int = 4000,
) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``ranks`` ranks with the real deepspeed launcher (see :func:`run`)."""
    return run(deepspeed_cmd(script, *args, ranks=ranks), env=env, cwd=cwd, timeout=timeout, check=check, tail=tail)


def torchrun(
    ranks: int,
    *args,
    env: Optional[dict] = None,
    cwd: Optional[Path] = None,
    timeout: int = 600,
    check: bool = True,
    tail: int = 4000,
) -> subprocess.CompletedProcess:
    """Launch ``args`` on ``ranks`` processes with torchrun (see :func:`run`)."""
    return run(torchrun_cmd(ranks, *args), env=env, cwd=cwd, timeout=timeout, check=check, tail=tail)


def launch_suite(suite: str, out: Path, ranks: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    """Every case of ``dist_worker.CASES[suite]`` in one launch of ``ranks`` ranks; results under ``out``."""
    return deepspeed(HERE / "dist_worker.py", "--out", out, "--suite", suite, ranks=ranks, timeout=timeout)


# ---- what the ranks write ---------------------------------------------------------------------


def worker_parser() -> argparse.ArgumentParser:
    """Worker side: the options every worker takes, ``--out`` (the folder for its results) and the
    deepspeed launcher's ``--local_rank``; a worker adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return ap


def save_rank_result(out, name: str, rank: int, result: dict, state=None, kind: str = "rank") -> None:
    """Worker side: ``result`` (JSON) to ``out/<name>.<kind><rank>.json``; ``state`` (a state
    dict, saved by rank 0 only) to ``out/<name>.pt``."""
    out = Path(out)
    if state is not None and rank == 0:
        import torch

        torch.save(state, out / f"{name}.pt")
    (out / f"{name}.{kind}{rank}.json").write_text(json.dumps(result))


def load_rank_results(out, name: str, world: int = 2, kind: str = "rank") -> List[dict]:
    """Test side: every rank's ``out/<name>.<kind><rank>.json``, in rank order."""
    return [json.loads((Path(out) / f"{name}.{kind}{r}.json").read_text()) for r in range(world)]


def load_case(out, name: str, world: int = 2) -> Tuple[dict, List[dict]]:
    """Rank 0's saved state dict ``<name>.pt`` and every rank's ``<name>.rank<r>.json``."""
    import torch

    return torch.load(Path(out) / f"{name}.pt"), load_rank_results(out, name, world)
