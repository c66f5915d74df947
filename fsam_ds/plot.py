"""PNG plots from run folders: ``fsam-plot RUN [RUN ...] --out DIR`` (or
``python -m fsam_ds.plot``).

A run folder holds ``metrics.jsonl`` as ``fsam-train`` writes it (and optionally ``done.json``
from ``python -m tools.reproduce`` naming its method, rho and seed). The plots:

* ``loss.png``        train loss (smoothed) and eval loss against the step;
* ``norms.png``       ``||g||`` and ``||eps||`` against the step;
* ``tau.png``         ``tau_logit / (tau_logit + tau_func)`` and ``tau_logit / tau_func`` against the step
                      (runs with ``optimizer.params.sharpness_every``);
* ``lambda_max.png``  the in-training lambda_max of the Hessian against the step;
* ``eval_vs_rho.png`` final eval loss against rho per method (runs of a rho sweep; AdamW as a line).

A plot without data in any run is skipped. :func:`plot_all` returns ``{title: path}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .names import METRICS_FILE

PROG = "fsam-plot"
COLORS = {
    "AdamW": "#444444",
    "SAM": "#d62728",
    "PreconditionedSAM": "#ff7f0e",
    "FunctionalSAM": "#1f77b4",
    "PreconditionedFunctionalSAM": "#2ca02c",
}


def load_run(folder) -> Dict:
    """``{"name", "method", "rho", "seed", "steps": [...], "evals": [...]}`` of a run folder."""
    folder = Path(folder)
    recs = []
    path = folder / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no {METRICS_FILE} (accepted: run folders written by fsam-train)")
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    steps = [r for r in recs if "loss" in r]
    meta = json.loads((folder / "done.json").read_text()) if (folder / "done.json").is_file() else {}
    method = meta.get("method") or (steps[0].get("method") if steps else "?")
    rho = meta.get("rho", max((r.get("rho") or 0.0 for r in steps), default=0.0))
    return {
        "name": folder.name,
        "method": method,
        "rho": rho,
        "seed": meta.get("seed"),
        "steps": steps,
        "evals": [r for r in recs if "eval_loss" in r],
    }


def _label(run: Dict) -> str:
    s = run["method"]
    if run["method"] != "AdamW":
        s += f" rho={run['rho']:g}"
    if run.get("seed") is not None:
        s += f" seed {run['seed']}"
    return s


def _smooth(xs: Sequence[float], k: int) -> List[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def _series(run: Dict, key: str):
    pts = [(r["step"], r[key]) for r in run["steps"] if r.get(key) is not None and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


MISSING_MATPLOTLIB = "fsam-plot needs matplotlib: pip install 'fsam-ds[plots]'"


def _plt():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(MISSING_MATPLOTLIB) from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _two_panels():
    """A figure of two panels side by side: (figure, axes)."""
    return _plt().subplots(1, 2, figsize=(11, 4))


def plot_loss(runs: List[Dict], path: Path) -> Optional[Path]:
    fig, axes = _two_panels()
    for run in runs:
        c = COLORS.get(run["method"])
        x, y = _series(run, "loss")
        if x:
            axes[0].plot(x, _smooth(y, max(1, len(y) // 40)), color=c, label=_label(run), lw=1.2)
        ev = run["evals"]
        if ev:
            axes[1].plot(
                [r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", color=c, label=_label(run), ms=3, lw=1.2
            )
    _zoom_tail(axes[1], runs)
    return _finish(
        fig,
        axes,
        [
            dict(title="train loss (pass 1, smoothed)", xlabel="step", ylabel="loss"),
            dict(title="held-out eval loss", xlabel="step", ylabel="loss"),
        ],
        path,
        legend=1,
    )


def _zoom_tail(ax, runs):
    """Eval losses in the second half of training decide; zoom the y axis onto them."""
    tail = [r["eval_loss"] for run in runs for r in run["evals"][len(run["evals"]) // 2 :]]
    if len(tail) >= 2:
        lo, hi = min(tail), max(tail)
        pad = max(1e-3, (hi - lo) * 0.6)
        first = [run["evals"][0]["eval_loss"] for run in runs if run["evals"]]
        ax.set_ylim(lo - pad, min(max(first + [hi]) + pad, hi + 8 * pad))


def plot_norms(runs: List[Dict], path: Path) -> Optional[Path]:
    fig, axes = _two_panels()
    any_data = False
    for run in runs:
        c = COLORS.get(run["method"])
        x, y = _series(run, "grad_norm")
        if x:
            any_data = True
            axes[0].plot(x, _smooth(y, max(1, len(y) // 40)), color=c, label=_label(run), lw=1.2)
        x, y = _series(run, "eps_norm")
        if x and run["method"] != "AdamW":
            axes[1].plot(x, y, color=c, label=_label(run), lw=1.2)
    return _finish(
        fig,
        axes,
        [
            dict(title="||g|| (pass-1 gradient, smoothed)", xlabel="step", yscale="log"),
            dict(title="||eps||", xlabel="step"),
        ],
        path,
        any_data=any_data,
    )


def plot_tau(runs: List[Dict], path: Path) -> Optional[Path]:
    fig, axes = _two_panels()
    any_data = False
    for run in runs:
        c = COLORS.get(run["method"])
        pts = [r for r in run["steps"] if r.get("tau_logit") is not None]
        if not pts:
            continue
        any_data = True
        x = [r["step"] for r in pts]
        axes[0].plot(x, [r["logit_fraction"] for r in pts], "o-", color=c, label=_label(run), ms=3)
        axes[1].plot(
            x,
            [r["tau_logit"] / r["tau_func"] if r["tau_func"] > 0 else float("nan") for r in pts],
            "o-",
            color=c,
            label=_label(run),
            ms=3,
        )
    return _finish(
        fig,
        axes,
        [
            dict(title="tau_logit / (tau_logit + tau_func)", xlabel="step", ylim=(0, 1)),
            dict(title="tau_logit / tau_func", xlabel="step", yscale="log"),
        ],
        path,
        any_data=any_data,
    )


def plot_lambda(runs: List[Dict], path: Path) -> Optional[Path]:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    any_data = False
    for run in runs:
        x, y = _series(run, "lambda_max")
        if x:
            any_data = True
            ax.plot(x, y, "o-", color=COLORS.get(run["method"]), label=_label(run), ms=3)
    return _finish(
        fig, [ax], [dict(title="lambda_max of the loss Hessian (in training)", xlabel="step")], path, any_data=any_data
    )


def plot_eval_vs_rho(runs: List[Dict], baseline: Sequence[Dict], path: Path) -> Optional[Path]:
    plt = _plt()
    by: Dict[str, List] = {}
    for run in runs:
        if run["method"] != "AdamW" and run["evals"]:
            by.setdefault(run["method"], []).append((run["rho"], run["evals"][-1]["eval_loss"]))
    if not by:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, pts in by.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS.get(m), label=m)
    base = [r["evals"][-1]["eval_loss"] for r in baseline if r["evals"]]
    if base:
        mean = sum(base) / len(base)
        ax.axhline(mean, color=COLORS["AdamW"], ls="--", label=f"AdamW (mean of {len(base)})")
        if len(base) > 1:
            ax.axhspan(min(base), max(base), color=COLORS["AdamW"], alpha=0.12)
    return _finish(
        fig, [ax], [dict(title="final eval loss against rho", xlabel="rho", ylabel="eval loss", xscale="log")], path
    )


def _finish(
    fig, axes: Sequence, settings: Sequence[Dict[str, Any]], path: Path, legend: int = 0, any_data: bool = True
) -> Optional[Path]:
    """Titles and labels (``settings``, one dict per axes), a grid on each, the legend on
    ``axes[legend]``, then the figure saved to ``path``; a figure without data is closed and
    nothing written (None)."""
    if not any_data:
        _plt().close(fig)
        return None
    for ax, kwargs in zip(axes, settings):
        ax.set(**kwargs)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[legend].legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def plot_all(runs, out_dir, sharp_runs=None, sweep_runs=None, baseline_runs=None) -> Dict[str, Path]:
    """Every plot of the given run folders into ``out_dir``: curves of ``runs``; tau and lambda_max
    of ``sharp_runs`` (default ``runs``); eval loss against rho of ``sweep_runs`` (default ``runs``)
    with ``baseline_runs`` (default: the AdamW ones among ``runs``) as the AdamW line."""
    out_dir = Path(out_dir)
    main = [load_run(r) for r in runs]
    sharp = [load_run(r) for r in sharp_runs] if sharp_runs is not None else main
    sweep = [load_run(r) for r in sweep_runs] if sweep_runs is not None else main
    base = (
        [load_run(r) for r in baseline_runs]
        if baseline_runs is not None
        else [r for r in main if r["method"] == "AdamW"]
    )
    made = {}
    plots: List[Tuple[str, Callable[..., Optional[Path]], tuple]] = [
        ("train and eval loss", plot_loss, (main,)),
        ("gradient and perturbation norms", plot_norms, (main,)),
        ("where the sharpness goes: tau ratios", plot_tau, (sharp,)),
        ("lambda_max over training", plot_lambda, (sharp,)),
        ("eval loss against rho", plot_eval_vs_rho, (sweep, base)),
    ]
    for title, fn, args in plots:
        name = {
            "plot_loss": "loss",
            "plot_norms": "norms",
            "plot_tau": "tau",
            "plot_lambda": "lambda_max",
            "plot_eval_vs_rho": "eval_vs_rho",
        }[fn.__name__]
        path = fn(*args, out_dir / f"{name}.png")
        if path is not None:
            made[title] = path
    return made


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="PNG plots (loss, norms, tau ratios, lambda_max, eval loss "
        "against rho) from fsam-train run folders",
    )
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="plots", help="output folder (default: plots)")
    a = p.parse_args(argv)
    try:
        _plt()
    except ImportError:
        print(f"{PROG}: error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 2
    try:
        made = plot_all(a.runs, a.out)
    except FileNotFoundError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for title, path in made.items():
        print(f"{path}  ({title})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
