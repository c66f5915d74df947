"""The prepared GPU check (loops, GPU paths, numbers): one command, one report, on one GPU in under 10 minutes.

    bash tools/gpu_check.sh                 # the whole plan on a CUDA machine (see the header of gpu_check.sh)
    bash tools/gpu_check.sh --dry-run       # print the plan, each step's time budget and its commands; run nothing
    bash tools/gpu_check.sh --cpu-smoke     # every step in its smallest form on CPU, GPU-only steps skipped
    python -m tools.gpu_check --only pytest,fp16 --out runs/gpu_check/x   # a subset of the steps

Every step runs as its own subprocess(es) with its own timeout, its output captured to a log file in
``--out``; a failed or timed-out step is recorded and the next one runs. The whole run has a deadline
(``--deadline-s``, default 570 s): a step's timeout is its own cap or what is left before the deadline
after the minimum the later steps need, whichever is less, and the last step (the paired fresh seeds)
uses whatever time is left. At the end ``report.md`` (commit hash, device, versions, each step's result
and timings: meant to become a section of docs/gpu.md) and ``summary.json`` are written to ``--out``.

The steps (``--only`` takes their ids):

``preflight``  device, driver, versions, which optional parts import (megatron-core, TransformerEngine, apex,
               pytest-xdist)
``fusedadam``  DeepSpeed's FusedAdam CUDA op built once (JIT, ``TORCH_CUDA_ARCH_LIST`` 9.0 unless set), so
               that its compile time is not charged to the tests (GPU only)
``pytest``     tests/test_engine.py, test_loop.py, test_perf_modes.py -k "cache or ascent" (host cache on
               CUDA; the two-rank cases left out: one GPU), test_method.py, test_config.py,
               test_adam_step_layouts.py on the GPU (pytest-xdist ``-n 4 --dist loadfile`` when importable)
``loop_hf``    loop mode and the Hugging Face Trainer (``fsam_ds.hf.FSAMTrainer``) on the tiny Llama in bf16 at
               ZeRO 0 and 3, one rank, each against ``train_batch`` on the same data: weight distances in
               units of lr x steps, and AdamW's distance as the scale that separates methods
``fp16``       an fp16 overflow observed through fsam_ds at ZeRO 0 and 2 (loss scale lowered, step skipped,
               weights unchanged): the natural overflows of a too-large initial scale, then an infinity
               injected in pass 1 and in pass 2; and whether DeepSpeed's ZeRO-0 fp16 ``engine.backward``
               scales the loss (measured against plain autograd) (GPU only: DeepSpeed refuses fp16 on CPU;
               the CPU smoke runs the same injection in bf16 at ZeRO 0)
``megatron``   megatron-core TP=1 on the GPU with the Adam megatron-core picks (TransformerEngine's or apex's
               FusedAdam when installed, else torch's AdamW, then also the param_groups-step stand-in of
               tests/megatron_step_worker.py): where Adam's step lives, what ``MainParams.adam_updates`` reads,
               that the preconditioner exists, and that PreconditionedSAM's weights are not SAM's
``bench_118m`` ``fsam-bench --gpu`` at 118m (bf16, every method, cache mode and ascent_every, interleaved), JSON
``bench_1.2b`` ``fsam-bench --gpu`` at 1.2b (bf16, sequential: one engine at a time), JSON
``seeds_24m``  on the GPU: AdamW, PreconditionedFunctionalSAM and its best sub-2x mode (ascent_every 4)
               at the 24m preset for as many paired fresh seeds (1235, 1236, ...) as fit in the time left,
               paired verdicts by tools/verdicts.py, JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, cast

PROG = "gpu-check"
REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SCHEMA = "fsam-gpu-check/1"
DEADLINE_S = 570  # the whole run, inside the 10 minutes of one device command
SELECT_SEED = 1234  # tools/reproduce.py's selection seed: never one of the fresh seeds here
FRESH_SEED0 = 1235
SEEDS_LR, SEEDS_RHO = 1e-3, 0.05  # fixed before any run (not tuned at 24m, on no seed)
PYTEST_FILES = [
    "tests/test_engine.py",
    "tests/test_loop.py",
    "tests/test_perf_modes.py",
    "tests/test_method.py",
    "tests/test_config.py",
    "tests/test_adam_step_layouts.py",
]
PYTEST_K = "not test_perf_modes or ((cache or ascent) and not two_ranks and not reproduce)"


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


def _worker(name: str, *args: str) -> List[str]:
    return _py("-m", "tools.gpu_check", "worker", name, *args)


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Cmd:
    label: str
    argv: List[str]
    cap_s: float  # this command's own timeout (the deadline may cut it shorter)
    result: Optional[str] = None  # a JSON file the command writes (read into the report)
    env: Dict[str, str] = field(default_factory=dict)


PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider")


@dataclass
class Step:
    id: str
    title: str
    area: str  # loops, gpu paths, numbers
    budget_s: float  # the step's cap: the sum of its commands' caps is at most this
    min_s: float  # the least time worth starting it with
    expect_s: float  # expected wall time on one H200 (planning; not measured)
    commands: List[Cmd]
    skip: Optional[str] = None  # why it does not run in this mode (one line in the report)


def plan(out: Path, smoke: bool, dataset: Optional[str] = None) -> List[Step]:
    """The steps, their budgets and commands; ``smoke``: the smallest CPU form of each."""
    j = lambda name: str(out / name)  # noqa: E731
    steps: List[Step] = []
    steps.append(
        Step(
            "preflight",
            "Device, versions, optional parts",
            "all",
            30,
            5,
            10,
            [Cmd("preflight", _worker("preflight", "--json", j("preflight.json")), 30, "preflight.json")],
        )
    )
    steps.append(
        Step(
            "fusedadam",
            "DeepSpeed FusedAdam CUDA op built once",
            "gpu paths",
            180,
            30,
            50,
            [
                Cmd(
                    "build FusedAdam",
                    _worker("fusedadam", "--json", j("fusedadam.json")),
                    180,
                    "fusedadam.json",
                    {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")},
                )
            ],
            skip="GPU only (a CUDA op): not built on CPU" if smoke else None,
        )
    )
    if smoke:
        pytest_argv = _py(
            *PYTEST,
            "tests/test_config.py::test_shipped_configs_parse",
            "tests/test_method.py::test_rho_warmup_ramp",
        )
    else:
        pytest_argv = _py(
            *PYTEST,
            "-rfE",
            "--durations=15",
            *PYTEST_FILES,
            "-k",
            PYTEST_K,
            "XDIST",
        )
    steps.append(
        Step(
            "pytest",
            "The CUDA-capable test files on one GPU",
            "13, 14",
            200,
            60,
            70,
            [
                Cmd(
                    "pytest",
                    pytest_argv,
                    200,
                    None,
                    {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")},
                )
            ],
        )
    )
    if smoke:
        lh = [
            Cmd(
                "loop/Trainer ZeRO 0 fp32",
                _worker(
                    "loop-hf",
                    "--stage",
                    "0",
                    "--dtype",
                    "fp32",
                    "--methods",
                    "PreconditionedFunctionalSAM",
                    "--json",
                    j("loop_hf_z0.json"),
                ),
                120,
                "loop_hf_z0.json",
            )
        ]
    else:
        lh = [
            Cmd(
                f"loop/Trainer ZeRO {s} bf16",
                _worker("loop-hf", "--stage", str(s), "--dtype", "bf16", "--json", j(f"loop_hf_z{s}.json")),
                60,
                f"loop_hf_z{s}.json",
            )
            for s in (0, 3)
        ]
    steps.append(
        Step("loop_hf", "Loop mode and the HF Trainer on CUDA, bf16, ZeRO 0 and 3, one rank", "loops", 120, 40, 45, lh)
    )
    if smoke:
        fp = [
            Cmd(
                "non-finite ZeRO 0 (bf16 on CPU)",
                _worker("fp16", "--stages", "0", "--dtype", "bf16", "--json", j("fp16.json")),
                90,
                "fp16.json",
            )
        ]
    else:
        fp = [
            Cmd(
                "fp16 overflow ZeRO 0 and 2",
                _worker("fp16", "--stages", "0,2", "--json", j("fp16.json")),
                75,
                "fp16.json",
            )
        ]
    steps.append(Step("fp16", "A non-finite step with fp16 on CUDA, ZeRO 0 and 2", "gpu paths", 75, 25, 30, fp))
    steps.append(
        Step(
            "megatron",
            "Megatron TP=1 with the FusedAdam megatron-core picks",
            "gpu paths",
            90,
            25,
            35,
            [
                Cmd(
                    "megatron TP=1",
                    _worker("megatron", "--steps", "2" if smoke else "3", "--json", j("megatron.json")),
                    90,
                    "megatron.json",
                )
            ],
        )
    )
    if smoke:
        steps.append(
            Step(
                "bench_118m",
                "fsam-bench (smallest CPU form: tiny preset)",
                "gpu paths",
                120,
                30,
                40,
                [
                    Cmd(
                        "fsam-bench tiny",
                        _py(
                            "-m",
                            "fsam_ds.bench",
                            "--preset",
                            "tiny",
                            "--micro-batch",
                            "2",
                            "--seq-len",
                            "32",
                            "--steps",
                            "1",
                            "--warmup",
                            "0",
                            "--sequential",
                            "--no-memory",
                            "--variants",
                            "AdamW,PreconditionedFunctionalSAM+host",
                            "--json",
                            j("bench_tiny.json"),
                        ),
                        120,
                        "bench_tiny.json",
                    )
                ],
            )
        )
        steps.append(
            Step(
                "bench_1.2b",
                "fsam-bench --gpu at 1.2b",
                "gpu paths",
                150,
                60,
                100,
                [],
                skip="GPU only (fsam-bench --gpu and a 1.2b model): skipped on CPU",
            )
        )
    else:
        steps.append(
            Step(
                "bench_118m",
                "fsam-bench --gpu at 118m (bf16, interleaved)",
                "gpu paths",
                150,
                60,
                90,
                [
                    Cmd(
                        "fsam-bench 118m",
                        _py(
                            "-m",
                            "fsam_ds.bench",
                            "--gpu",
                            "--preset",
                            "118m",
                            "--micro-batch",
                            "8",
                            "--seq-len",
                            "1024",
                            "--warmup",
                            "2",
                            "--steps",
                            "6",
                            "--every",
                            "4",
                            "--json",
                            j("bench_118m.json"),
                        ),
                        150,
                        "bench_118m.json",
                    )
                ],
            )
        )
        steps.append(
            Step(
                "bench_1.2b",
                "fsam-bench --gpu at 1.2b (bf16, sequential)",
                "gpu paths",
                180,
                60,
                100,
                [
                    Cmd(
                        "fsam-bench 1.2b",
                        _py(
                            "-m",
                            "fsam_ds.bench",
                            "--gpu",
                            "--preset",
                            "1.2b",
                            "--micro-batch",
                            "4",
                            "--seq-len",
                            "1024",
                            "--warmup",
                            "1",
                            "--steps",
                            "2",
                            "--sequential",
                            "--mmap-threshold-for",
                            "all",
                            "--variants",
                            "AdamW,SAM,PreconditionedSAM,FunctionalSAM,"
                            "PreconditionedFunctionalSAM,PreconditionedFunctionalSAM+host,"
                            "PreconditionedFunctionalSAM+recompute,"
                            "PreconditionedFunctionalSAM+every4",
                            "--json",
                            j("bench_1.2b.json"),
                        ),
                        180,
                        "bench_1.2b.json",
                    )
                ],
            )
        )
    seed_args = ["--json", j("seeds_24m.json"), "--runs", j("seeds_runs")]
    if dataset:
        seed_args += ["--dataset", dataset]
    if smoke:
        seed_args += [
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--micro-batch",
            "2",
            "--seq-len",
            "32",
            "--max-seeds",
            "2",
            "--eval-batches",
            "2",
        ]
    steps.append(
        Step(
            "seeds_24m",
            "AdamW vs PreconditionedFunctionalSAM (and ascent_every 4) at 24m, paired fresh seeds",
            "numbers",
            10**6,
            60,
            0,
            [Cmd("paired seeds", _worker("seeds", *seed_args), 10**6, "seeds_24m.json")],
        )
    )
    return steps


def plan_text(steps: List[Step], deadline: float) -> str:
    lines = [
        f"{PROG}: plan (deadline {deadline:.0f} s for the whole run; a step's timeout is min(its cap, the time "
        "left less the minimum of the later steps); the last step takes what is left)",
        "",
    ]
    lines.append("(expect s: an estimate for one H200, not a measurement)")
    lines.append(f"{'step':<12}{'area':<12}{'cap s':>8}{'min s':>8}{'expect s':>10}  what")
    for s in steps:
        cap = "rest" if s.budget_s >= 10**5 else f"{s.budget_s:.0f}"
        exp = "rest" if not s.expect_s else f"{s.expect_s:.0f}"
        lines.append(
            f"{s.id:<12}{s.area:<12}{cap:>8}{s.min_s:>8.0f}{exp:>10}  {s.title}"
            + (f"  [SKIP: {s.skip}]" if s.skip else "")
        )
    lines.append("")
    for s in steps:
        for c in s.commands:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items())
            cap = "rest" if c.cap_s >= 10**5 else f"{c.cap_s:.0f} s"
            lines.append(f"[{s.id}] {c.label} (cap {cap}): {(env + ' ') if env else ''}{_show(c.argv)}")
    return "\n".join(lines)


def _show(argv: List[str]) -> str:
    return " ".join(shlex.quote(a if a != sys.executable else "python") for a in argv if a != "XDIST")


# ---------------------------------------------------------------------------------------------
# Running the plan
# ---------------------------------------------------------------------------------------------


def _xdist_args() -> List[str]:
    try:
        import xdist  # noqa: F401
    except ImportError:
        return []
    return ["-n", "4", "--dist", "loadfile"]


def run_cmd(cmd: Cmd, timeout: float, log: Path) -> Dict[str, Any]:
    """One command in its own process group, its output to ``log``; killed (the group) at ``timeout``."""
    argv = [a for a in cmd.argv if a != "XDIST"]
    if "XDIST" in cmd.argv:
        argv += _xdist_args()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **cmd.env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    t0 = time.time()
    timed_out = False
    with log.open("w") as f:
        f.write(f"$ {_show(argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            argv, cwd=str(REPO), env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the command's own process group (its children too)
            except ProcessLookupError:
                pass
            rc = proc.wait()
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    return {
        "label": cmd.label,
        "command": _show(argv),
        "rc": rc,
        "timed_out": timed_out,
        "wall_s": round(wall, 1),
        "timeout_s": round(timeout, 1),
        "log": log.name,
        "tail": text.splitlines()[-25:],
    }


def run_plan(steps: List[Step], out: Path, deadline: float, say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    start = time.time()
    results = []
    for i, step in enumerate(steps):
        rec: Dict[str, Any] = {
            "id": step.id,
            "title": step.title,
            "area": step.area,
            "budget_s": step.budget_s,
            "commands": [],
        }
        if step.skip or not step.commands:
            rec.update(status="skipped", reason=step.skip or "no command in this mode", wall_s=0.0)
            say(f"[{PROG}] {step.id}: SKIPPED ({rec['reason']})")
            results.append(rec)
            continue
        later_min = sum(s.min_s for s in steps[i + 1 :] if not s.skip and s.commands)
        left = deadline - (time.time() - start)
        allowed = min(step.budget_s, left - later_min)
        if allowed < step.min_s:
            allowed = min(step.budget_s, left)  # the later steps' reserve gives way before nothing runs
        if allowed < max(1.0, 0.5 * step.min_s):
            rec.update(
                status="not run",
                reason=f"{left:.0f} s left before the deadline, the step needs {step.min_s:.0f} s",
                wall_s=0.0,
            )
            say(f"[{PROG}] {step.id}: NOT RUN ({rec['reason']})")
            results.append(rec)
            continue
        t0 = time.time()
        say(f"[{PROG}] {step.id}: {step.title} (timeout {allowed:.0f} s)")
        for k, cmd in enumerate(step.commands):
            remaining = allowed - (time.time() - t0)
            if remaining < 1:
                rec["commands"].append(
                    {
                        "label": cmd.label,
                        "rc": None,
                        "timed_out": True,
                        "wall_s": 0.0,
                        "timeout_s": 0.0,
                        "command": _show(cmd.argv),
                        "tail": ["not started: the step's time was spent"],
                    }
                )
                continue
            env_deadline = {"GPU_CHECK_TIME_LEFT_S": f"{min(cmd.cap_s, remaining):.0f}"}
            c = Cmd(cmd.label, cmd.argv, cmd.cap_s, cmd.result, dict(cmd.env, **env_deadline))
            r = run_cmd(c, min(cmd.cap_s, remaining), out / f"{step.id}.{k}.log")
            if cmd.result and (out / cmd.result).is_file():
                try:
                    r["result"] = json.loads((out / cmd.result).read_text())
                except json.JSONDecodeError as err:
                    r["result_error"] = str(err)
            rec["commands"].append(r)
            outcome = "TIMED OUT" if r["timed_out"] else f"rc {r['rc']}"
            say(f"[{PROG}]   {cmd.label}: {outcome} in {r['wall_s']:.0f} s")
        ok = all(c.get("rc") == 0 and not c.get("timed_out") for c in rec["commands"])
        checks = [c.get("result", {}).get("ok") for c in rec["commands"] if isinstance(c.get("result"), dict)]
        if ok and any(v is False for v in checks):
            ok = False
        rec["status"] = (
            "passed" if ok else ("timed out" if any(c.get("timed_out") for c in rec["commands"]) else "failed")
        )
        rec["wall_s"] = round(time.time() - t0, 1)
        say(f"[{PROG}] {step.id}: {rec['status'].upper()} in {rec['wall_s']:.0f} s")
        results.append(rec)
    return results


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=str(REPO), capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _pytest_line(tail: List[str]) -> str:
    for line in reversed(tail):
        if re.search(r"\d+ (passed|failed|error)", line):
            return line.strip("= ").strip()
    return "no pytest summary line"


def _fmt(x, spec=".4g"):
    return "n/a" if x is None else format(x, spec)


def step_details(rec: Dict[str, Any]) -> List[str]:
    """What the report says about one step beyond its status: each command's own result."""
    lines: List[str] = []
    for c in rec.get("commands", []):
        res = c.get("result") if isinstance(c.get("result"), dict) else None
        lines.append(
            f"- `{c['command']}`: {'timed out' if c.get('timed_out') else 'exit ' + str(c.get('rc'))}, "
            f"{c.get('wall_s', 0):.0f} s (log `{c.get('log', '-')}`)"
        )
        if rec["id"] == "pytest":
            lines.append(f"  - {_pytest_line(c.get('tail', []))}")
        if res and res.get("lines"):
            lines += ["", "```"] + [str(x) for x in res["lines"]] + ["```", ""]
        elif rec["id"].startswith("bench") and c.get("rc") == 0:
            table = [t for t in c.get("tail", []) if not t.startswith("$ ")]
            lines += ["", "```"] + table + ["```", ""]
        if c.get("rc") != 0 or c.get("timed_out"):
            lines += ["", "  last lines of its output:", "", "```"] + c.get("tail", [])[-15:] + ["```", ""]
    return lines


