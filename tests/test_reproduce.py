"""The reproduction runner's smoke mode: a few steps of two methods give the table and the plots,
and a second invocation reuses the finished runs."""

from __future__ import annotations

import json
from pathlib import Path

# the WikiText-2 excerpt shipped with the tests (the same text whether or not ../shared is present)
DATA = Path(__file__).resolve().parent / "data" / "wikitext-2" / "valid-excerpt.txt"


def tiny_args(tmp_path, **kw):
    """The runner's arguments for tiny in-process runs (the smoke mode's sizes) under ``tmp_path``."""
    import argparse

    base = dict(out=tmp_path / "out", micro_batch=2, seq_len=32, preset="tiny", data=DATA, eval_every=2)
    return argparse.Namespace(**base, eval_batches=2, in_process=True, **kw)


def test_smoke_writes_table_and_plots(tmp_path):
    from tools.reproduce import main

    out, docs = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = ["--smoke", "--out", str(out), "--docs", str(docs), "--data", str(DATA)]
    assert main(argv) == 0
    text = docs.read_text()
    assert "| method | best rho | eval loss" in text
    rows = [line for line in text.splitlines() if line.startswith("| AdamW |") or line.startswith("| FunctionalSAM |")]
    assert len(rows) >= 2 and "n/a" not in rows[0]
    for name in ("loss", "norms", "tau", "lambda_max", "eval_vs_rho"):
        png = tmp_path / "docs" / "results" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
        assert f"results/{name}.png" in text
    assert "python -m tools.reproduce --smoke" in text
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 5 and all((out / "runs" / r / "done.json").is_file() for r in runs)
    # the seed runs log the diagnostics into metrics.jsonl
    seeded = out / "runs" / "fsam-lr0.001-rho0.05-s1235"
    if not seeded.exists():
        seeded = next((out / "runs").glob("fsam-*-s1235"))
    recs = [json.loads(x) for x in (seeded / "metrics.jsonl").read_text().splitlines()]
    assert any("tau_logit" in r and "lambda_max" in r for r in recs)
    # resumable: a second call trains nothing and rewrites the same table
    stamp = {r: (out / "runs" / r / "done.json").stat().st_mtime for r in runs}
    assert main(argv) == 0
    assert stamp == {r: (out / "runs" / r / "done.json").stat().st_mtime for r in runs}
    assert "| AdamW |" in docs.read_text()


def test_bad_arguments_one_line(capsys, tmp_path):
    from tools.reproduce import main

    assert main(["--methods", "SAM,Lion", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsam-reproduce: error: --methods") and "\n" not in err
    assert main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    # a horizon seed that is a selection seed would let the seed that chose rho enter a verdict
    assert main(["--horizon", "4", "--horizon-seeds", "1234,1239", "--out", str(tmp_path), "--data", str(DATA)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsam-reproduce: error: --horizon 4 / --horizon-seeds [1234, 1239]") and "\n" not in err
    assert not (tmp_path / "runs").exists()  # refused before any run


def test_plot_runs_cli(tmp_path):
    from fsam_ds.plot import main

    run = tmp_path / "run"
    run.mkdir()
    recs = [
        {"step": s, "loss": 5.0 - 0.1 * s, "grad_norm": 1.0, "eps_norm": 0.1, "rho": 0.1, "method": "SAM"}
        for s in range(1, 5)
    ]
    recs[1].update(tau_logit=2.0, tau_func=1.0, tau_cross=0.1, logit_fraction=2 / 3, lambda_max=3.0)
    recs.append({"step": 4, "eval_loss": 4.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "loss.png",
        "norms.png",
        "tau.png",
        "lambda_max.png",
        "eval_vs_rho.png",
    }
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "p2")]) == 2


def test_momentum_run_is_named_marked_and_resumed(tmp_path):
    """``--extra-runs momentum``: one tiny in-process run of PreconditionedFunctionalSAM with
    ascent_direction "momentum": its name, its JSON row's variant fields, its step cost from the
    momentum steps, and a second call that trains nothing."""
    from tools import reproduce as R
    from tools import verdicts as V

    a = tiny_args(tmp_path, steps=4, every_methods=["PreconditionedFunctionalSAM"])
    res = {"lr": 1e-3, "best_rho": {"PreconditionedFunctionalSAM": 0.05}, "report_seeds": [1235]}
    (rec,) = R.run_momentum(a, res)
    # existing kinds of run keep their names; the momentum runs get their own suffix
    assert rec["name"] == "pfsam-lr0.001-rho0.05-momentum-s1235"
    assert R.run_name("PreconditionedFunctionalSAM", 1e-3, 0.05, 1235) == "pfsam-lr0.001-rho0.05-s1235"
    folder = a.out / "runs" / rec["name"]
    cfg = json.loads((folder / "ds_config.json").read_text())
    assert cfg["optimizer"]["params"]["ascent_direction"] == "momentum"
    recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    flags = [r["ascent_momentum"] for r in recs if "ascent_momentum" in r]
    assert flags[:1] == [False] and len(flags) == 4 and all(flags[1:])  # exact until AdamW's first update
    row = R._row(a, rec)
    assert row["ascent_direction"] == "momentum" and row["ascent_every"] == 1 and not V.is_exact(row)
    assert row["step_cost"] is not None and row["step_cost"] > 0
    stamp = (folder / "done.json").stat().st_mtime
    assert R.run_momentum(a, res)[0]["name"] == rec["name"] and (folder / "done.json").stat().st_mtime == stamp
    # a marker written before the field existed reads as the gradient direction
    old = dict(rec)
    old.pop("ascent_direction")
    assert R._row(a, old)["ascent_direction"] == "gradient"


def test_extra_runs_accepts_ascent_every_and_momentum_only(capsys, tmp_path):
    from tools.reproduce import main

    assert main(["--extra-runs", "ascent_every,lookahead", "--out", str(tmp_path), "--data", str(DATA)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsam-reproduce: error: --extra-runs") and "momentum" in err and "\n" not in err


def test_horizon_runs_seed_by_seed_and_pairs_an_extra_seed_at_the_grid_horizon(tmp_path):
    from tools import reproduce as R

    a = tiny_args(tmp_path, steps=2, horizon=2, fresh_seeds=[1235], horizon_seeds=[1235, 1239])
    res = {"lr": 1e-3, "best_rho": {"AdamW": 0.0, "PreconditionedFunctionalSAM": 0.05}}
    recs = R.run_horizon(a, res)
    # the fresh seed gets only the long runs (its grid runs exist already); the extra seed both
    assert [r["name"] for r in recs] == [
        "adamw-lr0.001-x2-s1235",
        "pfsam-lr0.001-rho0.05-x2-s1235",
        "adamw-lr0.001-x2-s1239",
        "pfsam-lr0.001-rho0.05-x2-s1239",
        "adamw-lr0.001-s1239",
        "pfsam-lr0.001-rho0.05-s1239",
    ]
    steps = {r["name"]: R._row(a, r)["steps"] for r in recs}
    assert steps["pfsam-lr0.001-rho0.05-x2-s1239"] == 4 and steps["pfsam-lr0.001-rho0.05-s1239"] == 2
