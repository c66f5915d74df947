"""Fault soak: a 2-rank ZeRO-3 PreconditionedFunctionalSAM run with dropout, SIGKILLed again and
again at random ranks and moments, restarted by ``fsam-supervise`` from ``latest`` each time,
must end exactly where the uninterrupted run ends.

::

    python tools/fault_soak.py --faults 6 --steps 24 --seed 1     # the soak
    python tools/fault_soak.py --short                           # CI: 2 faults, 10 steps

What it does, in a fresh ``--work`` folder (a temporary one by default):

1. writes a tiny Llama (``tiny`` preset's shape, attention dropout 0.1) and a ZeRO-3
   PreconditionedFunctionalSAM config (micro-batch 4, 2 warm-up steps, so the weights move);
2. runs ``fsam-train`` (this file in its worker role, i.e. ``fsam_ds.train.main`` with a fault
   hook) under ``deepspeed --num_gpus 2`` once without faults: the reference;
3. runs the same command under ``python -m fsam_ds.supervise --checkpoint-dir ...`` with a fault
   plan: run *i* of the supervisor (``FSAM_SUPERVISE_ATTEMPT=i``) SIGKILLs the plan's rank *i* at
   the plan's moment *i*; the supervisor restarts with ``--resume`` after each death;
4. compares: every per-step record of ``metrics.jsonl`` (loss, grad_norm, eps_norm, rho, lr,
   method, skipped), the final eval_loss, the final fp32 weights (``zero_to_fp32`` of the last
   tag) and the data position stored in the last checkpoint, against the reference.

The moments (drawn from ``--seed``; the first two faults always hit one step and one save, the
rest are drawn from all kinds):

==================  ==========================================================================
``between_passes``  after pass 1 and the ascent, before pass 2 (weights at theta)
``pass2``           at the start of pass 2's forward/backward (weights at theta + eps)
``timer``           a random time (0 to 1.5 step times) into a random step: wherever that
                    falls (pass 1, ascent, pass 2, update, logging, the save after the step)
``save_zero``       while DeepSpeed writes this rank's ZeRO files of a checkpoint
``save_rng``        after DeepSpeed's files, before the rank's RNG state file
``publish``         rank 0, ``latest.tmp`` written, not yet renamed to ``latest``
``loading``         while the restarted run loads the checkpoint (``--resume``)
==================  ==========================================================================

The report (printed, and ``--report`` as JSON): faults injected (the kill happened), faults
survived (the next run resumed from ``latest`` and the job reached its end), steps lost (steps
already finished when a rank died and computed again after the restart), data lost (per-step
records missing or duplicated at the end, progress behind ``latest`` after a restart, a
different data position: must be 0), and the largest differences. Exit status 0 only when
every fault was injected and survived, nothing was lost and everything equals the reference
(``--tolerance``, default 0: bit-identical). 1 otherwise; 2 for bad options.

Several ranks share the CPU: run it alone, e.g. ``flock /tmp/fsam-multirank.lock python
tools/fault_soak.py --short``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fsam_ds.distributed import free_port
from fsam_ds.names import LATEST, METRICS_FILE, TMP_SUFFIX, deepspeed_tag
from fsam_ds.train import train_argv

ROOT = Path(__file__).resolve().parents[1]
ROLE_ENV = "FSAM_SOAK_ROLE"  # "worker": this file runs fsam-train with the fault plan
PLAN_ENV = "FSAM_SOAK_PLAN"  # JSON file: the list of faults, one per supervisor run
MARKS_ENV = "FSAM_SOAK_MARKS"  # folder: one JSON file per injected fault, written just before the kill
STEP_KINDS = ("between_passes", "pass2", "timer")
SAVE_KINDS = ("save_zero", "save_rng", "publish")
KINDS = STEP_KINDS + SAVE_KINDS + ("loading",)
COMPARED = ("loss", "grad_norm", "eps_norm", "rho", "lr", "method", "skipped")


# ---------------------------------------------------------------------------------------------
# Worker role: inside each rank, started by the deepspeed launcher
# ---------------------------------------------------------------------------------------------


def _worker() -> int:
    plan_file = os.environ.get(PLAN_ENV)
    attempt = int(os.environ.get("FSAM_SUPERVISE_ATTEMPT", "0"))
    if plan_file:
        plan = json.loads(Path(plan_file).read_text())
        if attempt < len(plan["faults"]):
            _install(plan["faults"][attempt], attempt, plan["steps"], plan["save_every"])
    from fsam_ds.train import main

    rc = main()
    if _STATE.get("armed") and not _STATE.get("fired"):
        _die("at exit (the planned moment never came)")  # a fault is never silently not injected
    return rc


_STATE: Dict[str, Any] = {}


def _die(where: str) -> None:
    """Write the mark, then SIGKILL this rank."""
    st = _STATE
    st["fired"] = True
    mark = {
        "attempt": st["attempt"],
        "kind": st["kind"],
        "rank": st["rank"],
        "where": where,
        "phase": st.get("phase", "startup"),
        "steps_done": st.get("done"),
        "start_step": st.get("start"),
        "target_step": st.get("target"),
        "time": time.time(),
    }
    folder = Path(os.environ[MARKS_ENV])
    tmp = folder / f"fault{st['attempt']}.json.tmp"
    tmp.write_text(json.dumps(mark))
    os.replace(tmp, folder / f"fault{st['attempt']}.json")
    os.kill(os.getpid(), signal.SIGKILL)


def _install(fault: Dict[str, Any], attempt: int, steps: int, save_every: int) -> None:
    """Patch this rank (only the planned one) to die at the planned moment."""
    if int(os.environ.get("RANK", "0")) != int(fault["rank"]):
        return
    from deepspeed.runtime import engine as DE

    from fsam_ds import engine as E
    from fsam_ds import train as T

    st = _STATE
    st.update(
        attempt=attempt,
        kind=fault["kind"],
        rank=int(fault["rank"]),
        armed=True,
        fired=False,
        phase="startup",
        done=None,
        start=None,
        target=None,
        last_step_time=None,
    )
    kind = fault["kind"]
    rng = random.Random(fault["delay_seed"])  # never the global generators: they drive dropout

    def choose_target(done: int) -> int:
        """The step the fault hits, drawn in (done, steps] from the plan's u; save kinds: a save step."""
        step = done + 1 + min(steps - done - 1, int(fault["u"] * (steps - done)))
        if kind in SAVE_KINDS:
            saves = [s for s in range(step, steps + 1) if (save_every and s % save_every == 0) or s == steps]
            step = saves[0]
        return step

    def in_target() -> bool:
        return st["target"] is not None and st["done"] is not None and st["done"] + 1 == st["target"]

    original_train_batch = E.FSAMEngine.train_batch

    def train_batch(self, *args, **kwargs):
        done = int(self.global_steps)
        if st["start"] is None:
            st["start"] = done
            if kind == "loading":  # not resuming (no checkpoint yet): the first step's pass boundary
                st["kind"] = kind_now = "between_passes"
            else:
                kind_now = kind
            st["target"] = done + 1 if kind_now != kind else choose_target(done)
        st["done"], st["phase"] = done, "pass 1"
        if st["kind"] == "timer" and done + 1 == st["target"]:
            delay = rng.uniform(0.0, 1.5) * (st["last_step_time"] or 0.1)

            def fire():
                time.sleep(delay)
                _die(f"timer {delay * 1000:.0f} ms into step {done + 1}")

            threading.Thread(target=fire, daemon=True).start()
        t0 = time.perf_counter()
        out = original_train_batch(self, *args, **kwargs)
        st["last_step_time"] = time.perf_counter() - t0
        st["done"], st["phase"] = done + 1, "after the step"
        return out

    E.FSAMEngine.train_batch = train_batch  # type: ignore[method-assign]  # the fault injection's patch

    original_ascent = E.FSAMEngine.compute_ascent

    def compute_ascent(self, rho, momentum=False):
        st["phase"] = "ascent"
        out = original_ascent(self, rho, momentum)
        st["phase"] = "between the passes"
        if st["kind"] == "between_passes" and in_target():
            _die(f"step {st['target']}: after pass 1 and the ascent, before pass 2")
        return out

    E.FSAMEngine.compute_ascent = compute_ascent  # type: ignore[method-assign]

    original_backward_pass = E.FSAMEngine._backward_pass

    def _backward_pass(self, batches, logit_grads=None, rng_states=None, keep_logit_grads=False):
        if rng_states is not None:  # pass 2 replays pass 1's random states
            st["phase"] = "pass 2"
            if st["kind"] == "pass2" and in_target():
                _die(f"step {st['target']}: pass 2, weights at theta + eps")
        out = original_backward_pass(
            self, batches, logit_grads=logit_grads, rng_states=rng_states, keep_logit_grads=keep_logit_grads
        )
        if rng_states is not None:
            st["phase"] = "update"
        return out

    E.FSAMEngine._backward_pass = _backward_pass  # type: ignore[method-assign]

    original_save = DE.DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        st["phase"] = "saving (DeepSpeed files)"
        out = original_save(self, *args, **kwargs)
        st["phase"] = "saving (RNG state, metadata, latest)"
        return out

    DE.DeepSpeedEngine.save_checkpoint = save_checkpoint

    original_zero = DE.DeepSpeedEngine._save_zero_checkpoint

    def _save_zero_checkpoint(self, save_path, tag):
        if st["kind"] == "save_zero" and str(tag) == deepspeed_tag(st["target"]):
            _die(f"saving {tag}: DeepSpeed's ZeRO files of this rank")
        return original_zero(self, save_path, tag)

    DE.DeepSpeedEngine._save_zero_checkpoint = _save_zero_checkpoint

    original_rng_state = T.rng_state

    def rng_state():
        if st["kind"] == "save_rng" and st["done"] == st["target"]:
            _die(f"saving {deepspeed_tag(st['target'])}: after DeepSpeed's files, before the RNG state file")
        return original_rng_state()

    T.rng_state = rng_state

    original_publish = T.publish_latest

    def publish_latest(save_dir: Path, text: str, name: str = LATEST) -> None:
        if st["kind"] == "publish" and text == deepspeed_tag(st["target"]):
            Path(save_dir, name + TMP_SUFFIX).write_text(text)
            _die(f"publishing {text}: {name + TMP_SUFFIX} written, not renamed")
        original_publish(save_dir, text, name)

    T.publish_latest = publish_latest
    if kind == "publish" and int(fault["rank"]) != 0:  # only rank 0 publishes
        st["kind"] = "save_rng"

    original_load = DE.DeepSpeedEngine.load_checkpoint

    def load_checkpoint(self, *args, **kwargs):
        st["phase"] = "loading the checkpoint"
        if st["kind"] != "loading":
            return original_load(self, *args, **kwargs)
        if fault["u"] < 0.5:
            _die("loading the checkpoint on --resume (before DeepSpeed reads it)")
        out = original_load(self, *args, **kwargs)
        _die("loading the checkpoint on --resume (DeepSpeed's part read, RNG states not yet)")
        return out

    DE.DeepSpeedEngine.load_checkpoint = load_checkpoint


