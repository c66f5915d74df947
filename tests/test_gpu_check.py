"""tools/gpu_check.py (the prepared GPU check), on CPU and fast: the dry run prints every
step with its budget and runs nothing; the plan runner gives each command its own timeout, keeps going
after a failure or a timeout and writes one report; the CPU smoke of the fp16 step (the same injection
in bf16 at ZeRO 0) ends with every injected step skipped and the weights unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import gpu_check  # noqa: E402

STEP_IDS = ["preflight", "fusedadam", "pytest", "loop_hf", "fp16", "megatron", "bench_118m", "bench_1.2b", "seeds_24m"]


def _run(*args, timeout=120):
    # the process group this pytest process may hold (an in-process one-rank engine) is not the child's
    from launch import child_env

    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "tools.gpu_check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    out = tmp_path / "never"
    proc = _run("--dry-run", "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for sid in STEP_IDS:
        assert f"\n{sid} " in text and f"[{sid}]" in text or sid == "bench_1.2b" and "[bench_1.2b]" in text, sid
    assert "deadline 570 s" in text and "dry run: nothing was run" in text
    for needle in (
        "fsam_ds.bench --gpu --preset 118m",
        "fsam_ds.bench --gpu --preset 1.2b",
        "--json",
        "tests/test_adam_step_layouts.py",
        "worker fp16 --stages 0,2",
        "worker loop-hf --stage 3 --dtype bf16",
        "worker megatron",
        "worker seeds",
    ):
        assert needle in text, needle
    assert not out.exists()


def test_plan_fits_the_ten_minutes():
    steps = gpu_check.plan(Path("/x"), smoke=False)
    assert [s.id for s in steps] == STEP_IDS
    # the expected times leave the paired seeds at least two minutes inside the deadline
    assert sum(s.expect_s for s in steps) + 120 <= gpu_check.DEADLINE_S < 600
    for s in steps:
        assert sum(c.cap_s for c in s.commands) <= s.budget_s, s.id
        assert s.skip is None
    smoke = gpu_check.plan(Path("/x"), smoke=True)
    skipped = {s.id: s.skip for s in smoke if s.skip}
    assert set(skipped) == {"fusedadam", "bench_1.2b"} and all("GPU only" in v for v in skipped.values())
    assert all("--gpu" not in c.argv for s in smoke for c in s.commands)


def test_dry_run_refuses_an_unknown_step():
    proc = _run("--dry-run", "--only", "pytest,nonsense", timeout=60)
    assert proc.returncode == 2 and "--only nonsense" in proc.stderr and "accepted:" in proc.stderr


def _fake(sid, *cmds, budget=30, min_s=1):
    return gpu_check.Step(sid, f"fake {sid}", "0", budget, min_s, 1, list(cmds))


def test_runner_keeps_going_after_a_failure_and_a_timeout(tmp_path):
    py = sys.executable
    ok_json = tmp_path / "ok.json"
    steps = [
        _fake("fails", gpu_check.Cmd("exit 3", [py, "-c", "print('boom'); raise SystemExit(3)"], 20)),
        _fake(
            "hangs", gpu_check.Cmd("sleep", [py, "-c", "import time; print('start', flush=True); time.sleep(60)"], 2)
        ),
        _fake(
            "passes",
            gpu_check.Cmd(
                "writes",
                [py, "-c", f"import json; json.dump({{'ok': True, 'lines': ['42']}}, open({str(ok_json)!r}, 'w'))"],
                20,
                "ok.json",
            ),
        ),
        _fake(
            "check_fails",
            gpu_check.Cmd(
                "ok=false",
                [py, "-c", f"import json; json.dump({{'ok': False}}, open({str(tmp_path / 'bad.json')!r}, 'w'))"],
                20,
                "bad.json",
            ),
        ),
        gpu_check.Step("skipped", "skipped", "0", 10, 1, 1, [], skip="GPU only"),
    ]
    t0 = time.time()
    res = gpu_check.run_plan(steps, tmp_path, deadline=100, say=lambda s: None)
    assert time.time() - t0 < 30  # the hanging command was killed at its 2 s cap
    status = {r["id"]: r["status"] for r in res}
    assert status == {
        "fails": "failed",
        "hangs": "timed out",
        "passes": "passed",
        "check_fails": "failed",
        "skipped": "skipped",
    }
    assert res[0]["commands"][0]["rc"] == 3 and "boom" in (tmp_path / "fails.0.log").read_text()
    assert res[1]["commands"][0]["timed_out"] and "start" in (tmp_path / "hangs.0.log").read_text()
    report = gpu_check.render_report(
        res, {"date": "d", "commit": "abc123", "dirty": False, "mode": "", "wall_s": 5, "deadline_s": 100}
    )
    assert "Commit `abc123`" in report and "| fails: fake fails | 0 | failed |" in report
    assert "\n42\n" in report and "boom" in report and "GPU only" in report


def test_deadline_cuts_a_step_and_leaves_the_later_ones_their_minimum(tmp_path):
    py = sys.executable
    steps = [
        _fake("long", gpu_check.Cmd("sleep", [py, "-c", "import time; time.sleep(30)"], 30), budget=30, min_s=1),
        _fake("later", gpu_check.Cmd("quick", [py, "-c", "pass"], 10), budget=10, min_s=2),
    ]
    t0 = time.time()
    res = gpu_check.run_plan(steps, tmp_path, deadline=6, say=lambda s: None)
    assert time.time() - t0 < 15
    assert res[0]["status"] == "timed out" and res[0]["commands"][0]["timeout_s"] <= 4.5  # 6 s less the 2 s reserve
    assert res[1]["status"] == "passed"


@pytest.mark.slow
def test_cpu_smoke_of_the_non_finite_step(tmp_path):
    proc = _run("--cpu-smoke", "--only", "preflight,fusedadam,fp16", "--out", str(tmp_path), timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fusedadam: SKIPPED (GPU only" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["passed", "skipped", "passed"]
    fp = json.loads((tmp_path / "fp16.json").read_text())
    case = fp["cases"][0]
    injected = [s for s in case["steps"] if s["inject"]]
    assert [s["inject"] for s in injected] == [1, 2] and all(s["skipped"] and s["unchanged"] for s in injected)
    assert injected[0]["eps_norm"] == 0.0  # a non-finite pass 1 gives no perturbation
    report = (tmp_path / "report.md").read_text()
    assert "## GPU check of" in report and "### fp16" in report and "cpu (no CUDA device)" in report


def test_cpu_smoke_of_the_megatron_adam_step_check(tmp_path):
    """The GPU script's Megatron step (where Adam's step lives, what MainParams reads) runs on
    CPU with torch's AdamW and the stand-in that keeps its step in param_groups, so a change of
    MegatronSAM's or MainParams' interface cannot leave it broken until a GPU run."""
    out = tmp_path / "megatron.json"
    proc = _run("worker", "megatron", "--steps", "2", "--json", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] is True
    for case in data["cases"].values():
        assert case["default"]["adam_step"] == [1, 2] and all(case["default"]["denominators"])
        assert case["stand_in"]["adam_step"] == [1, 2] and all(case["stand_in"]["denominators"])
        assert case["sam_gap"] > 1e-3  # PSAM is not SAM here: the preconditioner was applied