def render_report(results: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    pre = (
        next(
            (
                c.get("result")
                for r in results
                if r["id"] == "preflight"
                for c in r.get("commands", [])
                if isinstance(c.get("result"), dict)
            ),
            None,
        )
        or {}
    )
    lines = [
        f"## GPU check of {meta['date']} (`tools/gpu_check.sh{meta['mode']}`)",
        "",
        f"Commit `{meta['commit']}`{' (working tree not clean)' if meta.get('dirty') else ''}; device "
        f"{pre.get('device', 'unknown')}; {pre.get('versions_line', 'versions unknown')}. Wall time "
        f"{meta['wall_s']:.0f} s of a {meta['deadline_s']:.0f} s deadline. Every number here comes from this run "
        "(`report.md` and the JSON files in the run folder).",
        "",
        "| step | area | status | wall s | timeout cap s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cap = "rest" if r["budget_s"] >= 10**5 else f"{r['budget_s']:.0f}"
        lines.append(f"| {r['id']}: {r['title']} | {r['area']} | {r['status']} | {r.get('wall_s', 0):.0f} | {cap} |")
    for r in results:
        lines += [
            "",
            f"### {r['id']}: {r['title']}",
            "",
            f"Status: **{r['status']}**" + (f" ({r['reason']})" if r.get("reason") else "") + ".",
        ]
        lines += step_details(r)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Workers (each runs in its own process, started by the plan)
# ---------------------------------------------------------------------------------------------


def _tests_path() -> None:
    for p in (str(TESTS), str(REPO)):
        if p not in sys.path:
            sys.path.insert(0, p)


def _write(path: str, data: Dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")
    for line in data.get("lines", []):
        print(line, flush=True)


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001
        return "not installed"


def w_preflight(a) -> int:
    import torch

    cuda = torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA device)"
    mem = f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB" if cuda else ""
    smi = ""
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi not available"
    parts = {}
    for name, mod in (
        ("megatron-core", "megatron.core"),
        ("TransformerEngine", "transformer_engine.pytorch"),
        ("apex FusedAdam", "apex.optimizers"),
        ("pytest-xdist", "xdist"),
        ("peft", "peft"),
    ):
        try:
            __import__(mod)
            parts[name] = "imports"
        except Exception as err:  # noqa: BLE001
            parts[name] = f"not importable ({type(err).__name__})"
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{
            m: _version(m)
            for m in (
                "deepspeed",
                "transformers",
                "accelerate",
                "megatron-core",
                "peft",
                "transformer_engine",
                "apex",
                "pytest",
            )
        },
    }
    vline = ", ".join(f"{k} {v}" for k, v in versions.items())
    data = {
        "ok": True,
        "device": dev + mem,
        "cuda": cuda,
        "nvidia_smi": smi,
        "versions": versions,
        "versions_line": vline,
        "optional": parts,
        "lines": [
            f"device: {dev}{mem}",
            f"nvidia-smi: {smi}",
            f"versions: {vline}",
            "optional parts: " + ", ".join(f"{k}: {v}" for k, v in parts.items()),
        ],
    }
    _write(a.json, data)
    return 0


def w_fusedadam(a) -> int:
    import torch

    t0 = time.time()
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load()
    data = {
        "ok": True,
        "build_s": round(time.time() - t0, 1),
        "cuda": torch.cuda.is_available(),
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
        "lines": [
            f"FusedAdam built/loaded in {time.time() - t0:.1f} s (TORCH_CUDA_ARCH_LIST="
            f"{os.environ.get('TORCH_CUDA_ARCH_LIST')})"
        ],
    }
    _write(a.json, data)
    return 0


def _dtype_cfg(cfg: dict, dtype: str) -> dict:
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def w_loop_hf(a) -> int:
    """Loop mode (the model's outputs.loss and the logits' loss) and FSAMTrainer against train_batch."""
    _tests_path()
    import torch
    from common import GAS, LR, STEPS, ds_config, engine_run
    from reference import weight_distance

    unit = LR * STEPS
    rows, lines, ok = [], [], True
    lines.append(
        f"ZeRO {a.stage} | {a.dtype} | one rank | device {'cuda' if torch.cuda.is_available() else 'cpu'} | "
        f"tiny Llama, {STEPS} steps x gas {GAS}; distances: max |w - w_train_batch| / (lr x steps)"
    )
    lines.append(
        f"{'method':<30}{'loop outputs.loss':>18}{'loop logits':>13}{'bit-identical':>15}{'Trainer':>10}"
        f"{'AdamW (scale)':>15}"
    )
    for method in a.methods.split(","):

        def cfg(m=method):
            return _dtype_cfg(ds_config(m, zero_optimization={"stage": a.stage}), a.dtype)

        tb, _, tb_metrics = engine_run(method, config=cfg())
        hf_loop, _, _ = engine_run(method, config=cfg(), loop="hf")
        lg_loop, _, _ = engine_run(method, config=cfg(), loop="logits")
        adamw, _, _ = engine_run("AdamW", config=cfg("AdamW"))
        trainer = _trainer_state(method, a.stage, a.dtype) if not a.no_trainer else None
        d = {
            "loop_hf": weight_distance(hf_loop, tb) / unit,
            "loop_logits": weight_distance(lg_loop, tb) / unit,
            "trainer": weight_distance(trainer, tb) / unit if trainer is not None else None,
            "adamw": weight_distance(adamw, tb) / unit,
        }
        ident = all(torch.equal(lg_loop[k], tb[k]) for k in tb)
        # a door follows the method when its distance to train_batch is far below AdamW's (the scale
        # that separates methods); loop mode with the logits' loss is train_batch's arithmetic
        row_ok = all(v is None or v < 0.05 * d["adamw"] for k, v in d.items() if k != "adamw") and d["adamw"] > 0
        ok = ok and row_ok
        rows.append(
            {
                "method": method,
                **d,
                "bit_identical_loop_logits": ident,
                "ok": row_ok,
                "eps_norms": [m["eps_norm"] for m in tb_metrics],
            }
        )
        lines.append(
            f"{method:<30}{d['loop_hf']:>18.3e}{d['loop_logits']:>13.3e}{str(ident):>15}"
            f"{_fmt(d['trainer'], '.3e'):>10}{d['adamw']:>15.3e}" + ("" if row_ok else "   <-- FAIL")
        )
    lines.append(
        "rule: each door's distance < 0.05 x AdamW's distance (bf16 round-off differs between the doors' "
        "loss arithmetic); bit-identical: loop mode with the logits' loss vs train_batch"
    )
    _write(a.json, {"ok": ok, "stage": a.stage, "dtype": a.dtype, "rows": rows, "lines": lines})
    return 0 if ok else 1


def _trainer_state(method: str, stage: int, dtype: str):
    _tests_path()
    import tempfile

    from accelerate.state import PartialState
    from common import STEPS, full_state
    from hf_worker import ReferenceOrder, ds_json, reference_args, reset_accelerate
    from reference import tiny_llama

    from fsam_ds.distributed import default_backend
    from fsam_ds.hf import FSAMTrainer

    # the Trainer uses the process state set up here (use_configured_state): nccl on a GPU, gloo on CPU,
    # on the process group fsam_ds.initialize already started
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend=default_backend())
    reset_accelerate()
    cfg = ds_json(method, stage)
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": "auto"}
    out = tempfile.mkdtemp(prefix="gpu_check_trainer_")
    args = reference_args(out, STEPS, cfg, bf16=dtype == "bf16")
    trainer = FSAMTrainer(model=tiny_llama(0), args=args, train_dataset=ReferenceOrder(1, steps=STEPS))
    trainer.train()
    return full_state(trainer.model_wrapped)


