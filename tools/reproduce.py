"""The small-scale reproduction: one command, resumable, safe to leave running in the background.

    nohup nice -n 19 python -m tools.reproduce > runs/reproduce/log.txt 2>&1 &   # or fsam-reproduce

On WikiText-2 (``--data``, split into training and held-out text by article) with the ``2m``
preset, every run the same number of steps and tokens, single process, fp32, ZeRO stage 0:

1. AdamW at each ``--lrs`` value, the sweep doubled (or halved) past its edge while the best
   learning rate is the largest (smallest) tried, at most ``--lr-extend`` times; the learning rate
   with the lowest final eval loss is shared by every method from then on;
2. SAM, PreconditionedSAM, FunctionalSAM and PreconditionedFunctionalSAM at each ``--rhos`` value;
3. for AdamW and the best ``rho`` of each method, ``--seeds - 1`` further seeds, with the
   sharpness diagnostics logged every ``--sharpness-every`` steps;
4. for those final models: lambda_max of the Hessian and of the Gauss-Newton matrix (Lanczos) on a
   fixed training batch and calibration on the held-out batches (``tools.sharpness_report``);
5. plots (``tools.plot_runs``) and ``docs/results.md`` with the table, written from the runs.

Every run is an ``fsam-train`` process with its own folder under ``--out`` (``ds_config.json``,
``metrics.jsonl``, ``train.log``, its checkpoint) and a ``done.json`` marker written when it ended
well; a second invocation skips every run with a marker, redoes any without, and rewrites the
report. The runner's own log is its standard output.
"""
from __future__ import annotations

import argparse
import datetime
import json
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

PROG = "fsam-reproduce"
REPO = Path(__file__).resolve().parents[1]
SAM_TYPES = ("SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")
METHODS = ("AdamW",) + SAM_TYPES
SHORT = {"AdamW": "adamw", "SAM": "sam", "PreconditionedSAM": "psam", "FunctionalSAM": "fsam",
         "PreconditionedFunctionalSAM": "pfsam"}
BASE_SEED = 1234


def log(*parts) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}]", *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def ds_config(method: str, lr: float, rho: float, steps: int, micro: int, sharpness_every: int,
              extra_params: Optional[Dict[str, Any]] = None) -> dict:
    params: Dict[str, Any] = {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if method != "AdamW":
        params.update(rho=rho, precondition_norm="perturbation", rho_warmup_steps=0)
    if extra_params:
        params.update(extra_params)
    if sharpness_every:
        params["sharpness_every"] = sharpness_every
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": 0},
            "optimizer": {"type": method, "params": params},
            "scheduler": {"type": "WarmupDecayLR",
                          "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                     "warmup_num_steps": max(1, steps // 20), "total_num_steps": steps,
                                     "warmup_type": "linear"}},
            "wall_clock_breakdown": False}


def run_name(method: str, lr: float, rho: float, seed: int) -> str:
    name = f"{SHORT[method]}-lr{lr:g}"
    if method != "AdamW":
        name += f"-rho{rho:g}"
    return f"{name}-s{seed}"


def read_metrics(folder: Path) -> List[dict]:
    path = folder / "metrics.jsonl"
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
    return {"final_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "final_train_loss": steps[-1]["loss"] if steps else None,
            "median_step_time": statistics.median(times) if times else None,
            "steps": steps[-1]["step"] if steps else 0}


