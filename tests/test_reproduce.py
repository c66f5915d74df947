"""The reproduction runner's smoke mode: a few steps of two methods give the table and the plots,
and a second invocation reuses the finished runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# the WikiText-2 excerpt shipped with the tests (the same text whether or not ../shared is present)
DATA = Path(__file__).resolve().parent / "data" / "wikitext-2" / "valid-excerpt.txt"


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


def test_plot_runs_cli(tmp_path):
    from fsam_ds.plot import main

    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": s, "loss": 5.0 - 0.1 * s, "grad_norm": 1.0, "eps_norm": 0.1, "rho": 0.1, "method": "SAM"}
            for s in range(1, 5)]
    recs[1].update(tau_logit=2.0, tau_func=1.0, tau_cross=0.1, logit_fraction=2 / 3, lambda_max=3.0)
    recs.append({"step": 4, "eval_loss": 4.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"loss.png", "norms.png", "tau.png",
                                                                 "lambda_max.png", "eval_vs_rho.png"}
    assert main([str(tmp_path / "nothing"), "--out", str(tmp_path / "p2")]) == 2
