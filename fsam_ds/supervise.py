"""``fsam-supervise``: rerun a training command that died, resuming from its last checkpoint.

::

    fsam-supervise --max-restarts 3 --checkpoint-dir runs/pfsam-118m -- \\
        deepspeed --num_gpus 8 --module fsam_ds.train --deepspeed_config ds.json \\
        --model 118m --steps 20000 --save-every 500 --save-dir runs/pfsam-118m

The command after ``--`` runs as a child in its own process group. When it ends:

* exit status 0: done, ``fsam-supervise`` exits 0;
* exit status 2: the one-line refusal of ``fsam-train`` (bad input, a checkpoint it will not
  load); rerunning cannot help, ``fsam-supervise`` stops and exits 2;
* anything else (a rank lost to SIGKILL, the OOM killer, a NCCL/gloo error, a node gone): the
  child's process group is cleared of stragglers and the command is started again with
  ``--resume`` (``--resume-arg``) appended, up to ``--max-restarts`` times; after that the last
  status is passed on (a child killed by signal N gives 128 + N).

``--resume`` goes where the command has the placeholder argument ``{resume}`` if it has one
(the placeholder is dropped from a run that does not resume), else at the end. With
``--checkpoint-dir DIR`` the decision is made from the folder instead: every run, the first
included, resumes when ``DIR/latest`` exists and starts afresh when it does not (a job
killed before its first checkpoint restarts from step 0 rather than being refused; a requeued
SLURM job picks its run up again: see docs/reliability.md).

SIGTERM, SIGINT and SIGHUP sent to ``fsam-supervise`` are passed to the child's process group
and end supervision (exit 128 + signal, no restart): a scheduler that stops the job is obeyed.

Each run gets ``FSAM_SUPERVISE_ATTEMPT`` (0 for the first run, 1 for the first restart, ...) in
its environment. ``--log FILE`` appends one JSON line per run: ``{"attempt", "command",
"resume", "rc", "seconds", "latest"}`` (``latest``: what ``DIR/latest`` names after the run,
with ``--checkpoint-dir``).

Not covered: the ``deepspeed`` runner exits 0 when its own ``launch.py`` child is killed by a
signal (DeepSpeed's runner passes on only positive statuses); a lost rank is reported
correctly (status 247 for SIGKILL), but a killed launcher looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from .names import LATEST

PROG = "fsam-supervise"
PLACEHOLDER = "{resume}"
REFUSED = 2  # fsam-train's one-line refusal (bad input): never rerun
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Rerun a training command that died, with --resume appended, until it exits 0, "
        "refuses its input (exit 2) or has been restarted --max-restarts times.",
        usage=f"{PROG} [options] -- COMMAND [ARG ...]",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="restarts after the first run (default: 3; 0: run once)",
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        metavar="DIR",
        help="resume (every run, the first included) exactly when DIR/latest exists; without it the "
        "first run is as given and every restart resumes",
    )
    p.add_argument(
        "--resume-arg",
        default="--resume",
        metavar="ARG",
        help="what makes the command resume (default: --resume); it replaces the placeholder "
        f"{PLACEHOLDER} or is appended",
    )
    p.add_argument(
        "--delay",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait before a restart (default: 5; ports and files of the dead run are released)",
    )
    p.add_argument("--log", default=None, metavar="FILE", help="append one JSON line per run to FILE")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    return p


def command_for(command: Sequence[str], resume: bool, resume_arg: str = "--resume") -> List[str]:
    """``command`` with ``resume_arg`` in place of :data:`PLACEHOLDER` (or appended) when
    ``resume``, and with the placeholder dropped otherwise."""
    cmd = list(command)
    if PLACEHOLDER in cmd:
        return [resume_arg if a == PLACEHOLDER else a for a in cmd] if resume else [a for a in cmd if a != PLACEHOLDER]
    return cmd + [resume_arg] if resume else cmd


def _status(returncode: int) -> int:
    """An exit status for this process: a child killed by signal N gives 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _kill_group(pgid: int) -> None:
    """SIGKILL whatever is left of the child's process group (ranks the launcher did not take down)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _latest(checkpoint_dir: Optional[Path]) -> Optional[str]:
    if checkpoint_dir is None:
        return None
    try:
        return (checkpoint_dir / LATEST).read_text().strip() or None
    except OSError:
        return None


def supervise(
    command: Sequence[str],
    max_restarts: int = 3,
    checkpoint_dir: Optional[os.PathLike] = None,
    resume_arg: str = "--resume",
    delay: float = 5.0,
    log: Optional[os.PathLike] = None,
    env: Optional[Dict[str, str]] = None,
    say: Optional[Callable[[str], None]] = None,
) -> int:
    """Run ``command`` under the rules of the module docstring; returns the exit status."""
    if say is None:

        def say(text):
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    base_env = dict(os.environ if env is None else env)
    stop = {"signal": None}
    child: Dict[str, Optional[subprocess.Popen]] = {"proc": None}

    def forward(signum, frame):
        stop["signal"] = signum
        proc = child["proc"]
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        attempt = 0
        while True:
            resume = (_latest(ckpt) is not None) if ckpt is not None else attempt > 0
            cmd = command_for(command, resume, resume_arg)
            run_env = dict(base_env, FSAM_SUPERVISE_ATTEMPT=str(attempt))
            say(
                f"run {attempt + 1} of at most {max_restarts + 1}"
                + (" (resuming)" if resume else "")
                + ": "
                + " ".join(cmd)
            )
            t0 = time.time()
            try:
                proc = subprocess.Popen(cmd, env=run_env, start_new_session=True)
            except OSError as err:
                say(f"cannot start {cmd[0]!r}: {err}")
                return 127
            child["proc"] = proc
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # SIGINT before the handler was installed; keep waiting
                    continue
            child["proc"] = None
            _kill_group(proc.pid)
            seconds = time.time() - t0
            if log is not None:
                with open(log, "a") as f:
                    f.write(
                        json.dumps(
                            {
                                "attempt": attempt,
                                "command": cmd,
                                "resume": resume,
                                "rc": rc,
                                "seconds": round(seconds, 3),
                                "latest": _latest(ckpt),
                            }
                        )
                        + "\n"
                    )
            if stop["signal"] is not None:
                say(f"stopped by signal {signal.Signals(stop['signal']).name}; not restarting")
                return 128 + int(stop["signal"])
            if rc == 0:
                if attempt:
                    say(f"finished after {attempt} restart(s)")
                return 0
            if rc == REFUSED:
                say("the command refused its input (exit 2); not restarting")
                return REFUSED
            how = (
                f"killed by {signal.Signals(-rc).name}"
                if rc < 0 and -rc in signal.Signals._value2member_map_
                else f"exit status {rc}"
            )
            if attempt >= max_restarts:
                say(f"run {attempt + 1} ended ({how}); no restarts left (--max-restarts {max_restarts})")
                return _status(rc)
            where = _latest(ckpt)
            say(
                f"run {attempt + 1} ended ({how}) after {seconds:.1f} s; restarting"
                + (f" from {where}" if where else "")
                + (f" in {delay:g} s" if delay > 0 else "")
            )
            if delay > 0:
                deadline = time.time() + delay
                while time.time() < deadline and stop["signal"] is None:
                    time.sleep(min(0.2, max(0.0, deadline - time.time())))
                if stop["signal"] is not None:
                    say(f"stopped by signal {signal.Signals(stop['signal']).name}; not restarting")
                    return 128 + int(stop["signal"])
            attempt += 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(f"{PROG}: error: no command given (usage: {PROG} [options] -- COMMAND [ARG ...])", file=sys.stderr)
        return 2
    if args.max_restarts < 0:
        print(f"{PROG}: error: --max-restarts: expected an integer >= 0, got {args.max_restarts}", file=sys.stderr)
        return 2
    if args.delay < 0:
        print(f"{PROG}: error: --delay: expected seconds >= 0, got {args.delay}", file=sys.stderr)
        return 2
    return supervise(
        command,
        max_restarts=args.max_restarts,
        checkpoint_dir=args.checkpoint_dir,
        resume_arg=args.resume_arg,
        delay=args.delay,
        log=args.log,
    )


if __name__ == "__main__":
    sys.exit(main())
