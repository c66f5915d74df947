"""The small-scale reproduction: one command, resumable, safe to leave running in the background.

    nohup nice -n 19 python -m tools.reproduce > runs/reproduce/log.txt 2>&1 &   # from the checkout's root

On a text corpus (``--dataset``, default WikiText-2; split into training and held-out text by
article) with the ``2m`` preset, every run the same number of steps and tokens, single process,
fp32, ZeRO stage 0:

1. **Selection, on the selection seeds only** (``--select-seeds``, default 1234): AdamW at each
   ``--lrs`` value, the sweep doubled (or halved) past its edge while the best learning rate is the
   largest (smallest) tried, at most ``--lr-extend`` times; the learning rate with the lowest final
   eval loss (mean over the selection seeds) is shared by every method from then on. Then SAM,
   PreconditionedSAM, FunctionalSAM and PreconditionedFunctionalSAM at each ``--rhos`` value; each
   one's rho is the one with the lowest mean eval loss over the selection seeds.
2. **Fresh seeds, for every verdict** (``--fresh-seeds``, default 1235-1238, never a selection
   seed): AdamW and each SAM type at its selected rho, with the sharpness diagnostics logged every
   ``--sharpness-every`` steps; for "tolerates larger rho" also each SAM type of the pairs
   FunctionalSAM/SAM and PreconditionedFunctionalSAM/PreconditionedSAM at every swept rho above its
   selected one (``--no-tolerance``: skip). The same seed gives every method the same initialisation
   and data order, so the runs are compared paired by seed.
3. For those fresh runs: lambda_max of the Hessian and of the Gauss-Newton matrix (Lanczos) on a
   fixed training batch and calibration on the held-out batches (``fsam_ds.sharpness_report``).
4. Optional: ``--extra-runs ascent_every,momentum`` (either or both: the sub-2x modes of
   ``--every-methods`` on the fresh seeds, ``ascent_every: k`` and ``ascent_direction: "momentum"``)
   and ``--horizon K`` (AdamW and PreconditionedFunctionalSAM for K x ``--steps`` on the fresh seeds, or
   on ``--horizon-seeds``).
5. ``<plots dir>/<docs stem>.json`` (every run's numbers: commit it), plots (``fsam_ds.plot``)
   and ``--docs`` rendered from that JSON with the verdicts of :mod:`tools.verdicts`;
   ``--render JSON`` rewrites ``--docs`` from a committed JSON alone, without the runs.

Every run is an ``fsam-train`` process with its own folder under ``--out`` (``ds_config.json``,
``metrics.jsonl``, ``train.log``, its checkpoint) and a ``done.json`` marker written when it ended
well; a second invocation skips every run with a marker, redoes any without, and rewrites the
report. The runner's own log is its standard output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from fsam_ds import names
from fsam_ds.runkit import fail
from fsam_ds.train import train_argv
from tools import verdicts

PROG = "fsam-reproduce"
REPO = Path(__file__).resolve().parents[1]
SAM_TYPES = names.SAM_METHODS
METHODS = names.METHODS
SHORT = names.ABBREVIATIONS
BASE_SEED = 1234
SCHEMA = "fsam-reproduce/2"


def log(*parts) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}]", *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def ds_config(
    method: str,
    lr: float,
    rho: float,
    steps: int,
    micro: int,
    sharpness_every: int,
    extra_params: Optional[Dict[str, Any]] = None,
) -> dict:
    params: Dict[str, Any] = {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if method != "AdamW":
        params.update(rho=rho, precondition_norm="perturbation", rho_warmup_steps=0)
    if extra_params:
        params.update(extra_params)
    if sharpness_every:
        params["sharpness_every"] = sharpness_every
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0},
        "optimizer": {"type": method, "params": params},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": max(1, steps // 20),
                "total_num_steps": steps,
                "warmup_type": "linear",
            },
        },
        "wall_clock_breakdown": False,
    }


def run_name(method: str, lr: float, rho: float, seed: int) -> str:
    name = f"{SHORT[method]}-lr{lr:g}"
    if method != "AdamW":
        name += f"-rho{rho:g}"
    return f"{name}-s{seed}"


def read_metrics(folder: Path) -> List[dict]:
    path = folder / names.METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def run_summary(folder: Path) -> Dict[str, Any]:
    recs = read_metrics(folder)
    steps = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    times = [r["step_time"] for r in steps if r.get("step_time")]
    return {
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "final_train_loss": steps[-1]["loss"] if steps else None,
        "median_step_time": statistics.median(times) if times else None,
        "steps": steps[-1]["step"] if steps else 0,
    }


def train_run(
    a,
    method: str,
    lr: float,
    rho: float,
    seed: int,
    sharpness_every: int = 0,
    extra_params: Optional[Dict[str, Any]] = None,
    suffix: str = "",
    status: bool = True,
    steps: Optional[int] = None,
) -> Dict[str, Any]:
    """One fsam-train run, skipped when its done marker exists. Returns the run's record.
    ``extra_params`` go into ``optimizer.params``; ``suffix`` goes into the run's name before the seed;
    ``steps`` (default ``--steps``) sets the run's horizon (and its schedule's)."""
    steps = a.steps if steps is None else steps
    name = run_name(method, lr, rho, seed)
    if suffix:
        name = name[: -len(f"-s{seed}")] + f"{suffix}-s{seed}"
    folder = a.out / "runs" / name
    marker = folder / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    if status:
        write_status(a, name)
    if folder.exists():  # an unfinished earlier attempt: start it again
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = ds_config(method, lr, rho, steps, a.micro_batch, sharpness_every, extra_params)
    (folder / "ds_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "fsam_ds.train",
        *train_argv(
            folder / "ds_config.json",
            folder,
            steps,
            model=a.preset,
            dataset=a.data,
            seq_len=a.seq_len,
            eval_every=a.eval_every,
            eval_batches=a.eval_batches,
            seed=seed,
            log_every=max(1, steps // 10),
        ),
    ]
    log(f"run {name}: {' '.join(shlex.quote(c) for c in cmd)}")
    t0 = time.time()
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    # DeepSpeed's compiled CPU ops: one folder per environment, shared by every run (as the tests do)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    with (folder / "train.log").open("w") as out:
        if a.in_process:  # the same entry point, without a new interpreter (smoke mode)
            import contextlib

            from fsam_ds.train import main as train_main

            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                rc = train_main(cmd[3:])
        else:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    wall = time.time() - t0
    if rc != 0:
        tail = (folder / "train.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"run {name} failed with exit status {rc}: {' | '.join(tail)}")
    record = {
        "name": name,
        "method": method,
        "lr": lr,
        "rho": rho if method != "AdamW" else 0.0,
        "seed": seed,
        "sharpness_every": sharpness_every,
        "wall_s": wall,
        **(extra_params or {}),
        **run_summary(folder),
    }
    marker.write_text(json.dumps(record, indent=2) + "\n")
    log(f"run {name}: done in {wall:.0f} s, eval loss {record['final_eval_loss']:.4f}")
    return record


def write_status(a, running: str) -> None:
    """While the grid runs, ``--docs`` says how far it is (rewritten with the results at the end)."""
    s0 = a.select_seeds[0]
    n_lrs = max(len(a.lrs), len(list((a.out / "runs").glob(f"adamw-lr*-s{s0}"))))  # with any extension
    n_sam = len(a.methods) - 1
    total = len(a.select_seeds) * (n_lrs + n_sam * len(a.rhos)) + len(a.methods) * len(a.fresh_seeds)
    done = sorted(p.parent.name for p in (a.out / "runs").glob("*/done.json"))
    lines = [
        "# Results: a small-scale reproduction",
        "",
        f"The grid of `tools/reproduce.py` is running: {len(done)} training runs finished (the selection "
        f"and fresh-seed grid has at least {total}, more with the rho-tolerance runs), now `{running}` "
        f"(status of {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}). This page is rewritten with the "
        "tables, the verdicts and the plots when the grid ends; the command below resumes it, skipping "
        "finished runs.",
        "",
        "Finished runs: " + (", ".join(f"`{d}`" for d in done) or "none") + ".",
        "",
        "```bash",
        a.command,
        "```",
        "",
    ]
    a.docs.parent.mkdir(parents=True, exist_ok=True)
    a.docs.write_text("\n".join(lines))


def final_analysis(a, record: Dict[str, Any]) -> Dict[str, Any]:
    """lambda_max (Hessian, Gauss-Newton) and calibration of a finished run (cached)."""
    folder = a.out / "runs" / record["name"]
    cache = folder / "final_sharpness.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from fsam_ds.sharpness_report import analyse

    log(f"final diagnostics of {record['name']}")
    t0 = time.time()
    out = analyse(
        folder,
        batch_rows=a.lambda_rows,
        micro_batch=a.micro_batch,
        eval_batches=a.eval_batches,
        iters=a.lambda_iters,
        tol=1e-3,
    )
    out["time_s"] = time.time() - t0
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _mean_loss(records: List[dict]) -> float:
    xs = [r["final_eval_loss"] for r in records if r["final_eval_loss"] is not None]
    return statistics.fmean(xs) if xs else float("inf")


def _best_by_mean(groups: Dict[float, List[dict]]) -> float:
    """The key (lr or rho) whose runs on the selection seeds have the lowest mean eval loss."""
    return min(groups, key=lambda k: (_mean_loss(groups[k]), k))


def run_grid(a) -> Dict[str, Any]:
    t_start = time.time()
    log(
        f"grid: preset {a.preset}, {a.steps} steps x {a.micro_batch} x {a.seq_len} tokens, lrs {a.lrs}, "
        f"rhos {a.rhos}, methods {', '.join(a.methods)}, selection seeds {a.select_seeds}, "
        f"fresh seeds {a.fresh_seeds}"
    )
    sel = a.select_seeds
    lr_groups = {lr: [train_run(a, "AdamW", lr, 0.0, s) for s in sel] for lr in a.lrs}
    for _ in range(a.lr_extend):  # a best learning rate at the sweep's edge is not a tuned one
        lr, tried = _best_by_mean(lr_groups), sorted(lr_groups)
        if lr not in (tried[0], tried[-1]) or len(tried) < 2:
            break
        nxt = lr * 2 if lr == tried[-1] else lr / 2
        log(f"best learning rate {lr:g} is at the edge of the sweep: adding {nxt:g}")
        lr_groups[nxt] = [train_run(a, "AdamW", nxt, 0.0, s) for s in sel]
    lr = _best_by_mean(lr_groups)
    log(
        f"learning rate: {lr:g} (AdamW mean eval losses on the selection seeds "
        f"{ {k: round(_mean_loss(v), 4) for k, v in sorted(lr_groups.items())} })"
    )
    sweep = {m: {rho: [train_run(a, m, lr, rho, s) for s in sel] for rho in a.rhos} for m in a.methods if m != "AdamW"}
    best_rho = {m: _best_by_mean(g) for m, g in sweep.items()}
    best_rho["AdamW"] = 0.0
    log(f"best rho (selection seeds): {best_rho}")
    # the fresh seeds: every verdict comes from these runs only
    report_seeds = a.fresh_seeds or sel
    fresh = {m: [train_run(a, m, lr, best_rho[m], s, a.sharpness_every) for s in a.fresh_seeds] for m in a.methods}
    tol: List[dict] = []
    if a.tolerance and a.fresh_seeds:
        tol_methods = sorted({x for pair in verdicts.TOLERANCE_PAIRS if set(pair) <= set(a.methods) for x in pair})
        for m in tol_methods:
            for rho in a.tolerance_rhos or a.rhos:
                if rho > best_rho[m] + 1e-12:
                    tol += [train_run(a, m, lr, rho, s) for s in a.fresh_seeds]
    report = {
        m: (fresh[m] if a.fresh_seeds else [r for r in (lr_groups[lr] if m == "AdamW" else sweep[m][best_rho[m]])])
        for m in a.methods
    }
    for m in a.methods:
        for r in report[m]:
            r["final"] = final_analysis(a, r)
    lr_runs = [r for k in sorted(lr_groups) for r in lr_groups[k]]
    sweep_runs = {m: [r for rho in a.rhos for r in g[rho]] for m, g in sweep.items()}
    everything = lr_runs + [r for v in sweep_runs.values() for r in v] + [r for v in fresh.values() for r in v] + tol
    return {
        "lr": lr,
        "lr_runs": lr_runs,
        "sweep": sweep_runs,
        "best_rho": best_rho,
        "fresh": fresh,
        "report": report,
        "report_seeds": report_seeds,
        "tolerance": tol,
        "grid_time_s": sum(r.get("wall_s", 0.0) for r in {r["name"]: r for r in everything}.values()),
        "this_invocation_s": time.time() - t_start,
    }


EXTRA_METHOD = "PreconditionedFunctionalSAM"  # the exact method whose gain the sub-2x variants are measured against


def run_ascent_every(a, res: Dict[str, Any]) -> List[dict]:
    """Each of ``--every-methods`` with ``ascent_every`` k (``--every``) at the grid's learning rate
    and that method's selected rho, on the fresh seeds (the selection seeds when there are none)."""
    return [
        train_run(
            a, m, res["lr"], res["best_rho"][m], s, extra_params={"ascent_every": k}, suffix=f"-every{k}", status=False
        )
        for m in a.every_methods
        for k in a.every
        for s in res["report_seeds"]
    ]


