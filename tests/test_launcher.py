"""The real deepspeed launcher beyond one node of two ranks: two launcher "nodes" on this machine
(--no_ssh, one rank each, a hostfile of two loopback names), and four ranks on one node. Each
run is compared with the independent single-process reference with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from common import LR, STEPS, load_case, reference_state
from dist_worker import CASES
from launch import HERE, ROOT, child_env, free_port
from reference import weight_distance

WORKER = HERE / "dist_worker.py"
TOL = 2e-3
UNIT = LR * STEPS
TIMEOUT = 900
# DeepSpeed's runner keys the hostfile by name and refuses a name twice; with --no_ssh the names
# are never resolved or contacted, they only order the nodes (node_rank indexes this list)
HOSTFILE = "localhost slots=1\n127.0.0.1 slots=1\n"


def _tail(path: Path, n: int = 3000) -> str:
    return f"--- {path.name} ---\n" + path.read_text(errors="replace")[-n:]


def _run_launchers(cmds, out: Path, timeout: int = TIMEOUT):
    """Start every launcher command at once; wait for all. Returns (exit codes, log paths); a
    launcher still running at the timeout is killed and reported as None.

    If one exits non-zero the others cannot finish (their peer is gone), so they are ended
    after a short grace period instead of waiting out the timeout.
    """
    env = child_env()
    logs = [out / f"launcher{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as fh:
            procs.append(
                subprocess.Popen(
                    [str(c) for c in cmd],
                    cwd=ROOT,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now - failed_at > 30):
                break
            time.sleep(0.5)
    finally:
        rcs = [p.poll() for p in procs]
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers (own session)
                p.wait()
    return rcs, logs


def _check_case(run: Path, case, world: int, smaller_world: int):
    method = case.method
    state, ranks = load_case(run, case, world)
    ref_state, ref_losses = reference_state(method, world=world)
    assert weight_distance(state, ref_state) / UNIT < TOL
    # had some rank's data not counted, the weights would be those of a smaller global batch
    assert weight_distance(state, reference_state(method, world=smaller_world)[0]) / UNIT > 50 * TOL
    # the returned loss is averaged over all ranks: identical everywhere, equal to the reference's
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    if method != "AdamW":
        assert all(m["restored"] is True for r in ranks for m in r["metrics"])
        assert all(
            [m["grad_norm"] for m in r["metrics"]] == [m["grad_norm"] for m in ranks[0]["metrics"]] for r in ranks
        )


@pytest.fixture(scope="module")
def twonode_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("twonode")
    hostfile = out / "hostfile"
    hostfile.write_text(HOSTFILE)
    port = free_port()
    cmds = [
        [
            "deepspeed",
            "--hostfile",
            hostfile,
            "--no_ssh",
            "--num_nodes",
            2,
            "--node_rank",
            node,
            "--num_gpus",
            1,
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            WORKER,
            "--out",
            out,
            "--suite",
            "twonode",
        ]
        for node in (0, 1)
    ]
    t0 = time.monotonic()
    rcs, logs = _run_launchers(cmds, out)
    print(f"two launcher nodes: {time.monotonic() - t0:.0f} s")
    assert rcs == [0, 0], f"exit codes {rcs} (None: killed)\n" + "\n".join(_tail(log) for log in logs)
    return out, logs


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES["twonode"], ids=[c.name for c in CASES["twonode"]])
def test_two_launcher_nodes_match_reference(twonode_run, case):
    out, logs = twonode_run
    # each launcher really ran one node of a two-node world: rank 0 on node 0, rank 1 on node 1
    for node, log in enumerate(logs):
        text = log.read_text(errors="replace")
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text
        assert "dist_world_size=2" in text
    _check_case(out, case, world=2, smaller_world=1)


@pytest.fixture(scope="module")
def fourrank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fourrank")
    cmd = ["deepspeed", "--num_gpus", 4, "--master_port", free_port(), WORKER, "--out", out, "--suite", "fourrank"]
    t0 = time.monotonic()
    rcs, logs = _run_launchers([cmd], out)
    print(f"four ranks: {time.monotonic() - t0:.0f} s")
    assert rcs == [0], f"exit code {rcs[0]} (None: killed)\n" + _tail(logs[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES["fourrank"], ids=[c.name for c in CASES["fourrank"]])
def test_four_ranks_match_reference(fourrank_run, case):
    _check_case(fourrank_run, case, world=4, smaller_world=2)


def test_only_a_native_abort_is_started_again():
    """The test launcher starts a run once more only when a rank died in C++ ``terminate`` (SIGABRT,
    no Python traceback); a Python error, another signal or a plain non-zero exit fails at once."""
    from launch import _native_abort

    def proc(err: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], 1, stdout="", stderr=err)

    abort = "terminate called without an active exception\n[ERROR] [launch.py:259] ... exits with return code = -6"
    assert _native_abort(proc(abort))
    assert _native_abort(proc("terminate called recursively\n  exitcode  : -6 (pid: 12)"))
    assert not _native_abort(proc(abort + "\nTraceback (most recent call last):\n  AssertionError"))
    assert not _native_abort(proc(abort.replace("-6", "-9")))  # a killed rank (the fault tests kill on purpose)
    assert not _native_abort(proc("exits with return code = 1"))