# ---------------------------------------------------------------------------------------------
# Driver role
# ---------------------------------------------------------------------------------------------


def make_plan(faults: int, seed: int, steps: int, save_every: int) -> Dict[str, Any]:
    """The faults, one per supervisor run: rank, kind, where in the remaining steps (u) and the
    timer's seed. The first two cover one step and one save (in an order drawn from the seed)."""
    rng = random.Random(seed)
    cats = ["step", "save"]
    rng.shuffle(cats)
    plan = []
    for i in range(faults):
        cat = cats[i] if i < 2 else rng.choice(["step", "step", "save", "save", "loading"])
        kind = {
            "step": lambda: rng.choice(STEP_KINDS),
            "save": lambda: rng.choice(SAVE_KINDS),
            "loading": lambda: "loading",
        }[cat]()
        plan.append(
            {"rank": rng.randrange(2), "kind": kind, "u": round(rng.random(), 4), "delay_seed": rng.randrange(2**31)}
        )
    return {"seed": seed, "steps": steps, "save_every": save_every, "faults": plan}


def _child_env(work: Path, cache: Optional[Path] = None) -> Dict[str, str]:
    from fsam_ds.distributed import without_process_group_env

    env = without_process_group_env()
    env.update(
        FSAM_DS_CACHE=str(cache or work / "cache"),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]),
    )
    env[ROLE_ENV] = "worker"
    env.pop(PLAN_ENV, None)
    env.pop("FSAM_SUPERVISE_ATTEMPT", None)
    return env