MOMENTUM_SUFFIX = "-momentum"  # run-name suffix of the ascent_direction "momentum" runs
EXTRAS = ("ascent_every", "momentum")  # the accepted values of --extra-runs


def run_momentum(a, res: Dict[str, Any]) -> List[dict]:
    """Each of ``--every-methods`` with ``ascent_direction: "momentum"`` (eps from AdamW's first
    moment, no pass-1 backward) at the grid's learning rate and that method's selected rho, on the
    fresh seeds (the selection seeds when there are none)."""
    return [
        train_run(
            a,
            m,
            res["lr"],
            res["best_rho"][m],
            s,
            extra_params={"ascent_direction": verdicts.MOMENTUM},
            suffix=MOMENTUM_SUFFIX,
            status=False,
        )
        for m in a.every_methods
        for s in res["report_seeds"]
    ]


def compute_model(method: str, every: int = 1, direction: str = verdicts.GRADIENT) -> Dict[str, Any]:
    """The compute model of one step over AdamW's, in forward-pass units F with a backward = 2F
    (one forward+backward = 3F, AdamW's whole step), from what :class:`fsam_ds.step.SAMStep` runs:
    an exact step is pass 1 (F+B) and pass 2 (F+B); a step that does not take its direction from this
    step's gradient (``ascent_every``'s reusing steps, ``ascent_direction: "momentum"``) runs no pass 1
    for SAM types and a forward at theta for FunctionalSAM types' g_F (F), then pass 2 (F+B). Elementwise
    work over the parameters (the ascent, its norms, theta + eps and the restore) and g_F from the
    detached logits are not counted. Returns ``ratio`` and ``formula``."""
    if method == "AdamW":
        return {"ratio": 1.0, "formula": "F+B = 3F: 1"}
    functional = method.endswith("FunctionalSAM")
    cheap = 4.0 if functional else 3.0  # a step without pass-1 backward, in F
    cheap_s = "F + (F+B) = 4F" if functional else "(F+B) = 3F"
    if direction == verdicts.MOMENTUM:
        return {
            "ratio": cheap / 3.0,
            "formula": f"{cheap_s} (the first step, before AdamW's first update, is exact) over 3F: {cheap / 3.0:.2f}",
        }
    if every > 1:
        ratio = (6.0 + cheap * (every - 1)) / (3.0 * every)
        form = "(4 + 2/k)/3" if functional else "1 + 1/k"
        return {
            "ratio": ratio,
            "formula": f"one exact step (6F) and k - 1 = {every - 1} steps of {cheap_s} per k = "
            f"{every}, over 3F: {form} = {ratio:.2f}",
        }
    return {"ratio": 2.0, "formula": "(F+B) + (F+B) = 6F over 3F: 2"}