def _loss_scale(opt) -> Optional[float]:
    for name in ("loss_scale", "cur_scale"):
        v: Any = getattr(opt, name, None)
        if isinstance(v, (int, float)):
            return float(v)
        if hasattr(v, "item"):
            return float(v.item())
    cfg = getattr(opt, "loss_scale_config", None)
    return float(cfg.cur_scale) if cfg is not None else None


def w_fp16(a) -> int:
    """fp16 overflows through fsam_ds: natural (initial scale too large) and injected (pass 1, pass 2)."""
    _tests_path()
    import torch
    from common import ds_config, local_weights
    from reference import micro_batch, tiny_llama

    import fsam_ds

    lines, cases, ok = [], [], True
    dtype = a.dtype
    for stage in [int(s) for s in a.stages.split(",")]:
        cfg = ds_config("PreconditionedFunctionalSAM", gas=2, zero_optimization={"stage": stage})
        if dtype == "fp16":
            cfg["fp16"] = {
                "enabled": True,
                "initial_scale_power": 24,
                "loss_scale_window": 1000,
                "hysteresis": 1,
                "min_loss_scale": 1,
            }
        else:
            cfg["bf16"] = {"enabled": True}
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
        lm_head = engine.module.lm_head
        arm = {"pass": 0, "n": 0}

        def hook(module, args, arm=arm):
            arm["n"] += 1
            want = arm["pass"]
            # gas 2: forwards 1-2 are pass 1, 3-4 pass 2 (an exact step of the preconditioned type)
            if (want == 1 and arm["n"] == 1) or (want == 2 and arm["n"] == 3):
                bad = torch.zeros_like(args[0])
                bad.view(-1)[0] = float("inf")
                return (args[0] + bad,) + tuple(args[1:])
            return None

        lm_head.register_forward_pre_hook(hook)
        data = iter([micro_batch(s, 0, i, 1, 2) for s in range(64) for i in range(2)])
        steps, applied_run, injected = [], 0, []
        plan_inject = [1, 2]
        for k in range(24):
            inject = 0
            if applied_run >= 2 and plan_inject:
                inject = plan_inject.pop(0)
            arm.update(**{"pass": inject, "n": 0})
            before = [t.clone() for t in local_weights(engine)]
            scale0 = _loss_scale(engine.optimizer)
            engine.train_batch(data)
            m = dict(engine.last_metrics)
            after = local_weights(engine)
            unchanged = all(torch.equal(x, y) for x, y in zip(before, after))
            rec = {
                "step": k,
                "inject": inject,
                "scale_before": scale0,
                "scale_after": _loss_scale(engine.optimizer),
                "skipped": bool(m["skipped"]),
                "unchanged": unchanged,
                "loss": m["loss"],
                "eps_norm": m["eps_norm"],
                "grad_norm": m["grad_norm"],
            }
            steps.append(rec)
            applied_run = 0 if m["skipped"] else applied_run + 1
            if inject:
                injected.append(rec)
            if not plan_inject and applied_run >= 1 and k > 2:
                break
        natural = [s for s in steps if s["skipped"] and not s["inject"]]
        lowered = lambda s: (  # noqa: E731
            (s["scale_before"] is None or s["scale_after"] is None or s["scale_after"] < s["scale_before"])
            if dtype == "fp16"
            else True
        )
        inj_ok = len(injected) == 2 and all(s["skipped"] and s["unchanged"] and lowered(s) for s in injected)
        nat_ok = all(s["unchanged"] and lowered(s) for s in natural)
        applied_ok = any(not s["skipped"] and not s["unchanged"] for s in steps)
        case_ok = inj_ok and nat_ok and applied_ok
        ok = ok and case_ok
        probe = _backward_scale_probe(stage, dtype) if dtype == "fp16" else None
        cases.append(
            {
                "stage": stage,
                "dtype": dtype,
                "steps": steps,
                "natural_overflows": len(natural),
                "injected_ok": inj_ok,
                "natural_ok": nat_ok,
                "applied_ok": applied_ok,
                "ok": case_ok,
                "backward_probe": probe,
            }
        )
        lines.append(
            f"ZeRO {stage} | {dtype} | PreconditionedFunctionalSAM, gas 2 | "
            f"{'PASS' if case_ok else 'FAIL'}: {len(natural)} natural overflow(s), injected pass-1/pass-2 "
            + (
                "skipped with weights unchanged" + (" and the scale lowered" if dtype == "fp16" else "")
                if inj_ok
                else "NOT handled"
            )
        )
        lines.append(
            f"  {'step':>4}{'inject':>8}{'scale before':>14}{'scale after':>13}{'skipped':>9}{'unchanged':>11}"
            f"{'eps_norm':>10}"
        )
        for s in steps:
            lines.append(
                f"  {s['step']:>4}{s['inject'] or '-':>8}{_fmt(s['scale_before'], '.3g'):>14}"
                f"{_fmt(s['scale_after'], '.3g'):>13}{str(s['skipped']):>9}{str(s['unchanged']):>11}"
                f"{s['eps_norm']:>10.3g}"
            )
        if probe:
            lines.append(
                f"  engine.backward at ZeRO {stage}: optimizer {probe['optimizer']}, loss scale "
                f"{probe['scale']:g}; ||grad after engine.backward|| / ||plain autograd grad|| = "
                f"{probe['ratio']:.4g} -> {probe['verdict']}"
            )
        del engine
    _write(a.json, {"ok": ok, "cases": cases, "lines": lines})
    return 0 if ok else 1


