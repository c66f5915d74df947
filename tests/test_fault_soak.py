"""fsam-supervise (restart on a lost run, stop on success or refusal) and the short fault soak.

* the supervisor, in-process with a dummy command: SIGKILLed once, exit 1 once, then exit 0:
  three runs, ``--resume`` (or the ``{resume}`` placeholder) on the restarts only,
  ``FSAM_SUPERVISE_ATTEMPT`` counting; exit 2 is never rerun; the restarts run out; with
  ``--checkpoint-dir`` a run resumes exactly when ``latest`` exists;
* ``tools/fault_soak.py --short``: a 2-rank ZeRO-3 PreconditionedFunctionalSAM run with attention
  dropout, SIGKILLed twice (once in a step, once in a save, random ranks) under the supervisor,
  ends with per-step records and final weights bit-identical to the uninterrupted run's, and
  nothing lost. (About 90 s alone on 2 CPU cores.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch import child_env

from fsam_ds import supervise as S

ROOT = Path(__file__).resolve().parent.parent

# fails in a different way on each of the first two runs, then succeeds; logs its arguments
FLAKY = r"""
import json, os, signal, sys
from pathlib import Path
log = Path(sys.argv[1])
runs = log.read_text().splitlines() if log.is_file() else []
with log.open("a") as f:
    f.write(json.dumps({"args": sys.argv[2:], "attempt": os.environ.get("FSAM_SUPERVISE_ATTEMPT")}) + "\n")
if len(runs) == 0:
    os.kill(os.getpid(), signal.SIGKILL)
if len(runs) == 1:
    sys.exit(1)
sys.exit(0)
"""


def _runs(log: Path):
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_supervisor_restarts_a_failing_command_until_it_succeeds(tmp_path):
    calls = tmp_path / "calls.jsonl"
    sup_log = tmp_path / "supervise.jsonl"
    messages = []
    rc = S.supervise(
        [sys.executable, "-c", FLAKY, str(calls), "--steps", "5"],
        max_restarts=3,
        delay=0,
        log=sup_log,
        say=messages.append,
    )
    assert rc == 0
    runs = _runs(calls)
    assert [r["args"] for r in runs] == [["--steps", "5"], ["--steps", "5", "--resume"], ["--steps", "5", "--resume"]]
    assert [r["attempt"] for r in runs] == ["0", "1", "2"]
    assert [r["rc"] for r in _runs(sup_log)] == [-signal.SIGKILL, 1, 0]
    assert any("killed by SIGKILL" in m for m in messages) and "finished after 2 restart(s)" in messages[-1]


def test_supervisor_placeholder_and_the_end_of_its_restarts(tmp_path):
    calls = tmp_path / "calls.jsonl"
    rc = S.supervise(
        [sys.executable, "-c", FLAKY, str(calls), "{resume}", "--last"], max_restarts=1, delay=0, say=lambda m: None
    )
    assert rc == 1  # the second run's status: no restarts left
    assert [r["args"] for r in _runs(calls)] == [["--last"], ["--resume", "--last"]]
    calls.unlink()
    assert (
        S.supervise([sys.executable, "-c", FLAKY, str(calls)], max_restarts=0, delay=0, say=lambda m: None)
        == 128 + signal.SIGKILL
    )


def test_supervisor_never_reruns_a_refusal(tmp_path):
    calls = tmp_path / "calls.jsonl"
    refuse = f"import sys; open({str(calls)!r}, 'a').write('x\\n'); sys.exit(2)"
    messages = []
    assert S.supervise([sys.executable, "-c", refuse], max_restarts=5, delay=0, say=messages.append) == 2
    assert calls.read_text() == "x\n" and "refused" in messages[-1]


def test_supervisor_checkpoint_dir_resumes_exactly_when_latest_exists(tmp_path):
    ckpt = tmp_path / "run"
    ckpt.mkdir()
    calls = tmp_path / "calls.jsonl"
    # run 1 dies before any checkpoint (rerun afresh), run 2 publishes one and dies, run 3 resumes
    script = (
        f"import json, os, sys; from pathlib import Path; c = Path({str(calls)!r}); "
        "n = len(c.read_text().splitlines()) if c.is_file() else 0; "
        "c.open('a').write(json.dumps(sys.argv[1:]) + '\\n'); "
        f"n == 1 and Path({str(ckpt / 'latest')!r}).write_text('step4'); sys.exit(0 if n == 2 else 3)"
    )
    sup_log = tmp_path / "supervise.jsonl"
    assert (
        S.supervise(
            [sys.executable, "-c", script],
            max_restarts=4,
            checkpoint_dir=ckpt,
            delay=0,
            log=sup_log,
            say=lambda m: None,
        )
        == 0
    )
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [[], [], ["--resume"]]
    assert [(r["resume"], r["latest"]) for r in _runs(sup_log)] == [(False, None), (False, "step4"), (True, "step4")]


def test_supervise_command_line(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "fsam_ds.supervise", "--max-restarts", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no command" in bad.stderr
    calls = tmp_path / "calls.jsonl"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "fsam_ds.supervise",
            "--max-restarts",
            "2",
            "--delay",
            "0",
            "--",
            sys.executable,
            "-c",
            FLAKY,
            str(calls),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=child_env(),
    )
    assert ok.returncode == 0, ok.stderr
    assert len(_runs(calls)) == 3


@pytest.mark.slow
def test_short_fault_soak_ends_equal_to_the_uninterrupted_run(tmp_path):
    report_file = tmp_path / "report.json"
    env = child_env()
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "fault_soak.py"),
            "--short",
            "--seed",
            "0",
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report_file),
            "--tolerance",
            "1e-6",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["ok"] and report["finished"]
    assert report["faults_injected"] == report["faults_survived"] == 2
    assert report["data_lost"] == 0
    assert report["runs"] == 3  # one restart per fault
    kinds = {r["kind"] for r in report["faults"]}
    assert kinds & {"between_passes", "pass2", "timer"} and kinds & {"save_zero", "save_rng", "publish"}
    # 1e-6, as the other resume tests: seed 0 measured 0 (bit-identical) twice, but a 6-fault soak (seed 1)
    # ended 1 float32 ulp away (7.5e-9 on weights that moved 8.4e-3) after one of its resumes: not yet
    # explained, so the CI form does not rest on bit-identity
    assert report["max_rel_diff_records"] <= 1e-6 and report["max_abs_diff_weights"] <= 1e-6
    assert report["weights_moved"] > 1e-3  # the equality could fail: training moved the weights
    assert report["data_position"]["soak"] == report["data_position"]["reference"]