HORIZON_METHODS = ("AdamW", "PreconditionedFunctionalSAM")


def run_horizon(a, res: Dict[str, Any]) -> List[dict]:
    """AdamW and PreconditionedFunctionalSAM for ``--horizon`` x ``--steps`` steps, the grid's lr and
    selected rho (chosen at the short horizon), on the horizon seeds (default: the fresh seeds). A
    horizon seed that is not a fresh seed also gets both methods at the grid's steps, so that the
    change of the gap with the horizon is paired on every horizon seed (those runs enter no other
    verdict: every other section reads the fresh seeds only)."""
    steps = a.steps * a.horizon
    out = []
    for s in a.horizon_seeds:  # seed by seed: a stopped runner leaves whole seeds behind
        for m in HORIZON_METHODS:
            out.append(
                train_run(a, m, res["lr"], res["best_rho"][m], s, suffix=f"-x{a.horizon}", status=False, steps=steps)
            )
        if s not in a.fresh_seeds:
            out += [train_run(a, m, res["lr"], res["best_rho"][m], s, status=False) for m in HORIZON_METHODS]
    return out


def run_step_cost(folder: Path) -> Optional[float]:
    """A run's cost per step: its steps are grouped into exact and direction-reusing (or momentum)
    ones (``ascent_reused``, ``ascent_momentum``, or a missing pass-1 gradient norm), and the cost is
    the count-weighted sum of each group's median step time: the exact steps of a k-cycle count (a
    median over all steps would hide them) while the median stays robust to other work slowing some
    steps down."""
    groups: Dict[bool, List[float]] = {}
    for m in read_metrics(folder):
        if m.get("step_time"):
            reused = m.get("ascent_reused", m.get("ascent_momentum", "grad_norm" in m and m["grad_norm"] is None))
            groups.setdefault(bool(reused), []).append(m["step_time"])
    n = sum(len(g) for g in groups.values())
    return sum(len(g) / n * statistics.median(g) for g in groups.values()) if n else None


EPS_EARLY = 0.05  # the first 5% of the steps: where rows first seen late still have v ~ 0
EPS_PARTS = ("embed", "output")


def eps_shares(folder: Path) -> Dict[str, Optional[float]]:
    """The share of ``||eps||^2`` on the input-embedding rows and on the output layer, from the run's
    metrics.jsonl (every step that logged it): mean over steps 1 .. ceil(:data:`EPS_EARLY` x the run's
    last step) (None when none of them logged it: skipped steps, a log that starts after a resume) and
    over the whole run. Empty for AdamW (no perturbation)."""
    steps = [m for m in read_metrics(folder) if "step" in m and "loss" in m]
    recs = [m for m in steps if m.get("eps_share_embed") is not None and m.get("eps_share_output") is not None]
    if not recs:
        return {}
    window = max(1, math.ceil(EPS_EARLY * max(m["step"] for m in steps)))
    early = [r for r in recs if r["step"] <= window]
    out: Dict[str, Optional[float]] = {}
    for part in EPS_PARTS:
        key = f"eps_share_{part}"
        out[f"{key}_early"] = statistics.fmean(float(r[key]) for r in early) if early else None
        out[f"{key}_mean"] = statistics.fmean(float(r[key]) for r in recs)
    return out


def param_shares(preset: str) -> Dict[str, float]:
    """The share of the parameters in the input embedding and in the output layer (untied), at the
    preset's vocabulary (the tokenizer fsam-train trains has that size): what a perturbation spread
    evenly over the parameters would put there."""
    from fsam_ds.models import llama_config, preset_num_parameters

    c = llama_config(preset)
    rows = c.vocab_size * c.hidden_size / preset_num_parameters(preset)
    return {"embed": rows, "output": 0.0 if c.tie_word_embeddings else rows}


# ---------------------------------------------------------------------------------------------
# The JSON the report is rendered from
# ---------------------------------------------------------------------------------------------


def _row(a, r: Dict[str, Any]) -> Dict[str, Any]:
    """One run's numbers for the JSON (everything a verdict or a table needs)."""
    row = {
        "name": r["name"],
        "method": r["method"],
        "lr": r["lr"],
        "rho": r["rho"],
        "seed": r["seed"],
        "ascent_every": int(r.get("ascent_every", 1) or 1),
        "ascent_direction": verdicts.direction_of(r),
        "steps": r.get("steps"),
        "eval_loss": r.get("final_eval_loss"),
        "train_loss": r.get("final_train_loss"),
        "median_step_time": r.get("median_step_time"),
        "step_cost": run_step_cost(a.out / "runs" / r["name"]),
        "wall_s": r.get("wall_s"),
        "sharpness_every": r.get("sharpness_every", 0),
        **eps_shares(a.out / "runs" / r["name"]),
    }
    f = r.get("final")
    if f:
        h, g = f["lambda_max_hessian"], f["lambda_max_gauss_newton"]
        row.update(
            lambda_h=h["value"],
            lambda_h_res=h["residual"],
            lambda_gn=g["value"],
            lambda_gn_res=g["residual"],
            lambda_iters=h["iterations"],
            ece=f["calibration"]["ece"],
            mean_max_prob=f["calibration"]["mean_max_prob"],
            entropy=f["calibration"]["mean_entropy"],
            logit_fraction=f["terms"]["logit_fraction"],
        )
    return row


def collect(
    a,
    res: Dict[str, Any],
    every_runs: List[dict],
    horizon_runs: List[dict],
    plots: Dict[str, str],
    momentum_runs: Optional[List[dict]] = None,
) -> dict:
    runs: Dict[str, dict] = {}
    momentum_runs = momentum_runs or []
    groups = [
        res["lr_runs"],
        [r for v in res["sweep"].values() for r in v],
        [r for v in res["report"].values() for r in v],
        res["tolerance"],
        every_runs,
        momentum_runs,
        horizon_runs,
    ]
    for g in groups:
        for r in g:
            row = _row(a, r)
            if r["name"] in runs and "lambda_h" in runs[r["name"]] and "lambda_h" not in row:
                continue
            runs[r["name"]] = row
    data_files = [f.name for f in sorted(a.data.glob("*.txt"))] if a.data.is_dir() else []
    return {
        "schema": SCHEMA,
        "written": datetime.date.today().isoformat(),
        "command": a.command,
        "settings": {
            "dataset": a.data_label,
            "dataset_name": a.data_name,
            "data_files": data_files,
            "preset": a.preset,
            "steps": a.steps,
            "micro_batch": a.micro_batch,
            "seq_len": a.seq_len,
            "lrs": sorted({r["lr"] for r in res["lr_runs"]}),
            "rhos": a.rhos,
            "methods": a.methods,
            "select_seeds": a.select_seeds,
            "fresh_seeds": a.fresh_seeds,
            "eval_batches": a.eval_batches,
            "lambda_rows": a.lambda_rows,
            "lambda_iters": a.lambda_iters,
            "sharpness_every": a.sharpness_every,
            "every": a.every if every_runs else [],
            "every_methods": a.every_methods if every_runs else [],
            "momentum_methods": a.every_methods if momentum_runs else [],
            "horizon": a.horizon if horizon_runs else 1,
            "horizon_seeds": a.horizon_seeds if horizon_runs else [],
            "level": verdicts.LEVEL,
            "machine": _machine(),
            "grid_time_s": res["grid_time_s"],
            "param_shares": param_shares(a.preset),
        },
        "lr": res["lr"],
        "best_rho": res["best_rho"],
        "plots": plots,
        "runs": sorted(
            runs.values(),
            key=lambda r: (
                METHODS.index(r["method"]),
                r["ascent_every"],
                r["ascent_direction"] != verdicts.GRADIENT,
                r["steps"] or 0,
                r["rho"],
                r["lr"],
                r["seed"],
            ),
        ),
    }