def _backward_scale_probe(stage: int, dtype: str) -> Dict[str, Any]:
    """Does DeepSpeed's ``engine.backward`` multiply the loss by the fp16 loss scale? One micro-batch,
    a static scale of 1024, gradients against plain autograd on an identical fp16 model."""
    _tests_path()
    import copy

    import torch
    from common import ds_config
    from reference import micro_batch, tiny_llama

    import fsam_ds
    from fsam_ds import causal_lm_loss

    cfg = ds_config("AdamW", gas=1, zero_optimization={"stage": stage})
    cfg["fp16"] = {"enabled": True, "loss_scale": 1024}
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
    twin = copy.deepcopy(engine.module)
    ids = micro_batch(0, 0, 0, 1, 1)["input_ids"].to(engine.device)
    loss = causal_lm_loss(engine(input_ids=ids).logits, ids)
    engine.backward(loss)
    ref_loss = causal_lm_loss(twin(input_ids=ids).logits, ids)
    ref_loss.backward()
    ref = torch.sqrt(
        cast(torch.Tensor, sum((p.grad.float() ** 2).sum() for p in twin.parameters() if p.grad is not None))
    )
    if stage == 0:
        got = torch.sqrt(
            cast(
                torch.Tensor, sum((p.grad.float() ** 2).sum() for p in engine.module.parameters() if p.grad is not None)
            )
        )
    else:  # ZeRO 1/2: the reduced fp16 gradient partitions the optimizer holds
        from fsam_ds.shards import make_view

        grads = make_view(engine).grads()
        got = torch.sqrt(cast(torch.Tensor, sum((g.float() ** 2).sum() for g in grads)))
    scale = _loss_scale(engine.optimizer)
    ratio = float(got / ref)
    verdict = (
        "no loss scale found on the optimizer"
        if scale is None
        else "scales the loss"
        if abs(ratio / scale - 1) < 0.05
        else "does NOT scale the loss"
        if abs(ratio - 1) < 0.05
        else "neither 1 nor the scale"
    )
    return {"optimizer": type(engine.optimizer).__name__, "scale": scale, "ratio": ratio, "verdict": verdict}