def train_run(a, method: str, lr: float, rho: float, seed: int, sharpness_every: int = 0,
              extra_params: Optional[Dict[str, Any]] = None, suffix: str = "", status: bool = True) -> Dict[str, Any]:
    """One fsam-train run, skipped when its done marker exists. Returns the run's record.
    ``extra_params`` go into ``optimizer.params``; ``suffix`` goes into the run's name before the seed."""
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
    cfg = ds_config(method, lr, rho, a.steps, a.micro_batch, sharpness_every, extra_params)
    (folder / "ds_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    cmd = [sys.executable, "-m", "fsam_ds.train", "--deepspeed_config", str(folder / "ds_config.json"),
           "--model", a.preset, "--dataset", str(a.data), "--seq-len", str(a.seq_len), "--steps", str(a.steps),
           "--eval-every", str(a.eval_every), "--eval-batches", str(a.eval_batches), "--seed", str(seed),
           "--save-dir", str(folder), "--log-every", str(max(1, a.steps // 10)), "--no-progress"]
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
    record = {"name": name, "method": method, "lr": lr, "rho": rho if method != "AdamW" else 0.0, "seed": seed,
              "sharpness_every": sharpness_every, "wall_s": wall, **(extra_params or {}), **run_summary(folder)}
    marker.write_text(json.dumps(record, indent=2) + "\n")
    log(f"run {name}: done in {wall:.0f} s, eval loss {record['final_eval_loss']:.4f}")
    return record


def write_status(a, running: str) -> None:
    """While the grid runs, ``--docs`` says how far it is (rewritten with the results at the end)."""
    n_lrs = max(len(a.lrs), len(list((a.out / "runs").glob(f"adamw-lr*-s{BASE_SEED}"))))  # with any extension
    total = n_lrs + (len(a.methods) - 1) * len(a.rhos) + len(a.methods) * (a.seeds - 1)
    done = sorted(p.parent.name for p in (a.out / "runs").glob("*/done.json"))
    lines = ["# Results: a small-scale reproduction", "",
             f"The grid of `tools/reproduce.py` is running: {len(done)} of {total} training runs finished, "
             f"now `{running}` (status of {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}). This page is "
             "rewritten with the table and the plots when the grid ends; the command below resumes it, skipping "
             "finished runs.", "", "Finished runs: " + (", ".join(f"`{d}`" for d in done) or "none") + ".", "",
             "```bash", a.command, "```", ""]
    a.docs.parent.mkdir(parents=True, exist_ok=True)
    a.docs.write_text("\n".join(lines))


def final_analysis(a, record: Dict[str, Any]) -> Dict[str, Any]:
    """lambda_max (Hessian, Gauss-Newton) and calibration of a finished run (cached)."""
    folder = a.out / "runs" / record["name"]
    cache = folder / "final_sharpness.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from tools.sharpness_report import analyse

    log(f"final diagnostics of {record['name']}")
    t0 = time.time()
    out = analyse(folder, batch_rows=a.lambda_rows, micro_batch=a.micro_batch, eval_batches=a.eval_batches,
                  iters=a.lambda_iters, tol=1e-3)
    out["time_s"] = time.time() - t0
    cache.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def _best(records: List[dict]) -> dict:
    return min(records, key=lambda r: r["final_eval_loss"] if r["final_eval_loss"] is not None else float("inf"))


def run_grid(a) -> Dict[str, Any]:
    t_start = time.time()
    log(f"grid: preset {a.preset}, {a.steps} steps x {a.micro_batch} x {a.seq_len} tokens, lrs {a.lrs}, "
        f"rhos {a.rhos}, methods {', '.join(a.methods)}, {a.seeds} seed(s)")
    lr_runs = [train_run(a, "AdamW", lr, 0.0, BASE_SEED) for lr in a.lrs]
    for _ in range(a.lr_extend):  # a best learning rate at the sweep's edge is not a tuned one
        lr, tried = _best(lr_runs)["lr"], sorted(r["lr"] for r in lr_runs)
        if lr not in (tried[0], tried[-1]) or len(tried) < 2:
            break
        nxt = lr * 2 if lr == tried[-1] else lr / 2
        log(f"best learning rate {lr:g} is at the edge of the sweep: adding {nxt:g}")
        lr_runs.append(train_run(a, "AdamW", nxt, 0.0, BASE_SEED))
    lr_runs.sort(key=lambda r: r["lr"])
    lr = _best(lr_runs)["lr"]
    log(f"learning rate: {lr:g} (AdamW eval losses {[round(r['final_eval_loss'], 4) for r in lr_runs]})")
    sweep: Dict[str, List[dict]] = {m: [train_run(a, m, lr, rho, BASE_SEED) for rho in a.rhos]
                                    for m in a.methods if m != "AdamW"}
    best_rho = {m: _best(rs)["rho"] for m, rs in sweep.items()}
    best_rho["AdamW"] = 0.0
    log(f"best rho: {best_rho}")
    seeded: Dict[str, List[dict]] = {}
    for m in a.methods:
        first = next(r for r in (lr_runs if m == "AdamW" else sweep[m])
                     if r["lr"] == lr and r["rho"] == best_rho[m])
        extra = [train_run(a, m, lr, best_rho[m], BASE_SEED + k, a.sharpness_every) for k in range(1, a.seeds)]
        seeded[m] = [first] + extra
    for m in a.methods:
        for r in seeded[m]:
            r["final"] = final_analysis(a, r)
    return {"lr": lr, "lr_runs": lr_runs, "sweep": sweep, "best_rho": best_rho, "seeded": seeded,
            "grid_time_s": sum(r.get("wall_s", 0.0) for r in lr_runs + [x for v in sweep.values() for x in v]
                               + [x for v in seeded.values() for x in v[1:]]),
            "this_invocation_s": time.time() - t_start}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _mean_spread(xs: List[float]) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    return (f"{cores} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, no GPU")


def claims(res: Dict[str, Any], rows: Dict[str, dict]) -> List[str]:
    """Sentences comparing the runs with the paper's claims, each computed from the numbers."""
    out = []
    ad = rows.get("AdamW")
    if ad is None:
        return out
    def loss(m):  # noqa: E306
        return rows[m]["eval_mean"] if m in rows else None
    sam, fs, pfs, ps = (loss(m) for m in ("SAM", "FunctionalSAM", "PreconditionedFunctionalSAM", "PreconditionedSAM"))
    a = ad["eval_mean"]

    def noise(*ms):  # a difference no larger than the two seed half-ranges together is not evidence
        d = abs(loss(ms[0]) - loss(ms[1]))
        lim = sum(rows[m]["eval_spread"] or 0.0 for m in ms)
        return f"; within the seed spread ({d:.4f} <= {lim:.4f}): not significant" if d <= lim else ""
    if sam is not None:
        out.append(f"*SAM is worse than AdamW at equal steps*: {'reproduced' if sam > a else 'not reproduced'} "
                   f"(SAM {sam:.4f} vs AdamW {a:.4f}, difference {sam - a:+.4f}{noise('SAM', 'AdamW')}).")
    for name, v in (("PreconditionedFunctionalSAM", pfs), ("PreconditionedSAM", ps)):
        if v is not None:
            beats_a, beats_s = v < a, (sam is None or v < sam)
            verdict = "reproduced" if beats_a and beats_s else ("partly reproduced" if beats_a or beats_s
                                                                else "not reproduced")
            out.append(f"*{name} beats SAM and AdamW*: {verdict} ({v:.4f} vs AdamW {a:.4f} ({v - a:+.4f}"
                       f"{noise(name, 'AdamW')})"
                       + (f", SAM {sam:.4f} ({v - sam:+.4f}{noise(name, 'SAM')})" if sam is not None else "") + ").")
    if fs is not None and sam is not None:
        out.append(f"*FunctionalSAM improves on SAM*: {'reproduced' if fs < sam else 'not reproduced'} "
                   f"({fs:.4f} vs {sam:.4f}{noise('FunctionalSAM', 'SAM')}).")
    # rho tolerance: best rho of the functional types vs SAM, and how SAM degrades with rho
    br = res["best_rho"]
    if "SAM" in br and "FunctionalSAM" in br:
        out.append(f"*FSAM tolerates larger rho than SAM*: best rho FunctionalSAM {br['FunctionalSAM']:g}, "
                   f"PreconditionedFunctionalSAM {br.get('PreconditionedFunctionalSAM', float('nan')):g}, "
                   f"SAM {br['SAM']:g}: "
                   + ("reproduced" if br["FunctionalSAM"] > br["SAM"] else "not reproduced for FunctionalSAM"
                      + (", reproduced for PreconditionedFunctionalSAM"
                         if br.get("PreconditionedFunctionalSAM", 0) > br["SAM"] else "")) + ".")
    if "SAM" in res["sweep"]:
        s = sorted(res["sweep"]["SAM"], key=lambda r: r["rho"])
        inc = all(x["final_eval_loss"] <= y["final_eval_loss"] for x, y in zip(s, s[1:]))
        out.append(f"*SAM degrades as rho grows*: {'reproduced' if inc else 'not monotone here'} (eval loss by rho: "
                   + ", ".join(f"{r['rho']:g}: {r['final_eval_loss']:.4f}" for r in s) + ").")
    lam = {m: r["lambda_h"] for m, r in rows.items() if r.get("lambda_h") is not None}
    if "AdamW" in lam:
        flatter = [m for m in lam if m != "AdamW" and lam[m] < lam["AdamW"] and rows[m]["eval_mean"] <= a]
        out.append("*Solutions with smaller Hessian eigenvalues at equal or better eval loss*: "
                   + (f"reproduced for {', '.join(flatter)}" if flatter else "not reproduced")
                   + " (lambda_max of H_L: " + ", ".join(f"{m} {v:.3g}" for m, v in lam.items()) + ").")
    fr = {m: r["logit_fraction"] for m, r in rows.items() if r.get("logit_fraction") is not None}
    if fr:
        out.append("*The logit path dominates the sharpness along the gradient after the first steps*: "
                   f"{'reproduced' if all(v > 0.5 for v in fr.values()) else 'not everywhere'} "
                   "(tau_logit / (tau_logit + tau_func) at the end: "
                   + ", ".join(f"{m} {v:.3f}" for m, v in fr.items()) + ").")
    mp = {m: r["mean_max_prob"] for m, r in rows.items() if r.get("mean_max_prob") is not None}
    if "SAM" in mp and "AdamW" in mp:
        out.append(f"*SAM makes predictions more confident*: mean max-probability SAM {mp['SAM']:.4f} vs AdamW "
                   f"{mp['AdamW']:.4f}: {'reproduced' if mp['SAM'] > mp['AdamW'] else 'not reproduced'}.")
    return out


def write_report(a, res: Dict[str, Any], command: str) -> Path:
    from tools import plot_runs

    img_dir = a.docs.parent / a.docs.stem if a.plots_dir is None else a.plots_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    run_dir = a.out / "runs"
    rows: Dict[str, dict] = {}
    adamw_time = None
    for m in a.methods:
        rs = res["seeded"][m]
        mean, spread = _mean_spread([r["final_eval_loss"] for r in rs])
        lam_h = _mean_spread([r["final"]["lambda_max_hessian"]["value"] for r in rs])[0]
        lam_g = _mean_spread([r["final"]["lambda_max_gauss_newton"]["value"] for r in rs])[0]
        res_h = max(r["final"]["lambda_max_hessian"]["residual"] / max(abs(r["final"]["lambda_max_hessian"]["value"]),
                                                                        1e-12) for r in rs)
        iters = max(r["final"]["lambda_max_hessian"]["iterations"] for r in rs)
        cal = [r["final"]["calibration"] for r in rs]
        # the step time of the sweep runs (no diagnostics), median over the method's runs
        sweep_runs = res["lr_runs"] if m == "AdamW" else res["sweep"][m]
        st = statistics.median([r["median_step_time"] for r in sweep_runs if r["median_step_time"]])
        if m == "AdamW":
            adamw_time = st
        rows[m] = {"rho": res["best_rho"][m], "eval_mean": mean, "eval_spread": spread, "n": len(rs),
                   "lambda_h": lam_h, "lambda_gn": lam_g, "lambda_rel_res": res_h, "lambda_iters": iters,
                   "ece": statistics.fmean(c["ece"] for c in cal),
                   "mean_max_prob": statistics.fmean(c["mean_max_prob"] for c in cal),
                   "entropy": statistics.fmean(c["mean_entropy"] for c in cal),
                   "logit_fraction": statistics.fmean(r["final"]["terms"]["logit_fraction"] for r in rs),
                   "step_time": st}
    for m in rows:
        rows[m]["time_ratio"] = rows[m]["step_time"] / adamw_time if adamw_time else None

    # plots
    curves = [run_dir / r["name"] for m in a.methods for r in res["seeded"][m][1:2]] or \
             [run_dir / res["seeded"][m][0]["name"] for m in a.methods]
    sweep_dirs = [run_dir / r["name"] for rs in res["sweep"].values() for r in rs]
    main_dirs = [run_dir / res["seeded"][m][0]["name"] for m in a.methods]
    made = plot_runs.plot_all(main_dirs, img_dir, sharp_runs=curves, sweep_runs=sweep_dirs,
                              baseline_runs=[run_dir / r["name"] for r in res["seeded"]["AdamW"]])
    rel = lambda p: os.path.relpath(p, a.docs.parent)  # noqa: E731

    lines = ["# Results: a small-scale reproduction", "",
             f"Written by `tools/reproduce.py` on {datetime.date.today().isoformat()}; every number below comes "
             "from the runs (nothing is typed by hand). Rerun the command below to reproduce or continue it.", "",
             "## Setup", "",
             f"- Data: WikiText-2 raw (`{a.data_label}`"
             + (": " + ", ".join(f"`{f.name}`" for f in sorted(a.data.glob("*.txt"))) if a.data.is_dir() else "")
             + "), split by article into "
             "training text and a held-out eval split (5% of the articles); a byte-level BPE tokenizer trained "
             "on the training split.",
             f"- Model: the `{a.preset}` preset (Llama-style decoder); every run {a.steps} optimizer steps of "
             f"{a.micro_batch} x {a.seq_len} tokens ({a.steps * a.micro_batch * a.seq_len:,} tokens), one process, "
             "fp32, ZeRO stage 0, AdamW (betas 0.9/0.95, weight decay 0.1, clipping 1.0), linear warm-up over "
             f"{max(1, a.steps // 20)} steps then linear decay to 0.",
             f"- Learning rate: AdamW swept over {', '.join(format(r['lr'], 'g') for r in res['lr_runs'])} (eval loss "
             + ", ".join(f"{r['lr']:g}: {r['final_eval_loss']:.4f}" for r in res["lr_runs"])
             + f"); **{res['lr']:g}** is used by every method.",
             f"- rho swept over {', '.join(f'{x:g}' for x in a.rhos)} for each SAM type (seed {BASE_SEED}; the "
             "preconditioned types use the `perturbation` normalisation, so `||eps|| = rho` for all); the best rho "
             f"of each (lowest eval loss) and AdamW then ran with {a.seeds - 1} more seed(s). Seeds change the "
             "initialisation and the data order.",
             f"- Eval loss: mean next-token cross-entropy on {a.eval_batches} held-out batches at the end. "
             "lambda_max: Lanczos on the first "
             f"{a.lambda_rows} training blocks, at most {a.lambda_iters} products. ECE: 15 equal-width confidence "
             "bins over every held-out token of those batches.",
             f"- Machine: {_machine()}. The grid's runs took {res['grid_time_s'] / 3600:.2f} h of wall time in "
             "total (other work shared the machine at times, which inflates the step times of some runs).",
             "", "## Table", "",
             "| method | best rho | eval loss (mean ± half-range, seeds) | lambda_max H_L | lambda_max H_G | ECE "
             "| mean max-prob | step time / AdamW |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, r in rows.items():
        lines.append(f"| {m} | {r['rho']:g} | {_fmt(r['eval_mean'])} ± {_fmt(r['eval_spread'])} ({r['n']}) | "
                     f"{_fmt(r['lambda_h'], '.3f')} | {_fmt(r['lambda_gn'], '.3f')} | {_fmt(r['ece'])} | "
                     f"{_fmt(r['mean_max_prob'])} | {_fmt(r['time_ratio'], '.2f')}x |")
    worst = max(r["lambda_rel_res"] for r in rows.values())
    lines += ["", f"lambda_max values are means over seeds; the largest relative Lanczos residual "
              f"`||Av - lambda v|| / |lambda|` among them is {worst:.3g} after at most "
              f"{max(r['lambda_iters'] for r in rows.values())} products. Step time: median over the method's "
              "sweep runs of each run's median step time (the seed runs carry the sharpness diagnostics, which "
              "are not counted in the step time either).", "",
              "Eval loss of every run of the rho sweep:", "",
              "| method | " + " | ".join(f"rho {x:g}" for x in a.rhos) + " |",
              "| --- |" + " --- |" * len(a.rhos)]
    for m, rs in res["sweep"].items():
        by = {r["rho"]: r["final_eval_loss"] for r in rs}
        lines.append(f"| {m} | " + " | ".join(_fmt(by.get(x)) for x in a.rhos) + " |")
    lines += ["", "## Plots", ""]
    for title, path in made.items():
        lines += [f"![{title}]({rel(path)})", ""]
    lines += ["## Which of the paper's claims reproduced at this scale", ""]
    lines += [f"- {c}" for c in claims(res, rows)]
    lines += ["", "The paper's models are 24M to 1.2B parameters trained on C4 for far longer; here the "
              f"`{a.preset}` preset "
              f"sees {a.steps * a.micro_batch * a.seq_len:,} tokens, so differences of the order of the seed "
              "spread above are not evidence either way.", "",
              "## Command", "", "```bash", command, "```", ""]
    a.docs.parent.mkdir(parents=True, exist_ok=True)
    a.docs.write_text("\n".join(lines))
    (a.out / "results.json").write_text(json.dumps({"rows": rows, **{k: v for k, v in res.items()}}, indent=2,
                                                   default=str) + "\n")
    log(f"wrote {a.docs} and {len(made)} plots in {img_dir}")
    return a.docs


# ---------------------------------------------------------------------------------------------
# Extra runs after the grid (--extra-runs)
# ---------------------------------------------------------------------------------------------

EXTRA_METHOD = "PreconditionedFunctionalSAM"  # the exact method whose gain the sub-2x variants are measured against


def run_ascent_every(a, res: Dict[str, Any]) -> List[dict]:
    """Each of ``--every-methods`` with ``ascent_every`` k (``--every``) at the grid's learning rate
    and that method's best rho, for the same seeds as the grid's seeded runs."""
    return [train_run(a, m, res["lr"], res["best_rho"][m], BASE_SEED + s, extra_params={"ascent_every": k},
                      suffix=f"-every{k}", status=False)
            for m in a.every_methods for k in a.every for s in range(a.seeds)]


def _mean_time(a, runs: List[dict]) -> float:
    """Cost per step, median over runs. Within a run the steps are grouped into exact and
    direction-reusing ones (``ascent_reused``), and the cost is the step-weighted sum of each group's
    median step time: the exact steps of a k-cycle count (a median over all steps would hide them)
    while the median stays robust to other work slowing some steps down."""
    costs = []
    for r in runs:
        groups: Dict[bool, List[float]] = {}
        for m in read_metrics(a.out / "runs" / r["name"]):
            if m.get("step_time"):
                reused = m.get("ascent_reused", "grad_norm" in m and m["grad_norm"] is None)  # no pass-1 gradient
                groups.setdefault(bool(reused), []).append(m["step_time"])
        n = sum(len(g) for g in groups.values())
        if n:
            costs.append(sum(len(g) / n * statistics.median(g) for g in groups.values()))
    return statistics.median(costs)


def ascent_every_section(a, res: Dict[str, Any], runs: List[dict]) -> List[str]:
    """How much of exact preconditioned FSAM's eval-loss gain over AdamW each variant keeps."""
    ad = [r["final_eval_loss"] for r in res["seeded"]["AdamW"]]
    a_mean = statistics.fmean(ad)
    t_ad = _mean_time(a, res["lr_runs"])
    gain = a_mean - statistics.fmean(r["final_eval_loss"] for r in res["seeded"][EXTRA_METHOD])

    def row(label, losses, t):
        m = statistics.fmean(losses)
        kept = f"{100 * (a_mean - m) / gain:.0f}%" if gain > 0 else "n/a (exact has no gain)"
        return f"| {label} | {m:.4f} | {a_mean - m:+.4f} | {kept} | {t / t_ad:.2f}x |"

    rhos = ", ".join(f"{m} {res['best_rho'][m]:g}" for m in a.every_methods)
    lines = ["## Sub-2x mode: ascent_every", "",
             f"`ascent_every: k` at the grid's learning rate {res['lr']:g} and each method's best rho ({rhos}), "
             f"seeds as the seeded runs above (mean over {len(ad)} seed(s)). Gain kept = (AdamW - variant) / "
             f"(AdamW - exact {EXTRA_METHOD}), in eval loss, for every row. Step time: each run's cost per step (the "
             "median step time of its exact and of its reusing steps, weighted by their counts), median over the "
             "variant's runs, divided by AdamW's (same machine, same load caveats).", "",
             "| variant | eval loss | gain over AdamW | gain kept | step time / AdamW |", "| --- | --- | --- | --- | --- |",
             f"| AdamW | {a_mean:.4f} | 0 | | 1.00x |"]
    for m in a.every_methods:
        lines.append(row(f"{m} (exact)", [r["final_eval_loss"] for r in res["seeded"][m]], _mean_time(a, res["sweep"][m])))
        for k in a.every:
            rs = [r for r in runs if r["method"] == m and r.get("ascent_every") == k]
            lines.append(row(f"{m} ascent_every {k}", [r["final_eval_loss"] for r in rs], _mean_time(a, rs)))
    return lines + [""]


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Small-scale reproduction: AdamW LR sweep, rho sweep of the "
                                "four SAM types, extra seeds, final sharpness and calibration, plots, docs/results.md")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "wikitext-2"),
                   help="WikiText-2 folder or text file (default: ../shared/data/wikitext-2 next to the repository)")
    p.add_argument("--out", default=str(REPO / "runs" / "reproduce"), help="run folders (default runs/reproduce)")
    p.add_argument("--docs", default=str(REPO / "docs" / "results.md"), help="the report to write")
    p.add_argument("--plots-dir", default=None, help="PNG folder (default: docs/results/ next to --docs)")
    p.add_argument("--preset", default="2m")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lrs", type=_floats, default=[1e-3, 2e-3, 4e-3])
    p.add_argument("--lr-extend", type=int, default=2,
                   help="extend the learning-rate sweep past its edge at most this many times (default 2)")
    p.add_argument("--rhos", type=_floats, default=[0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=2, help="seeds for AdamW and the best rho of each method (>= 1)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--sharpness-every", type=int, default=100, help="diagnostics interval of the seed runs")
    p.add_argument("--lambda-rows", type=int, default=4, help="training blocks in the final lambda_max batch")
    p.add_argument("--lambda-iters", type=int, default=12, help="Lanczos products per final lambda_max")
    p.add_argument("--extra-runs", default="", help="after the grid: 'ascent_every' runs each of --every-methods "
                   "with ascent_every k in --every at its best rho and adds a section to the report")
    p.add_argument("--every-methods", default=EXTRA_METHOD,
                   help=f"SAM types of --extra-runs ascent_every (comma-separated; default {EXTRA_METHOD})")
    p.add_argument("--every", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4],
                   help="ascent_every values of --extra-runs ascent_every (default 2,4)")
    p.add_argument("--in-process", action="store_true", help="run fsam-train inside this process instead of one "
                   "process per run")
    p.add_argument("--smoke", action="store_true", help="a few steps of the tiny preset, AdamW and "
                   "FunctionalSAM, one lr, two rhos, two seeds, in process (for tests)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.smoke:
        a.preset, a.steps, a.micro_batch, a.seq_len = "tiny", 4, 2, 32
        a.lrs, a.rhos, a.seeds = [1e-3], [0.05, 0.1], 2
        a.eval_every, a.eval_batches, a.sharpness_every, a.lambda_rows, a.lambda_iters = 2, 2, 2, 2, 3
        a.in_process = True
        if "--methods" not in " ".join(argv):
            a.methods = "AdamW,FunctionalSAM"
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or "AdamW" not in methods:
        print(f"{PROG}: error: --methods {a.methods!r}: accepted: a comma-separated subset of {', '.join(METHODS)} "
              "that includes AdamW", file=sys.stderr)
        return 2
    a.methods = methods
    for key in ("steps", "micro_batch", "seq_len", "seeds", "eval_batches", "lambda_rows", "lambda_iters"):
        if getattr(a, key) < 1:
            print(f"{PROG}: error: --{key.replace('_', '-')} must be an integer >= 1, got {getattr(a, key)}",
                  file=sys.stderr)
            return 2
    if a.lr_extend < 0:
        print(f"{PROG}: error: --lr-extend must be an integer >= 0, got {a.lr_extend}", file=sys.stderr)
        return 2
    a.data, a.out, a.docs = Path(a.data).expanduser(), Path(a.out).expanduser(), Path(a.docs).expanduser()
    a.plots_dir = Path(a.plots_dir).expanduser() if a.plots_dir else None
    if not a.data.exists():
        print(f"{PROG}: error: --data {str(a.data)!r}: no such file or folder (accepted: a WikiText-2 folder or "
              "text file)", file=sys.stderr)
        return 2
    try:
        a.data_label = os.path.relpath(a.data, REPO)
    except ValueError:
        a.data_label = str(a.data)
    a.out.mkdir(parents=True, exist_ok=True)
    command = "python -m tools.reproduce " + " ".join(shlex.quote(x) for x in argv)
    a.command = command.strip()
    extras = [x for x in a.extra_runs.split(",") if x.strip()]
    a.every_methods = [m.strip() for m in a.every_methods.split(",") if m.strip()]
    if any(x != "ascent_every" for x in extras) or any(k < 2 for k in a.every) or \
            (extras and any(m not in a.methods or m == "AdamW" for m in a.every_methods + [EXTRA_METHOD])):
        print(f"{PROG}: error: --extra-runs {a.extra_runs!r} / --every / --every-methods: accepted: --extra-runs "
              "ascent_every with --every integers >= 2, --methods including " + EXTRA_METHOD + " and "
              "--every-methods a comma-separated list of SAM types among --methods", file=sys.stderr)
        return 2
    res = run_grid(a)
    write_report(a, res, a.command)
    if "ascent_every" in extras:
        runs = run_ascent_every(a, res)
        text = a.docs.read_text().rstrip("\n").split("\n")
        cut = text.index("## Command") if "## Command" in text else len(text)
        text[cut:cut] = ascent_every_section(a, res, runs)
        a.docs.write_text("\n".join(text) + "\n")
        log(f"ascent_every runs added to {a.docs}")
    log("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