def prepare(work: Path, steps: int) -> None:
    """The model folder (tiny, attention dropout 0.1) and the ZeRO-3 PFSAM config."""
    import torch
    from transformers import LlamaForCausalLM

    from fsam_ds.models import llama_config

    cfg = llama_config("tiny", max_seq_len=64)
    cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    ds = json.loads((ROOT / "ds_configs" / "preconditioned_functional_sam.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    ds["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    ds["scheduler"]["params"].update(warmup_num_steps=2, total_num_steps=max(steps, 3), warmup_min_lr=1e-4)
    (work / "ds.json").write_text(json.dumps(ds, indent=1))


def train_command(work: Path, save: str, steps: int, save_every: int, port: int) -> List[str]:
    return [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(Path(__file__).resolve()),
        *train_argv(work / "ds.json", work / save, steps, model=work / "model", eval_batches=2, save_every=save_every),
    ]


def _run(cmd: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` in its own session; past ``timeout``: SIGTERM to its group (the supervisor passes it
    on to the job), then SIGKILL. The result has rc 124 then."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 45), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = 124
        out.seek(0)
        text = out.read()
    return subprocess.CompletedProcess(cmd, rc, text, "")


def read_records(save_dir: Path) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    steps: List[Dict[str, Any]] = []
    evals: List[Dict[str, Any]] = []
    for line in (save_dir / METRICS_FILE).read_text().splitlines():
        rec = json.loads(line)
        (steps if "loss" in rec else evals).append(rec)
    return steps, evals


def _client_state(save_dir: Path, tag: str) -> Dict[str, Any]:
    import torch

    head = torch.load(
        save_dir / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return {k: head.get(k) for k in ("micro_step", "seed", "global_steps")}


def _weights(save_dir: Path, tag: str):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)


def _rel(a, b) -> float:
    if a == b:
        return 0.0
    if a is None or b is None or isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def soak(
    work: Path,
    faults: int,
    seed: int,
    steps: int,
    save_every: int,
    tolerance: float,
    timeout: float,
    cache: Optional[Path] = None,
    say=print,
) -> Dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    prepare(work, steps)
    env = _child_env(work, cache)
    port = free_port()

    # the reference: the same command, no fault, no supervisor
    t0 = time.time()
    ref = _run(train_command(work, "reference", steps, save_every, port), work, env, timeout)
    (work / "reference.log").write_text(ref.stdout + ref.stderr)
    if ref.returncode != 0:
        raise RuntimeError(
            f"the uninterrupted run failed (exit {ref.returncode}); see {work / 'reference.log'}\n"
            + (ref.stdout + ref.stderr)[-3000:]
        )
    say(f"reference run: {steps} steps in {time.time() - t0:.1f} s")

    # the soak: under the supervisor, one planned fault per run
    plan = make_plan(faults, seed, steps, save_every)
    (work / "plan.json").write_text(json.dumps(plan, indent=1))
    marks = work / "marks"
    marks.mkdir(exist_ok=True)
    attempts_log = work / "attempts.jsonl"
    senv = dict(env, **{PLAN_ENV: str(work / "plan.json"), MARKS_ENV: str(marks)})
    sup = [
        sys.executable,
        "-m",
        "fsam_ds.supervise",
        "--max-restarts",
        str(faults),
        "--delay",
        "0.5",
        "--checkpoint-dir",
        str(work / "soak"),
        "--log",
        str(attempts_log),
        "--",
    ]
    t0 = time.time()
    proc = _run(sup + train_command(work, "soak", steps, save_every, free_port()), work, senv, timeout * (faults + 1))
    (work / "soak.log").write_text(proc.stdout + proc.stderr)
    soak_seconds = time.time() - t0

    attempts = [json.loads(line) for line in attempts_log.read_text().splitlines()] if attempts_log.is_file() else []
    fired = {}
    for f in sorted(marks.glob("fault*.json")):
        m = json.loads(f.read_text())
        fired[m["attempt"]] = m
    resumed_at = [int(x) for x in _resumed_steps(proc.stdout)]

    # per fault: the run it hit, what latest named afterwards, where the next run resumed
    rows, steps_lost, progress_lost = [], 0, 0
    problems: List[str] = []
    finished = bool(attempts) and attempts[-1]["rc"] == 0 and proc.returncode == 0
    expected_resumes = []
    for i, fault in enumerate(plan["faults"]):
        m = fired.get(i)
        row: Dict[str, Any] = {
            "fault": i + 1,
            "planned": f"{fault['kind']} on rank {fault['rank']}",
            "injected": m is not None,
            "survived": False,
        }
        att = next((a for a in attempts if a["attempt"] == i), None)
        nxt = next((a for a in attempts if a["attempt"] == i + 1), None)
        if m is not None:
            row.update(
                kind=m["kind"], rank=m["rank"], where=m["where"], phase=m["phase"], steps_done=m["steps_done"] or 0
            )
        if m is not None and att is not None:
            latest = att.get("latest")
            back_to = int(latest[4:]) if latest else 0
            done = row["steps_done"]
            row.update(
                rc=att["rc"], latest_after=latest, resumed_from=back_to, steps_recomputed=max(0, done - back_to)
            )  # finished before the kill, not in latest
            steps_lost += row["steps_recomputed"]
            if latest is not None:
                expected_resumes.append(back_to)
            # a kill never takes away a checkpoint that was complete before the step in progress
            last_safe = (max(0, done - 1) // save_every) * save_every
            if back_to < last_safe:
                progress_lost += last_safe - back_to
                problems.append(
                    f"fault {i + 1}: latest named step {back_to} after a kill at step {done}, "
                    f"but step {last_safe} had been saved"
                )
            # survived: the supervisor restarted the job and the restart got on to its own end
            # (the job's end, or the next planned fault)
            row["survived"] = bool(
                att["rc"] != 0 and nxt is not None and ((nxt["rc"] == 0 and finished) or (i + 1) in fired)
            )
        rows.append(row)
    survived = (
        sum(r["survived"] for r in rows)
        if finished
        else sum(r["survived"] for r in rows if r["fault"] < len(attempts) - 1)
    )
    if resumed_at != expected_resumes:
        problems.append(f"the restarts resumed at steps {resumed_at}, latest named {expected_resumes}")
        progress_lost += sum(max(0, want - got) for want, got in zip(expected_resumes, resumed_at))

    report: Dict[str, Any] = {
        "faults_requested": faults,
        "faults_injected": len(fired),
        "faults_survived": survived,
        "steps_lost": steps_lost,
        "runs": len(attempts),
        "supervisor_exit": proc.returncode,
        "finished": finished,
        "seed": seed,
        "steps": steps,
        "save_every": save_every,
        "faults": rows,
        "resumed_at_steps": resumed_at,
    }
    data_lost = progress_lost
    if not finished:
        problems.append(
            f"the supervised job did not finish (supervisor exit {proc.returncode}); see {work / 'soak.log'}"
        )

    # the records and the weights against the reference
    ref_steps, ref_evals = read_records(work / "reference")
    max_rel = 0.0
    if (work / "soak" / METRICS_FILE).is_file():
        got_steps, got_evals = read_records(work / "soak")
        ref_by = {r["step"]: r for r in ref_steps}
        seen: Dict[int, int] = {}
        for r in got_steps:
            seen[r["step"]] = seen.get(r["step"], 0) + 1
        missing = [s for s in ref_by if s not in seen]
        duplicated = [s for s, n in seen.items() if n > 1]
        extra = [s for s in seen if s not in ref_by]
        data_lost += len(missing) + sum(seen[s] - 1 for s in duplicated) + len(extra)
        if missing or duplicated or extra:
            problems.append(f"per-step records: missing {missing}, duplicated {duplicated}, unexpected {extra}")
        differing = []
        for r in got_steps:
            want = ref_by.get(r["step"])
            if want is None:
                continue
            for key in COMPARED:
                d = _rel(r.get(key), want.get(key))
                max_rel = max(max_rel, d)
                if d > tolerance:
                    differing.append((r["step"], key, r.get(key), want.get(key)))
        if differing:
            problems.append(f"{len(differing)} per-step value(s) differ from the reference, first: {differing[:3]}")
        ref_final = [e["eval_loss"] for e in ref_evals if e["step"] == steps]
        got_final = [e["eval_loss"] for e in got_evals if e["step"] == steps]
        report["eval_records_at_end"] = len(got_final)
        if not got_final or _rel(got_final[-1], ref_final[-1]) > tolerance:
            problems.append(f"final eval_loss {got_final} != reference {ref_final}")
        else:
            max_rel = max(max_rel, _rel(got_final[-1], ref_final[-1]))
    else:
        problems.append(f"no {METRICS_FILE} from the supervised job")
        data_lost += len(ref_steps)
    report["max_rel_diff_records"] = max_rel

    tag = deepspeed_tag(steps)
    if finished and (work / "soak" / tag).is_dir():
        a, b = _weights(work / "reference", tag), _weights(work / "soak", tag)
        if set(a) != set(b):
            problems.append(f"final weights: different tensors {sorted(set(a) ^ set(b))[:5]}")
            wdiff = math.inf
        else:
            wdiff = max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)
        report["max_abs_diff_weights"] = wdiff
        if wdiff > tolerance:
            problems.append(f"final weights differ from the reference by up to {wdiff:.3g}")
        start = _weights(work / "reference", deepspeed_tag(save_every)) if save_every < steps else None
        if start is not None:  # the comparison can fail: training moved the weights
            report["weights_moved"] = max(
                float((a[k].detach().float() - start[k].detach().float()).abs().max()) for k in a
            )
        cs_ref, cs_got = _client_state(work / "reference", tag), _client_state(work / "soak", tag)
        report["data_position"] = {"reference": cs_ref, "soak": cs_got}
        if cs_ref != cs_got:
            data_lost += abs(int(cs_ref.get("micro_step") or 0) - int(cs_got.get("micro_step") or 0)) or 1
            problems.append(f"data position in {tag}: {cs_got} != reference {cs_ref}")
    elif finished:
        problems.append(f"no final checkpoint {tag}")
    report["data_lost"] = data_lost
    if len(fired) != faults:
        problems.append(f"{faults - len(fired)} planned fault(s) were not injected")
    if report["faults_survived"] != len(fired):
        problems.append(f"{len(fired) - report['faults_survived']} fault(s) not survived")
    if data_lost:
        problems.append(f"data lost: {data_lost}")
    report["problems"] = problems
    report["ok"] = not problems
    report["soak_seconds"] = round(soak_seconds, 1)
    report["total_seconds"] = round(time.time() - t_start, 1)
    return report


def _resumed_steps(text: str) -> List[str]:
    import re

    return re.findall(r"resumed from \S+ at step (\d+)", text)


def render(report: Dict[str, Any]) -> str:
    lines = [
        f"fault soak: seed {report['seed']}, {report['steps']} steps, checkpoint every {report['save_every']}, "
        f"{report['runs']} run(s) under fsam-supervise"
    ]
    for r in report["faults"]:
        if r["injected"]:
            lines.append(
                f"  fault {r['fault']}: rank {r['rank']} SIGKILLed, {r['where']} [{r['phase']}], "
                f"{r['steps_done']} step(s) done; latest {r.get('latest_after')}, "
                f"{r.get('steps_recomputed', '?')} step(s) recomputed"
            )
        else:
            lines.append(f"  fault {r['fault']}: planned {r['planned']}, NOT injected")
    lines.append(
        f"faults injected {report['faults_injected']}/{report['faults_requested']}, "
        f"survived {report['faults_survived']}, steps lost (recomputed) {report['steps_lost']}, "
        f"data lost {report['data_lost']}"
    )
    if "max_abs_diff_weights" in report:
        lines.append(
            f"against the uninterrupted run: per-step records max rel diff {report['max_rel_diff_records']:.3g}, "
            f"final weights max abs diff {report['max_abs_diff_weights']:.3g} "
            f"(training moved them by up to {report.get('weights_moved', float('nan')):.3g})"
        )
    lines.append("OK" if report["ok"] else "FAILED: " + "; ".join(report["problems"]))
    lines.append(f"({report['total_seconds']} s in all, {report['soak_seconds']} s supervised)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fault_soak",
        description="SIGKILL a 2-rank ZeRO-3 PFSAM run with dropout "
        "again and again under fsam-supervise; it must end equal to an uninterrupted run.",
    )
    p.add_argument("--faults", type=int, default=4, help="SIGKILLs, one per run (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="draws the ranks, kinds and moments (default: 0)")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (default: 16)")
    p.add_argument("--save-every", type=int, default=2, help="checkpoint interval (default: 2)")
    p.add_argument("--short", action="store_true", help="the CI form: 2 faults, 10 steps (overrides both)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest relative difference of a record and "
        "absolute difference of a weight accepted (default: 0, bit-identical)",
    )
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one, removed when OK)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument(
        "--cache",
        default=None,
        help="fsam_ds's tokenizer/token cache (default: the usual one, "
        "$FSAM_DS_CACHE or ~/.cache/fsam_ds; contents are keyed by the texts, sharing is safe)",
    )
    p.add_argument("--report", default=None, help="also write the report as JSON here")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per launch (default: 300)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.short:
        args.faults, args.steps = 2, 10
    if args.faults < 0 or args.steps < 2 or args.save_every < 1 or args.save_every >= args.steps:
        print("fault_soak: error: need --faults >= 0, --steps >= 2 and 1 <= --save-every < --steps", file=sys.stderr)
        return 2
    import shutil

    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        if work.exists() and any(work.iterdir()):
            print(f"fault_soak: error: --work {str(work)!r} is not empty", file=sys.stderr)
            return 2
    else:
        tmp = work = Path(tempfile.mkdtemp(prefix="fsam-soak-"))
    from fsam_ds.data import cache_root

    cache = Path(args.cache).expanduser().resolve() if args.cache else cache_root()
    report = soak(work, args.faults, args.seed, args.steps, args.save_every, args.tolerance, args.timeout, cache)
    report["work"] = str(work)
    print(render(report), flush=True)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1, default=str))
    if tmp is not None and report["ok"] and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp is not None:
        print(f"runs kept in {work}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if os.environ.get(ROLE_ENV) == "worker":
        sys.path.insert(0, str(ROOT))
        sys.exit(_worker())
    sys.exit(main())