# ---------------------------------------------------------------------------------------------
# The report, rendered from the JSON alone
# ---------------------------------------------------------------------------------------------


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "not measured" if x is None else format(x, spec)


def _machine() -> str:
    import torch

    from fsam_ds.bench import cpu_cores_and_model

    cores, cpu = cpu_cores_and_model(platform.processor() or platform.machine())

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cores} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {gpu}"
    )


def _mean_iv(vals: Dict[int, float], spec: str = ".4f") -> str:
    iv = verdicts.interval(list(vals.values()))
    if iv["n"] == 0:
        return "not measured"
    if iv["lo"] is None:
        return f"{format(iv['mean'], spec)} (n=1, no interval)"
    return f"{format(iv['mean'], spec)} [{format(iv['lo'], spec)}, {format(iv['hi'], spec)}] (n={iv['n']})"


def _adamw_losses(rows: List[dict], lr: float) -> Dict[int, float]:
    """{seed: eval loss} of the AdamW rows at learning rate ``lr``."""
    return {
        r["seed"]: r["eval_loss"]
        for r in rows
        if r["method"] == "AdamW" and r["lr"] == lr and r["eval_loss"] is not None
    }


def _mean(vals: Dict[int, float]) -> Optional[float]:
    return statistics.fmean(vals.values()) if vals else None


def edge_note(best: Dict[str, float], rhos: List[float], methods: List[str]) -> str:
    """A selected rho at either end of the sweep is the best of the values tried, not a tuned one."""
    if len(rhos) < 2:
        return ""
    lo, hi = min(rhos), max(rhos)
    at = [
        f"{m} ({'lowest' if abs(best[m] - lo) < 1e-12 else 'highest'})"
        for m in methods
        if m in best and m != "AdamW" and (abs(best[m] - lo) < 1e-12 or abs(best[m] - hi) < 1e-12)
    ]
    if not at:
        return ""
    return (
        " At the edge of the sweep: " + ", ".join(at) + "; a rho beyond it was not tried, so that method's "
        "selected rho is the best of the values swept, not necessarily its best."
    )


def claim_lines(data: dict) -> List[str]:
    s = data["settings"]
    cl = verdicts.claims(data["runs"], data["best_rho"], s["fresh_seeds"], steps=s["steps"])
    if not s["fresh_seeds"]:
        return [
            "No fresh seeds were run (`--fresh-seeds none`): every claim is **inconclusive** (the selection "
            "seeds choose rho and the learning rate and carry no verdict).",
            "",
        ]
    lines = ["| claim | compared | statistic: mean [95% t interval] (pairs) | verdict |", "| --- | --- | --- | --- |"]
    for c in cl:
        stats = "; ".join(f"{p['label']}: {verdicts.fmt_interval(p)}" for p in c["parts"]) or c["note"]
        verdict = c["verdict"] + (f" ({c['note']})" if c["note"] and c["parts"] else "")
        lines.append(f"| {c['claim']} | {c['pairs']} | {stats} | **{verdict}** |")
    return lines + [
        "",
        f"Rule (`tools/verdicts.py`): {verdicts.RULE}. lambda_max: the interval is widened on both "
        "sides by the largest sum of the two runs' Lanczos residuals `||Av - lambda v||`, and the claim "
        "also fails where the eval loss is significantly worse. Tolerance: per seed, the mean over "
        "the swept rho above both selected rhos of the difference of the two methods' degradations "
        "from their own selected rho (one interval; the per-rho rows are information). A "
        '"beats X and Y" claim is reproduced only if both parts are, contradicted if either is.',
        "",
    ]