def w_megatron(a) -> int:
    """megatron-core TP=1 with the Adam it picks; where the step lives and what the SAM step reads."""
    _tests_path()
    import torch
    import torch.distributed as dist

    from fsam_ds.distributed import default_backend, free_port

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(default_backend(), init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    import megatron.core  # noqa: F401

    from megatron_patches import cpu

    cpu.apply()  # nothing on a GPU machine
    import megatron.core.optimizer as mopt
    import reference
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_step_worker import GroupStepAdamW, build_chunk

    from fsam_ds.config import SAMConfig
    from megatron_patches import layout
    from megatron_patches.sam import MainParams, MegatronSAM

    fused = {}
    for name, mod in (
        ("TransformerEngine FusedAdam", "transformer_engine.pytorch.optimizers"),
        ("apex FusedAdam", "apex.optimizers"),
    ):
        try:
            m = __import__(mod, fromlist=["FusedAdam"])
            getattr(m, "FusedAdam")
            fused[name] = "installed"
        except Exception as err:  # noqa: BLE001
            fused[name] = f"not installed ({type(err).__name__})"
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    hf = reference.tiny_llama(seed=0, layers=1)
    full = layout.hf_to_megatron(hf.state_dict(), hf.config)
    picked = {
        "Adam": f"{mopt.Adam.__module__}.{mopt.Adam.__name__}",
        "USING_PYTORCH_OPTIMIZER": bool(getattr(mopt, "USING_PYTORCH_OPTIMIZER", True)),
    }

    def build(distopt=False, bf16=False, adam_cls=None):
        chunks, opt, _ = build_chunk(hf, full, distopt=distopt, bf16=bf16, adam_cls=adam_cls, device=dev)
        return chunks, opt

    def forward_step(data_iterator, model):
        ids = next(data_iterator)["input_ids"].to(dev)
        tokens, labels = ids[:, :-1], ids[:, 1:]
        b, s = tokens.shape
        pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=dev)).logical_not().view(1, 1, s, s)

        def loss_func(output_tensor):
            loss = output_tensor.float().mean()
            return loss, {"lm loss": loss.detach().clone()}

        return model(tokens, pos, mask, labels=labels), loss_func

    def batches(step):
        mbs = [reference.micro_batch(step, 0, i, 1, 2) for i in range(2)]
        b, seq = mbs[0]["input_ids"].shape[0], mbs[0]["input_ids"].shape[1] - 1
        return mbs, dict(num_microbatches=2, seq_length=seq, micro_batch_size=b)

    def where_step(opt):
        inner = [o for o in getattr(opt, "chained_optimizers", [opt])]
        out = []
        for o in inner:
            io = o.optimizer
            in_group = any(g.get("step") is not None for g in io.param_groups if g["params"])
            in_state = any("step" in st for st in io.state.values() if isinstance(st, dict))
            out.append(
                {"class": f"{type(io).__module__}.{type(io).__name__}", "param_groups": in_group, "state": in_state}
            )
        return out

    def run(method, steps, **kw):
        chunks, opt = build(**kw)
        runner = MegatronSAM(chunks, opt, SAMConfig(method=method, rho=0.05))
        runner.skip_unperturbed_pass2 = False
        info: Dict[str, Any] = {}
        for step in range(steps):
            mbs, bkw = batches(step)
            runner.step(get_forward_backward_func(), forward_step, iter(mbs), **bkw)
            main = MainParams(opt)
            t = main.adam_updates()
            d = main.denominators(t)
            info.setdefault("adam_step", []).append(t)
            info.setdefault("denominators", []).append(d is not None)
        info["where"] = where_step(opt)
        info["weights"] = {k: v.float().cpu().clone() for k, v in layout.gather_full_state_dict(chunks).items()}
        return info

    def gap(x, y):
        return max(float((x["weights"][n] - y["weights"][n]).abs().max()) for n in x["weights"])

    layouts = {"fp32": {}, "bf16_distopt": {"bf16": True, "distopt": True}}
    lines = [
        f"megatron-core {_version('megatron-core')} | TP=1 PP=1 | device {dev} | "
        + ", ".join(f"{k}: {v}" for k, v in fused.items()),
        f"megatron-core's Adam here: {picked['Adam']} (USING_PYTORCH_OPTIMIZER={picked['USING_PYTORCH_OPTIMIZER']})",
    ]
    cases, ok = {}, True
    real_fused = not picked["USING_PYTORCH_OPTIMIZER"]
    for lname, kw in layouts.items():
        default = run("PreconditionedSAM", a.steps, **kw)
        sam = run("SAM", a.steps, **kw)
        case = {"default": {k: v for k, v in default.items() if k != "weights"}, "sam_gap": gap(default, sam)}
        expected = list(range(1, a.steps + 1))
        c_ok = default["adam_step"] == expected and all(default["denominators"]) and case["sam_gap"] > 1e-3
        lines.append(
            f"{lname}: optimizer {default['where'][0]['class']}, step kept in param_groups="
            f"{default['where'][0]['param_groups']} state={default['where'][0]['state']}; "
            f"adam_step read {default['adam_step']} (expected {expected}); preconditioner present "
            f"{default['denominators']}; max |w_PSAM - w_SAM| {case['sam_gap']:.3e} (> 1e-3 needed)"
        )
        if not real_fused:  # no TE/apex: the param_groups layout through the stand-in, on this device
            stand = run("PreconditionedSAM", a.steps, adam_cls=GroupStepAdamW, **kw)
            case["stand_in"] = {k: v for k, v in stand.items() if k != "weights"}
            case["stand_in_vs_torch"] = gap(stand, default)
            s_ok = (
                stand["adam_step"] == expected
                and all(stand["denominators"])
                and stand["where"][0]["param_groups"]
                and case["stand_in_vs_torch"] <= 1e-6
            )
            c_ok = c_ok and s_ok
            lines.append(
                f"{lname}: stand-in GroupStepAdamW (step in param_groups={stand['where'][0]['param_groups']}, "
                f"state={stand['where'][0]['state']}): adam_step read {stand['adam_step']}, preconditioner "
                f"{stand['denominators']}, max |w_standin - w_torch| {case['stand_in_vs_torch']:.3e} "
                "(<= 1e-6 needed: the same arithmetic)"
            )
        case["ok"] = c_ok
        ok = ok and c_ok
        cases[lname] = case
    lines.append(
        ("PASS" if ok else "FAIL")
        + (
            ": real FusedAdam (step in param_groups) read by the preconditioned types"
            if real_fused
            else ": TE/apex not installed here, so the proof is the "
            "stand-in on this device; a real FusedAdam run needs TE or apex"
        )
    )
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    _write(
        a.json,
        {"ok": ok, "fused": fused, "picked": picked, "real_fused_adam": real_fused, "cases": cases, "lines": lines},
    )
    return 0 if ok else 1


def default_dataset() -> str:
    """WikiText-2 where it is (../shared/data, or a copy inside the checkout that travels to a device
    machine), else the embedded corpus."""
    for p in (
        REPO.parent / "shared" / "data" / "wikitext-2",
        REPO / "shared" / "data" / "wikitext-2",
        REPO / ".gpu_data" / "wikitext-2",
    ):
        if p.is_dir():
            return str(p)
    return "default"


def w_seeds(a) -> int:
    """On the GPU: AdamW, PFSAM and PFSAM with ascent_every 4, paired fresh seeds, as many as fit."""
    import gc

    import torch

    from fsam_ds.train import main as train_main
    from fsam_ds.train import train_argv
    from tools import reproduce, verdicts

    cuda = torch.cuda.is_available()
    budget = float(os.environ.get("GPU_CHECK_TIME_LEFT_S", a.budget_s)) - 10.0
    t_start = time.time()
    dataset = a.dataset or default_dataset()
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    configs = [("AdamW", 1), ("PreconditionedFunctionalSAM", 1), ("PreconditionedFunctionalSAM", 4)]
    rows: List[Dict[str, Any]] = []
    per_seed: List[float] = []
    seed = FRESH_SEED0
    while len(per_seed) < a.max_seeds:
        left = budget - (time.time() - t_start)
        need = 1.15 * max(per_seed) if per_seed else 0.0
        if per_seed and left < need:
            break
        t_seed = time.time()
        for method, every in configs:
            extra = {"ascent_every": every} if every > 1 else None
            cfg = reproduce.ds_config(method, SEEDS_LR, SEEDS_RHO, a.steps, a.micro_batch, 0, extra)
            if cuda:
                cfg["bf16"] = {"enabled": True}
            name = reproduce.run_name(method, SEEDS_LR, SEEDS_RHO, seed) + (f"-every{every}" if every > 1 else "")
            folder = runs / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "ds_config.json").write_text(json.dumps(cfg, indent=1))
            t0 = time.time()
            rc = train_main(
                train_argv(
                    folder / "ds_config.json",
                    folder,
                    a.steps,
                    model=a.preset,
                    dataset=dataset,
                    seq_len=a.seq_len,
                    eval_batches=a.eval_batches,
                    seed=seed,
                    log_every=max(1, a.steps // 4),
                )
            )
            summary = reproduce.run_summary(folder)
            rows.append(
                {
                    "name": name,
                    "method": method,
                    "ascent_every": every,
                    "seed": seed,
                    "rc": rc,
                    "lr": SEEDS_LR,
                    "rho": SEEDS_RHO if method != "AdamW" else 0.0,
                    "steps": a.steps,
                    "eval_loss": summary["final_eval_loss"],
                    "train_loss": summary["final_train_loss"],
                    "step_cost": reproduce.run_step_cost(folder),
                    "wall_s": round(time.time() - t0, 1),
                }
            )
            for tag in folder.glob("step*"):  # the checkpoints are not needed here (disk, time)
                import shutil

                shutil.rmtree(tag, ignore_errors=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if rc != 0:
                break
        per_seed.append(time.time() - t_seed)
        if any(r["rc"] != 0 for r in rows):
            break
        seed += 1

    def vals(method, every, key="eval_loss"):
        return {
            r["seed"]: r[key]
            for r in rows
            if r["method"] == method and r["ascent_every"] == every and r.get(key) is not None and r["rc"] == 0
        }

    ad, ex, ev4 = vals("AdamW", 1), vals("PreconditionedFunctionalSAM", 1), vals("PreconditionedFunctionalSAM", 4)
    gain = verdicts.compare(ex, ad, "less", label="PFSAM minus AdamW, eval loss (claim: lower)")
    gain4 = verdicts.compare(ev4, ad, "less", label="PFSAM every 4 minus AdamW, eval loss (claim: lower)")
    ret = verdicts.retention(ad, ex, ev4)
    cost = lambda m, e: vals(m, e, "step_cost")  # noqa: E731
    ratio = {
        s: c / cost("AdamW", 1)[s] for s, c in cost("PreconditionedFunctionalSAM", 1).items() if s in cost("AdamW", 1)
    }
    ratio4 = {
        s: c / cost("AdamW", 1)[s] for s, c in cost("PreconditionedFunctionalSAM", 4).items() if s in cost("AdamW", 1)
    }
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        f"preset {a.preset} | {'bf16, cuda' if cuda else 'fp32, cpu'} | {a.steps} steps x micro {a.micro_batch} x seq "
        f"{a.seq_len} | dataset {dataset} | lr {SEEDS_LR:g}, rho {SEEDS_RHO:g} fixed in advance (not tuned on any "
        f"seed) | fresh seeds {seeds} (never the selection seed {SELECT_SEED}) | {time.time() - t_start:.0f} s",
        f"{'seed':>6}{'AdamW':>10}{'PFSAM':>10}{'PFSAM+every4':>14}{'PFSAM/AdamW step':>18}{'every4/AdamW step':>19}",
    ]
    for s in seeds:
        lines.append(
            f"{s:>6}{_fmt(ad.get(s), '.4f'):>10}{_fmt(ex.get(s), '.4f'):>10}{_fmt(ev4.get(s), '.4f'):>14}"
            f"{_fmt(ratio.get(s), '.2f'):>18}{_fmt(ratio4.get(s), '.2f'):>19}"
        )
    lines += [
        f"PFSAM - AdamW: {verdicts.fmt_interval(gain)}: {gain['verdict']}",
        f"PFSAM every4 - AdamW: {verdicts.fmt_interval(gain4)}: {gain4['verdict']}",
        f"every4 keeps >= 80% of PFSAM's gain: {ret['verdict']}"
        + (f" ({ret['note']})" if ret["note"] else "")
        + (f"; point share {ret['kept_point']:.2f}" if ret.get("kept_point") is not None else ""),
        f"step cost / AdamW's (per seed, count-weighted medians): PFSAM "
        f"{verdicts.fmt_interval(verdicts.interval(list(ratio.values())), '.3f')}, every4 "
        f"{verdicts.fmt_interval(verdicts.interval(list(ratio4.values())), '.3f')}",
        f"rule: {verdicts.RULE}",
    ]
    ok = bool(rows) and all(r["rc"] == 0 for r in rows)
    _write(
        a.json,
        {
            "ok": ok,
            "schema": "fsam-gpu-seeds/1",
            "preset": a.preset,
            "dataset": dataset,
            "lr": SEEDS_LR,
            "rho": SEEDS_RHO,
            "steps": a.steps,
            "micro_batch": a.micro_batch,
            "seq_len": a.seq_len,
            "select_seed_excluded": SELECT_SEED,
            "fresh_seeds": seeds,
            "rows": rows,
            "gain": gain,
            "gain_every4": gain4,
            "retention": ret,
            "step_cost_ratio": ratio,
            "step_cost_ratio_every4": ratio4,
            "per_seed_s": per_seed,
            "rule": verdicts.RULE,
            "lines": lines,
        },
    )
    return 0 if ok else 1


WORKERS = {
    "preflight": w_preflight,
    "fusedadam": w_fusedadam,
    "loop-hf": w_loop_hf,
    "fp16": w_fp16,
    "megatron": w_megatron,
    "seeds": w_seeds,
}


def worker_main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{PROG} worker")
    p.add_argument("name", choices=sorted(WORKERS))
    p.add_argument("--json", required=True)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--stages", default="0,2")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--methods", default="PreconditionedFunctionalSAM,SAM")
    p.add_argument("--no-trainer", action="store_true")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--preset", default="24m")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--max-seeds", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=180.0)
    p.add_argument("--dataset", default=None)
    p.add_argument("--runs", default=None)
    a = p.parse_args(argv)
    if a.name == "megatron" and a.steps == 100:
        a.steps = 3
    if a.name == "loop-hf" and a.dtype == "fp16":
        a.dtype = "bf16"
    if a.name == "seeds" and a.runs is None:
        a.runs = str(Path(a.json).parent / "seeds_runs")
    return WORKERS[a.name](a)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="The prepared GPU check: loops, GPU paths and numbers (one GPU, under 10 minutes, one report)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="each step in its smallest form on CPU; GPU-only steps are skipped with a line saying so",
    )
    p.add_argument("--out", default=None, help="run folder (default runs/gpu_check/<UTC time>)")
    p.add_argument("--only", default=None, help="comma-separated step ids (default: all)")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S, help=f"the whole run (default {DEADLINE_S})")
    p.add_argument(
        "--dataset",
        default=None,
        help="the text of the paired-seed runs (default: WikiText-2 in "
        "../shared/data, shared/data or .gpu_data inside the checkout, else the embedded corpus)",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    a = build_parser().parse_args(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out) if a.out else REPO / "runs" / "gpu_check" / (stamp + ("-cpu-smoke" if a.cpu_smoke else ""))
    steps = plan(out, a.cpu_smoke, a.dataset)
    if a.only:
        want = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in want if x not in {s.id for s in steps}]
        if bad:
            print(f"{PROG}: error: --only {','.join(bad)}: accepted: {', '.join(s.id for s in steps)}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.id in want]
    if a.dry_run:
        print(plan_text(steps, a.deadline_s))
        print(f"\n(dry run: nothing was run; the report would go to {out / 'report.md'})")
        return 0
    if not a.cpu_smoke:
        try:
            import torch

            if not torch.cuda.is_available():
                print(
                    f"{PROG}: error: no CUDA device is visible; accepted: a machine with a GPU, or --cpu-smoke / "
                    "--dry-run",
                    file=sys.stderr,
                )
                return 2
        except ImportError:
            print(f"{PROG}: error: torch is not importable; see the header of tools/gpu_check.sh", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    print(plan_text(steps, a.deadline_s), flush=True)
    t0 = time.time()
    results = run_plan(steps, out, a.deadline_s, say=lambda s: print(s, flush=True))
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "-uno")),
        "mode": " --cpu-smoke" if a.cpu_smoke else "",
        "wall_s": time.time() - t0,
        "deadline_s": a.deadline_s,
    }
    report = render_report(results, meta)
    (out / "report.md").write_text(report)
    (out / "summary.json").write_text(
        json.dumps({"schema": SCHEMA, "meta": meta, "steps": results}, indent=1, default=str) + "\n"
    )
    counts = {
        k: sum(r["status"] == k for r in results) for k in ("passed", "failed", "timed out", "skipped", "not run")
    }
    print(
        f"[{PROG}] report: {out / 'report.md'} | "
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + f" | {meta['wall_s']:.0f} s",
        flush=True,
    )
    return 0 if not (counts["failed"] or counts["timed out"] or counts["not run"]) else 1


if __name__ == "__main__":
    sys.exit(main())