def render(data: dict, docs: Path, json_path: Optional[Path] = None) -> str:
    s, runs, best = data["settings"], data["runs"], data["best_rho"]
    methods, fresh, sel = s["methods"], s["fresh_seeds"], s["select_seeds"]
    report_seeds = fresh or sel
    # the exact methods only: no ascent_every or momentum run enters a table of methods or a verdict
    rep = [r for r in runs if r["seed"] in report_seeds and verdicts.is_exact(r) and r["steps"] in (None, s["steps"])]
    selr = [r for r in runs if r["seed"] in sel and verdicts.is_exact(r) and r["steps"] in (None, s["steps"])]
    tokens = s["steps"] * s["micro_batch"] * s["seq_len"]
    jrel = os.path.relpath(json_path, docs.parent) if json_path else None
    lines = [
        "# Results: a small-scale reproduction",
        "",
        f"Rendered by `tools/reproduce.py` on {data['written']} from "
        + (f"[`{jrel}`]({jrel})" if jrel else "its JSON")
        + " (every run's numbers; nothing is typed by hand). Every verdict is computed by the rules of "
        "`tools/verdicts.py` on the **fresh seeds** only; the selection seeds choose the learning rate "
        "and rho and carry no verdict.",
        "",
        "## Setup",
        "",
        f"- Data: `{s['dataset']}`"
        + (" (" + ", ".join(f"`{f}`" for f in s["data_files"]) + ")" if s["data_files"] else "")
        + ", split by document (WikiText articles, paragraphs of other text) into training text and a held-out "
        "eval split (5% of the documents); a byte-level BPE tokenizer trained on the training split.",
        f"- Model: the `{s['preset']}` preset (Llama-style decoder); every grid run {s['steps']} optimizer steps "
        f"of {s['micro_batch']} x {s['seq_len']} tokens ({tokens:,} tokens), one process, fp32, ZeRO stage 0, "
        "AdamW (betas 0.9/0.95, weight decay 0.1, clipping 1.0), linear warm-up over "
        f"{max(1, s['steps'] // 20)} steps then linear decay to 0.",
        f"- Seeds: selection seeds {', '.join(map(str, sel))} (learning rate and rho chosen on their mean eval "
        f"loss); fresh seeds {', '.join(map(str, fresh)) or 'none'} ({len(fresh)} per configuration) for every "
        "table and verdict below. A seed sets the initialisation and the data order, the same for every "
        "method, so methods are compared paired by seed.",
        "- Learning rate (AdamW, selection seeds, mean eval loss): "
        + ", ".join(f"{lr:g}: {_fmt(_mean(_adamw_losses(selr, lr)))}" for lr in s["lrs"])
        + f"; **{data['lr']:g}** is used by every method.",
        f"- rho swept over {', '.join(f'{x:g}' for x in s['rhos'])} for each SAM type on the selection seeds (the "
        "preconditioned types use the `perturbation` normalisation, so `||eps|| = rho` for all); selected: "
        + ", ".join(f"{m} {best[m]:g}" for m in methods if m != "AdamW")
        + "."
        + edge_note(best, s["rhos"], methods),
        f"- Eval loss: mean next-token cross-entropy on {s['eval_batches']} held-out batches at the end. "
        f"lambda_max: Lanczos on the first {s['lambda_rows']} training blocks, at most {s['lambda_iters']} "
        "products. ECE: 15 equal-width confidence bins over every held-out token of those batches.",
        f"- Machine: {s['machine']}. The runs took {s['grid_time_s'] / 3600:.2f} h of wall time in total.",
        "",
        "## Table (fresh seeds)" if fresh else "## Table (selection seeds only: no verdict)",
        "",
        "| method | best rho | eval loss: mean [95% t interval] (seeds) | lambda_max H_L | lambda_max H_G | ECE "
        "| mean max-prob | step time / AdamW (shared machine: no verdict) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    t_ad = _mean({r["seed"]: r["median_step_time"] for r in rep if r["method"] == "AdamW" and r["median_step_time"]})
    res_worst = []
    for m in methods:
        rho = best.get(m, 0.0)
        mine = [r for r in rep if r["method"] == m and (m == "AdamW" or abs(r["rho"] - rho) < 1e-12)]
        if m == "AdamW":
            mine = [r for r in mine if abs(r["lr"] - data["lr"]) < 1e-15]
        ev = {r["seed"]: r["eval_loss"] for r in mine if r["eval_loss"] is not None}

        def col(key, spec=".3f"):
            v = _mean({r["seed"]: r[key] for r in mine if r.get(key) is not None})
            return _fmt(v, spec)

        res_worst += [r["lambda_h_res"] / max(abs(r["lambda_h"]), 1e-12) for r in mine if r.get("lambda_h") is not None]
        st = _mean({r["seed"]: r["median_step_time"] for r in mine if r["median_step_time"]})
        ratio = f"{st / t_ad:.2f}x" if st and t_ad else "not measured"
        lines.append(
            f"| {m} | {rho:g} | {_mean_iv(ev)} | {col('lambda_h')} | {col('lambda_gn')} | {col('ece', '.4f')} "
            f"| {col('mean_max_prob', '.4f')} | {ratio} |"
        )
    lines += [
        "",
        "lambda_max values are means over the seeds"
        + (
            f"; the largest relative Lanczos residual `||Av - lambda v|| / |lambda|` among them is {max(res_worst):.3g}"
            if res_worst
            else ""
        )
        + ". Step time: the mean over the seeds of each run's median step time, over AdamW's; the runs shared "
        "the machine with other work, and a ratio below the compute model's 2x for the exact methods shows "
        "that load, not a saving: no verdict is drawn from this column.",
        "",
        "## Which of the paper's claims reproduced at this scale",
        "",
    ]
    lines += claim_lines(data)
    lines += eps_section(data)
    lines += [
        "## rho sweep (selection seeds: they choose rho, no verdict)",
        "",
        "| method | " + " | ".join(f"rho {x:g}" for x in s["rhos"]) + " |",
        "| --- |" + " --- |" * len(s["rhos"]),
    ]
    for m in methods:
        if m == "AdamW":
            continue
        cells = [
            _fmt(
                _mean(
                    {
                        r["seed"]: r["eval_loss"]
                        for r in selr
                        if r["method"] == m and abs(r["rho"] - x) < 1e-12 and r["eval_loss"] is not None
                    }
                )
            )
            for x in s["rhos"]
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if fresh and any(r["method"] != "AdamW" and abs(r["rho"] - best.get(r["method"], -1)) > 1e-12 for r in rep):
        lines += [
            "",
            "The same sweep on the fresh seeds (the runs behind the rho-tolerance claims; mean [95% t interval]):",
            "",
            "| method | " + " | ".join(f"rho {x:g}" for x in s["rhos"]) + " |",
            "| --- |" + " --- |" * len(s["rhos"]),
        ]
        for m in methods:
            if m == "AdamW":
                continue
            cells = [
                _mean_iv(
                    {
                        r["seed"]: r["eval_loss"]
                        for r in rep
                        if r["method"] == m and abs(r["rho"] - x) < 1e-12 and r["eval_loss"] is not None
                    }
                ).replace("not measured", "-")
                for x in s["rhos"]
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for title, path in data.get("plots", {}).items():
        lines += [f"![{title}]({path})", ""]
    lines += ascent_every_section(data) + horizon_section(data)
    lines += [
        "## How many seeds a verdict needs",
        "",
        seed_plan_text(),
        "",
        *seed_plan_from_grid(data),
        "The paper's models are 24M to 1.2B parameters trained on C4 for far longer; here the "
        f"`{s['preset']}` preset sees {tokens:,} tokens per run.",
        "",
        "## Command",
        "",
        "```bash",
        data["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def seed_plan_text() -> str:
    """The seed-count calculation, computed (not typed): 3 paired AdamW-vs-PFSAM
    differences on another corpus here (2m, 400 steps)."""
    d = [0.016, -0.014, 0.027]
    iv = verdicts.interval(d)
    n_z = verdicts.seeds_needed(0.02, 0.01, normal=True)
    n_t = verdicts.seeds_needed(0.02, 0.01)
    n_s = verdicts.seeds_needed(iv["sd"], 0.01)
    return (
        f"Three paired seeds of AdamW vs PreconditionedFunctionalSAM (2m preset, 400 steps, another corpus on "
        f"this machine) gave differences {', '.join(f'{x:+.3f}' for x in d)}: mean {iv['mean']:+.4f}, sd "
        f"{iv['sd']:.4f} per pair, 95% t interval [{iv['lo']:+.4f}, {iv['hi']:+.4f}]. For a 95% interval of "
        f"half-width 0.01 (enough to resolve a 0.01 difference) with sd 0.02 per pair, n >= (q x 0.02 / 0.01)^2: "
        f"{n_z} pairs with the normal quantile, {n_t} with the t quantile (df = n - 1), {n_s} with the measured "
        f"sd {iv['sd']:.4f}; at about 2 minutes per 2m run here that is about {2 * 2 * n_t} minutes per "
        "comparison (two methods). The default 4 fresh seeds give a half-width of about "
        f"{verdicts.t_quantile(0.975, 3) * 0.02 / 2:.3f} (t_0.975,3 x 0.02 / sqrt 4): they can resolve only "
        "differences larger than that. The paper's gains at 24M+ are 0.005-0.01; a gain of that size cannot be "
        'resolved here with 4 seeds, only with the 16-20 above, and a verdict of "inconclusive" on 4 seeds '
        "says exactly that, not that the gain is absent."
    )


def seed_plan_from_grid(data: dict) -> List[str]:
    """The same calculation on this grid's own fresh seeds: the spread of the paired differences
    PreconditionedFunctionalSAM - AdamW and the pairs a 0.01 and a 0.005 resolution would need."""
    s, best = data["settings"], data["best_rho"]
    pf_name = "PreconditionedFunctionalSAM"
    if pf_name not in best:
        return []
    rows = [
        r
        for r in data["runs"]
        if r["seed"] in s["fresh_seeds"] and verdicts.is_exact(r) and r["steps"] in (s["steps"], None)
    ]
    ad = {r["seed"]: r["eval_loss"] for r in rows if r["method"] == "AdamW" and abs(r["lr"] - data["lr"]) < 1e-15}
    pf = {r["seed"]: r["eval_loss"] for r in rows if r["method"] == pf_name and abs(r["rho"] - best[pf_name]) < 1e-12}
    d = verdicts.paired(pf, ad)
    if len(d) < 2:
        return []
    iv = verdicts.interval(list(d.values()))
    n1, n2 = verdicts.seeds_needed(iv["sd"], 0.01), verdicts.seeds_needed(iv["sd"], 0.005)
    return [
        f"On this grid's {len(d)} fresh seeds the paired differences PreconditionedFunctionalSAM - AdamW are "
        + ", ".join(f"{d[k]:+.4f}" for k in sorted(d))
        + f" (sd {iv['sd']:.4f} per pair, 95% t half-width {iv['half']:.4f}): resolving 0.01 would take {n1} "
        f"pairs and 0.005 (the paper's smallest gains) {n2} pairs at this spread.",
        "",
    ]


def ascent_every_section(data: dict) -> List[str]:
    """The sub-2x variants (``ascent_every: k``, ``ascent_direction: "momentum"``) against AdamW and
    the exact method, paired by seed, with each one's compute model and measured step cost."""
    s, runs, best = data["settings"], data["runs"], data["best_rho"]
    every, mom = s.get("every") or [], s.get("momentum_methods") or []
    if not every and not mom:
        return []
    seeds = s["fresh_seeds"] or s["select_seeds"]
    grid = [r for r in runs if r["seed"] in seeds and r["steps"] in (None, s["steps"])]

    def vals(m, k=1, key="eval_loss", direction=verdicts.GRADIENT):
        return {
            r["seed"]: r[key]
            for r in grid
            if r["method"] == m
            and verdicts.is_variant(r, k, direction)
            and r.get(key) is not None
            and (m == "AdamW" or abs(r["rho"] - best[m]) < 1e-12)
            and (m != "AdamW" or abs(r["lr"] - data["lr"]) < 1e-15)
        }

    ad, ad_t = vals("AdamW"), vals("AdamW", key="step_cost")
    ex = vals(EXTRA_METHOD)
    tag = "fresh seeds" if s["fresh_seeds"] else "selection seeds only: no verdict"
    methods = [m for m in SAM_TYPES if m in (s.get("every_methods") or []) + mom]
    modes = ([f"`ascent_every: k` (k = {', '.join(map(str, every))})"] if every else []) + (
        [
            '`ascent_direction: "momentum"` (eps from AdamW\'s first moment m: `rho M^-1 m / ||M^-1 m||` for the '
            "preconditioned types, `rho m / ||m||` for the others; no pass-1 backward)"
        ]
        if mom
        else []
    )
    title = " and ".join(x for x, on in (("ascent_every", every), ("momentum", mom)) if on)
    lines = [
        f"## Sub-2x mode{'s' if every and mom else ''}: {title}",
        "",
        f"{' and '.join(modes)} at the grid's learning rate {data['lr']:g} and each method's selected rho ("
        + ", ".join(f"{m} {best[m]:g}" for m in methods)
        + f"), {tag} ({', '.join(map(str, seeds))}). "
        f'Gain = AdamW minus variant in eval loss, paired by seed. Retention (the target ">= 80% of exact '
        f"{EXTRA_METHOD}'s gain\"): per seed `(AdamW - variant) - 0.8 (AdamW - exact)`, reproduced only if its "
        "95% t interval is above 0, and only decided where the exact method's own gain is reproduced; the "
        "point share `(mean AdamW - mean variant) / (mean AdamW - mean exact)` is information. The exact "
        'method is its `ascent_every: 1`, `ascent_direction: "gradient"` run: no variant stands in for it. '
        "Step cost: per seed the run's cost per step (count-weighted medians of its exact and direction-reusing "
        "or momentum steps) over AdamW's on the same seed, mean [95% t interval] (shared machine: information, "
        "no verdict).",
        "",
        "Compute model (`tools.reproduce.compute_model`), in forward passes F with a backward = 2F, so that "
        "AdamW's step (F+B) is 3F: an exact SAM-type step runs pass 1 and pass 2, (F+B) + (F+B) = 6F, **2x**. "
        "A step whose direction is not this step's gradient (a reusing step of `ascent_every`, every step of "
        '`ascent_direction: "momentum"` after AdamW\'s first update) runs no pass 1 for SAM and '
        "PreconditionedSAM, (F+B) = 3F, and a forward at theta for g_F for FunctionalSAM and "
        "PreconditionedFunctionalSAM, F + (F+B) = 4F. Hence `ascent_every: k`: SAM types **(1 + 1/k)x**, "
        'FunctionalSAM types **((4 + 2/k)/3)x**; `ascent_direction: "momentum"`: SAM types **1x**, '
        "FunctionalSAM types **4/3 = 1.33x**. Elementwise work over the parameters (the ascent and its norms, "
        "theta + eps and the restore) is not counted.",
        "",
        "| variant | eval loss | gain over AdamW: mean [95% t interval] | >= 80% of exact PFSAM's gain: "
        "`(A - V) - 0.8 (A - E)` [95% t interval], verdict | compute model / AdamW | measured step cost / "
        "AdamW: mean [95% t interval] |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| AdamW | {_mean_iv(ad)} | 0 | | 1.00x | 1.00x |",
    ]

    def row(label, m, k, direction=verdicts.GRADIENT):
        v, vt = vals(m, k, direction=direction), vals(m, k, "step_cost", direction)
        gain = verdicts.interval(list(verdicts.paired(ad, v).values()))
        exact = direction == verdicts.GRADIENT and k == 1
        if exact:
            rv = "(the reference)"
        elif not s["fresh_seeds"]:
            rv = "inconclusive (no fresh seeds)"
        else:
            ret = verdicts.retention(ad, ex, v)
            kept = f", point share {ret['kept_point']:.0%}" if ret.get("kept_point") is not None else ""
            rv = f"{verdicts.fmt_interval(ret['parts'][0])}{kept}: **{ret['verdict']}**" + (
                f" ({ret['note']})" if ret["note"] else ""
            )
        cost = verdicts.interval([vt[x] / ad_t[x] for x in sorted(set(vt) & set(ad_t)) if ad_t[x]])
        cs = (
            "not measured"
            if cost["mean"] is None
            else (
                f"{cost['mean']:.2f}x"
                + (
                    f" [{cost['lo']:.2f}, {cost['hi']:.2f}] (n={cost['n']})"
                    if cost["lo"] is not None
                    else f" (n={cost['n']}, no interval)"
                )
            )
        )
        model = compute_model(m, k, direction)["ratio"]
        return f"| {label} | {_mean_iv(v)} | {verdicts.fmt_interval(gain)} | {rv} | {model:.2f}x | {cs} |"

    for m in methods:
        lines.append(row(f"{m} (exact)", m, 1))
        if m in (s.get("every_methods") or []):
            for k in every:
                lines.append(row(f"{m} ascent_every {k}", m, k))
        if m in mom:
            lines.append(row(f"{m} ascent_direction momentum", m, 1, verdicts.MOMENTUM))
    return lines + [""]


def eps_section(data: dict) -> List[str]:
    """Where the perturbation goes: the shares of ``||eps||^2`` of each SAM type at its selected rho on
    the fresh seeds, and whether PreconditionedSAM's loss against SAM goes with a larger embedding share."""
    s, best = data["settings"], data["best_rho"]
    fresh = s["fresh_seeds"]
    rows = [
        r
        for r in data["runs"]
        if r["seed"] in fresh
        and r["method"] != "AdamW"
        and verdicts.is_exact(r)
        and r["steps"] in (s["steps"], None)
        and abs(r["rho"] - best.get(r["method"], -1.0)) < 1e-12
        and r.get("eps_share_embed_mean") is not None
    ]
    if not rows:
        return []
    ps = s.get("param_shares") or {}
    lines = [
        "## Where the perturbation goes",
        "",
        f"The share of `||eps||^2` that falls on the input-embedding rows and on the output layer, per step "
        f"(`eps_share_embed`, `eps_share_output` in metrics.jsonl), as the mean over the first "
        f"{EPS_EARLY:.0%} of the steps and over the whole run; each cell the mean over the fresh seeds [95% t "
        "interval] at the method's selected rho."
        + (
            f" For scale: the embedding holds {ps['embed']:.1%} of the parameters and the output layer "
            f"{ps['output']:.1%}, the shares of a perturbation spread evenly over the parameters."
            if ps
            else ""
        ),
        "",
        "| method | rho | embedding, first steps | embedding, whole run | output layer, first steps "
        "| output layer, whole run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    methods = [m for m in SAM_TYPES if any(r["method"] == m for r in rows)]

    def per_seed(m: str, key: str) -> Dict[int, float]:
        return {r["seed"]: r[key] for r in rows if r["method"] == m and r.get(key) is not None}

    for m in methods:
        cells = [
            _mean_iv(per_seed(m, f"eps_share_{part}_{when}"), ".3f") for part in EPS_PARTS for when in ("early", "mean")
        ]
        lines.append(f"| {m} | {best[m]:g} | " + " | ".join(cells) + " |")
    lines.append("")
    if {"SAM", "PreconditionedSAM"} <= set(methods):
        loss = {m: {r["seed"]: r["eval_loss"] for r in rows if r["method"] == m} for m in ("SAM", "PreconditionedSAM")}
        worse = verdicts.compare(loss["PreconditionedSAM"], loss["SAM"], "greater")
        key = "eps_share_embed_early"
        more = verdicts.compare(per_seed("PreconditionedSAM", key), per_seed("SAM", key), "greater")
        both = verdicts.all_of([worse["verdict"], more["verdict"]])
        reading = {
            verdicts.REPRODUCED: "**consistent** with the explanation (both intervals above 0; consistent, "
            "not a proof: no run moved the embedding's share alone)",
            verdicts.CONTRADICTED: "**not supported** (an interval lies wholly below 0)",
            verdicts.INCONCLUSIVE: "**inconclusive** (an interval contains 0, or fewer than 2 pairs)",
        }[both]
        lines += [
            "Does the embedding's share explain PreconditionedSAM's loss against SAM? At the start of training "
            "AdamW's `v` is near 0 for rows not yet seen, so `M^-1` is largest there. Paired by seed: eval loss "
            f"PreconditionedSAM - SAM {verdicts.fmt_interval(worse)}; embedding share over the first steps, "
            f"PreconditionedSAM - SAM {verdicts.fmt_interval(more, '+.3f')}. Rule: the explanation is "
            "consistent only if both intervals lie above 0. Reading: " + reading + ".",
            "",
        ]
    return lines


def horizon_section(data: dict) -> List[str]:
    """AdamW vs PreconditionedFunctionalSAM at ``horizon`` x the grid's steps on the horizon seeds (the
    fresh seeds when the JSON names none), and
    whether the gap changes with the horizon: per seed, (PFSAM - AdamW at K x steps) - (PFSAM - AdamW
    at the grid's steps), the claim "the gap grows in PFSAM's favour" being that this is < 0."""
    s = data["settings"]
    k = s.get("horizon", 1)
    if k <= 1:
        return []
    steps = s["steps"] * k
    pf_name = "PreconditionedFunctionalSAM"
    seeds = s.get("horizon_seeds") or s["fresh_seeds"]

    def losses(method: str, n_steps: int) -> Dict[int, float]:
        rows = [
            r
            for r in data["runs"]
            if r["method"] == method
            and r["seed"] in seeds
            and verdicts.is_exact(r)
            and (r["steps"] or s["steps"]) == n_steps
            and math.isclose(float(r["lr"]), float(data["lr"]))
            and (method == "AdamW" or math.isclose(float(r["rho"]), float(data["best_rho"][method])))
        ]
        return {r["seed"]: r["eval_loss"] for r in rows}

    ad, pf = losses("AdamW", steps), losses(pf_name, steps)
    ad1, pf1 = losses("AdamW", s["steps"]), losses(pf_name, s["steps"])
    p = verdicts.compare(pf, ad, "less")
    gap_k, gap_1 = verdicts.paired(pf, ad), verdicts.paired(pf1, ad1)
    change = verdicts.check_values(verdicts.paired(gap_k, gap_1), "less")
    trained = verdicts.compare(ad, ad1, "less")
    plan = ""
    if p.get("sd") and p["mean"]:
        n_need = verdicts.seeds_needed(p["sd"], abs(p["mean"]))
        plan = (
            f" Were the mean and the spread (sd {p['sd']:.4f} per pair) to stay as measured, a 95% t interval "
            f"would resolve this difference ({abs(p['mean']):.4f}) with {n_need} pairs."
        )
    return [
        f"## Longer horizon: {steps} steps",
        "",
        f"AdamW and PreconditionedFunctionalSAM ({k} x the grid's steps, the learning rate and rho chosen at "
        f"{s['steps']} steps), seeds {', '.join(map(str, seeds))} (none of them a selection seed). AdamW "
        f"{_mean_iv(ad)}; PreconditionedFunctionalSAM {_mean_iv(pf)}; paired difference PFSAM - AdamW "
        f"{verdicts.fmt_interval(p)}: **{p['verdict']}** (claim: PFSAM lower).{plan}",
        "",
        f"Against the grid's horizon on the same seeds: AdamW at {steps} - AdamW at {s['steps']} steps "
        f"{verdicts.fmt_interval(trained)} (the longer runs train further: **{trained['verdict']}**). "
        f"The gap PFSAM - AdamW is {verdicts.fmt_interval(verdicts.check_values(gap_1, 'less'))} at "
        f"{s['steps']} steps and {verdicts.fmt_interval(p)} at {steps}; its change per seed (gap at {steps} - gap "
        f"at {s['steps']}) {verdicts.fmt_interval(change)}: **{change['verdict']}** (claim: the gap grows in "
        "PFSAM's favour with the horizon, i.e. the change is below 0).",
        "",
    ]


def write_report(
    a, res: Dict[str, Any], every_runs: List[dict], horizon_runs: List[dict], momentum_runs: Optional[List[dict]] = None
) -> Path:
    from fsam_ds import plot as plot_runs

    img_dir = a.docs.parent / a.docs.stem if a.plots_dir is None else a.plots_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    run_dir = a.out / "runs"
    rep = res["report"]
    curves = [run_dir / r["name"] for m in a.methods for r in rep[m][:1]]
    sweep_dirs = [run_dir / r["name"] for rs in res["sweep"].values() for r in rs]
    made = plot_runs.plot_all(
        curves,
        img_dir,
        sharp_runs=curves,
        sweep_runs=sweep_dirs,
        baseline_runs=[run_dir / r["name"] for r in res["lr_runs"] if r["lr"] == res["lr"]],
    )
    plots = {title: os.path.relpath(path, a.docs.parent) for title, path in made.items()}
    data = collect(a, res, every_runs, horizon_runs, plots, momentum_runs)
    (a.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(data, indent=1) + "\n")
    a.docs.parent.mkdir(parents=True, exist_ok=True)
    a.docs.write_text(render(data, a.docs, a.json))
    log(f"wrote {a.json}, {a.docs} and {len(made)} plots in {img_dir}")
    return a.docs


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> List[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return vals


def _seeds(text: str) -> List[int]:
    if text.strip().lower() in ("", "none"):
        return []
    out: List[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out += list(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seeds or ranges (1235-1238), got {text!r}"
        ) from None
    return out


DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Small-scale reproduction: AdamW LR sweep and rho sweep of the "
        "four SAM types on selection seeds, every configuration on fresh seeds, final "
        "sharpness and calibration, paired verdicts, plots, docs/results.md",
    )
    p.add_argument(
        "--dataset",
        "--data",
        dest="data",
        default=str(DEFAULT_DATA),
        help="a text folder or file, or 'default' (the embedded corpus); default ../shared/data/wikitext-2 "
        "next to the repository (a second corpus: ../shared/data/tinyshakespeare)",
    )
    p.add_argument(
        "--out", default=None, help="run folders (default runs/reproduce, runs/reproduce-<corpus> for another corpus)"
    )
    p.add_argument(
        "--docs",
        default=None,
        help="the report to write (default docs/results.md, docs/results-<corpus>.md for another corpus)",
    )
    p.add_argument("--plots-dir", default=None, help="PNG folder (default: docs/<docs stem>/ next to --docs)")
    p.add_argument(
        "--json",
        default=None,
        help="the JSON the report is rendered from (default: <plots dir>/<docs stem>.json); commit it",
    )
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite --docs from this JSON (no runs)")
    p.add_argument("--preset", default="2m")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lrs", type=_floats, default=[1e-3, 2e-3, 4e-3])
    p.add_argument(
        "--lr-extend",
        type=int,
        default=2,
        help="extend the learning-rate sweep past its edge at most this many times (default 2)",
    )
    p.add_argument("--rhos", type=_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument(
        "--tolerance-rhos",
        type=_floats,
        default=None,
        help="the swept rhos of the fresh-seed tolerance runs (default: every swept rho above each selected one)",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--select-seeds", type=_seeds, default=None, help="seeds that choose lr and rho (default 1234)")
    p.add_argument(
        "--fresh-seeds",
        type=_seeds,
        default=None,
        help="seeds of every verdict, none of them a selection seed (default 1235-1238; 'none': no verdicts)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="older form: N = the selection seed 1234 and N - 1 fresh seeds 1235, ... (ignored with --fresh-seeds)",
    )
    p.add_argument(
        "--no-tolerance",
        dest="tolerance",
        action="store_false",
        help="skip the fresh-seed runs above each selected rho (the rho-tolerance claims)",
    )
    p.add_argument(
        "--horizon",
        type=int,
        default=1,
        help="K > 1: also AdamW and PreconditionedFunctionalSAM for K x --steps on the horizon seeds (default 1: off)",
    )
    p.add_argument(
        "--horizon-seeds",
        type=_seeds,
        default=None,
        help="the seeds of the --horizon runs, none of them a selection seed (default: the fresh seeds); one "
        "that is not a fresh seed also gets both methods at --steps, for the gap's change",
    )
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--sharpness-every", type=int, default=100, help="diagnostics interval of the fresh runs")
    p.add_argument("--lambda-rows", type=int, default=4, help="training blocks in the final lambda_max batch")
    p.add_argument("--lambda-iters", type=int, default=12, help="Lanczos products per final lambda_max")
    p.add_argument(
        "--extra-runs",
        default="",
        help="after the grid, comma-separated: 'ascent_every' runs each of "
        "--every-methods with ascent_every k in --every, 'momentum' each of them with ascent_direction "
        '"momentum" (run names ending -momentum-s<seed>), at its selected rho on the fresh seeds; '
        "the report gets a sub-2x section",
    )
    p.add_argument(
        "--every-methods",
        default=EXTRA_METHOD,
        help=f"SAM types of --extra-runs (comma-separated; default {EXTRA_METHOD})",
    )
    p.add_argument(
        "--every",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[2, 4],
        help="ascent_every values of --extra-runs ascent_every (default 2,4)",
    )
    p.add_argument(
        "--in-process", action="store_true", help="run fsam-train inside this process instead of one process per run"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few steps of the tiny preset, AdamW and "
        "FunctionalSAM, one lr, two rhos, selection seed 1234 and fresh seed 1235, in process (for "
        "tests: it checks the pipeline, not the science)",
    )
    return p


def _err(msg: str) -> int:
    return fail(PROG, msg)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.render:
        src = Path(a.render).expanduser()
        if not src.is_file():
            return _err(f"--render {a.render!r}: no such file (accepted: a JSON written by {PROG})")
        data = json.loads(src.read_text())
        if data.get("schema") != SCHEMA:
            return _err(f"--render {a.render!r}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
        docs = Path(a.docs).expanduser() if a.docs else REPO / "docs" / "results.md"
        docs.write_text(render(data, docs, src))
        log(f"wrote {docs} from {src}")
        return 0
    if a.smoke:
        a.preset, a.steps, a.micro_batch, a.seq_len = "tiny", 4, 2, 32
        a.lrs, a.rhos = [1e-3], [0.05, 0.1]
        if a.fresh_seeds is None and a.seeds is None:
            a.fresh_seeds = [BASE_SEED + 1]
        a.eval_every, a.eval_batches, a.sharpness_every, a.lambda_rows, a.lambda_iters = 2, 2, 2, 2, 3
        a.in_process = True
        if "--methods" not in " ".join(argv):
            a.methods = "AdamW,FunctionalSAM"
    if a.select_seeds is None:
        a.select_seeds = [BASE_SEED]
    if a.fresh_seeds is None:
        a.fresh_seeds = (
            [BASE_SEED + k for k in range(1, a.seeds)] if a.seeds is not None else [BASE_SEED + k for k in range(1, 5)]
        )
    if not a.select_seeds or set(a.select_seeds) & set(a.fresh_seeds) or len(set(a.fresh_seeds)) != len(a.fresh_seeds):
        return _err(
            f"--select-seeds {a.select_seeds} / --fresh-seeds {a.fresh_seeds}: accepted: at least one "
            "selection seed, and distinct fresh seeds none of which is a selection seed"
        )
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "AdamW" not in methods:
        return _err(
            f"--methods {a.methods!r}: accepted: a comma-separated subset of {', '.join(METHODS)} that includes AdamW"
        )
    a.methods = methods
    for key in ("steps", "micro_batch", "seq_len", "eval_batches", "lambda_rows", "lambda_iters", "horizon"):
        if getattr(a, key) < 1:
            return _err(f"--{key.replace('_', '-')} must be an integer >= 1, got {getattr(a, key)}")
    if a.seeds is not None and a.seeds < 1:
        return _err(f"--seeds must be an integer >= 1, got {a.seeds}")
    if a.lr_extend < 0:
        return _err(f"--lr-extend must be an integer >= 0, got {a.lr_extend}")
    if a.data == "default":
        a.data_name, a.data_label = "embedded", "default (the embedded corpus)"
        a.data = Path("default")
    else:
        a.data = Path(a.data).expanduser()
        if not a.data.exists():
            return _err(
                f"--dataset {str(a.data)!r}: no such file or folder (accepted: a text folder or file, or 'default')"
            )
        a.data_name = a.data.name if a.data.is_dir() else a.data.parent.name
        try:
            a.data_label = os.path.relpath(a.data, REPO)
        except ValueError:
            a.data_label = str(a.data)
    default_corpus = str(a.data) != "default" and DEFAULT_DATA.resolve() in (a.data.resolve(), a.data.resolve().parent)
    suffix = "" if default_corpus else f"-{a.data_name}"
    a.out = Path(a.out).expanduser() if a.out else REPO / "runs" / f"reproduce{suffix}"
    a.docs = Path(a.docs).expanduser() if a.docs else REPO / "docs" / f"results{suffix}.md"
    a.plots_dir = Path(a.plots_dir).expanduser() if a.plots_dir else None
    img_dir = a.docs.parent / a.docs.stem if a.plots_dir is None else a.plots_dir
    a.json = Path(a.json).expanduser() if a.json else img_dir / f"{a.docs.stem}.json"
    a.out.mkdir(parents=True, exist_ok=True)
    a.command = ("python -m tools.reproduce " + " ".join(shlex.quote(x) for x in argv)).strip()
    extras = [x for x in a.extra_runs.split(",") if x.strip()]
    a.every_methods = [m.strip() for m in a.every_methods.split(",") if m.strip()]
    extras = [x.strip() for x in extras]
    if (
        any(x not in EXTRAS for x in extras)
        or any(k < 2 for k in a.every)
        or (extras and any(m not in a.methods or m == "AdamW" for m in a.every_methods + [EXTRA_METHOD]))
    ):
        return _err(
            f"--extra-runs {a.extra_runs!r} / --every / --every-methods: accepted: --extra-runs "
            "ascent_every, momentum or ascent_every,momentum with --every integers >= 2, --methods including "
            + EXTRA_METHOD
            + " and --every-methods a comma-separated list of SAM types among --methods"
        )
    if a.horizon_seeds is None:
        a.horizon_seeds = list(a.fresh_seeds)
    if a.horizon > 1 and (
        not a.horizon_seeds
        or set(a.horizon_seeds) & set(a.select_seeds)
        or len(set(a.horizon_seeds)) != len(a.horizon_seeds)
        or any(m not in a.methods for m in HORIZON_METHODS)
    ):
        return _err(
            f"--horizon {a.horizon} / --horizon-seeds {a.horizon_seeds}: accepted: distinct horizon seeds, none of "
            "them a selection seed, and --methods including " + " and ".join(HORIZON_METHODS)
        )
    if "ascent_every" not in extras:
        a.every = []
    res = run_grid(a)
    every_runs = run_ascent_every(a, res) if "ascent_every" in extras else []
    momentum_runs = run_momentum(a, res) if "momentum" in extras else []
    horizon_runs = run_horizon(a, res) if a.horizon > 1 else []
    write_report(a, res, every_runs, horizon_runs, momentum_runs)
    log("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
