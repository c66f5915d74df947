"""fsam_ds.train end to end: a 2-rank run under the deepspeed launcher on CPU and its resume, one
in-process run, and the one-line errors for bad input."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "fsam_ds" / "train.py"
STEP_KEYS = {"step", "loss", "grad_norm", "eps_norm", "rho", "lr", "tokens_per_s", "method"}
# set by an earlier in-process engine in this pytest process; a child must not inherit them
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CROSS_RANK", "CROSS_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(FSAM_DS_CACHE=str(cache), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def write_config(path: Path, micro: int = 4, **optimizer_changes) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "preconditioned_functional_sam.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["optimizer"].update(optimizer_changes)
    path.write_text(json.dumps(cfg))
    return path


def read_metrics(save_dir: Path):
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return steps, evals


def launch(work: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(TRAIN),
           "--deepspeed_config", str(work / "ds.json"), "--model", "tiny", "--seq-len", "32",
           "--steps", str(steps), "--eval-every", "3", "--eval-batches", "2", "--save-dir", str(work / "run"),
           "--save-every", "3", "--no-progress", *extra]
    proc = subprocess.run(cmd, cwd=work, env=child_env(work / "cache"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("train")
    write_config(work / "ds.json")
    return work


@pytest.fixture(scope="module")
def two_rank_run(work):
    return launch(work, 6)


@pytest.mark.slow
def test_two_ranks_under_deepspeed_launcher(work, two_rank_run):
    run = work / "run"
    assert "final eval_loss:" in two_rank_run.stdout
    final = [line for line in two_rank_run.stdout.splitlines() if line.startswith("final eval_loss:")]
    assert len(final) == 1  # rank 0 only

    steps, evals = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert STEP_KEYS <= set(r)
        assert r["method"] == "PreconditionedFunctionalSAM"
        for key in STEP_KEYS - {"method", "step"}:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r)
        assert r["eps_norm"] == pytest.approx(0.1, rel=1e-5)
        assert r["rho"] == pytest.approx(0.1)
    assert [r["step"] for r in evals] == [3, 6]
    assert all(math.isfinite(r["eval_loss"]) and set(r) == {"step", "eval_loss"} for r in evals)
    assert f"final eval_loss: {evals[-1]['eval_loss']:.4f}" in final[0]

    assert (run / "step3").is_dir() and (run / "step6").is_dir()
    assert (run / "latest").read_text().strip() == "step6"


@pytest.mark.slow
def test_resume_continues_from_checkpoint(work, two_rank_run):
    before, _ = read_metrics(work / "run")
    proc = launch(work, 8, "--resume")
    assert "at step 6 (micro-step 6)" in proc.stdout
    steps, evals = read_metrics(work / "run")
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[:6] == before  # the earlier records are kept as they were
    assert [r["step"] for r in evals] == [3, 6, 8]
    # the LR schedule continues (linear warm-up over 20 steps, 0 for DeepSpeed's first two)
    assert [r["lr"] for r in steps[6:]] == pytest.approx([2.5e-4, 3.0e-4])
    assert (work / "run" / "step8").is_dir()
    assert (work / "run" / "latest").read_text().strip() == "step8"
    assert "final eval_loss:" in proc.stdout


@pytest.fixture
def one_thread(monkeypatch):
    """A tiny model gains nothing from more CPU threads and loses a lot on a busy machine."""
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # fsam_ds.train then leaves torch's count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_main_in_process_one_rank(work, tmp_path, monkeypatch, capsys, one_thread):
    from fsam_ds.train import main

    monkeypatch.setenv("FSAM_DS_CACHE", str(work / "cache"))  # reuses the 2-rank run's tokenizer
    config = write_config(tmp_path / "ds.json", micro=2)
    rc = main(["--deepspeed_config", str(config), "--model", "tiny", "--seq-len", "32", "--steps", "3",
               "--eval-every", "0", "--eval-batches", "1", "--save-dir", str(tmp_path / "run"), "--no-progress",
               "--local_rank=0"])
    assert rc == 0
    steps, evals = read_metrics(tmp_path / "run")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["step"] for r in evals] == [3]
    assert (tmp_path / "run" / "latest").read_text().strip() == "step3"
    out = capsys.readouterr().out
    assert f"final eval_loss: {evals[0]['eval_loss']:.4f}" in out


def test_resume_micro_step_across_layouts():
    from fsam_ds.train import resume_micro_step

    assert resume_micro_step(6, 100, (2, 4), (2, 4)) == 6
    # 2 ranks x 4 read 48 blocks of the epoch; 1 rank x 4 continues at block 48
    assert resume_micro_step(6, 100, (2, 4), (1, 4)) == 12
    assert resume_micro_step(5, 100, (1, 4), (2, 4)) == 3  # 20 blocks read -> ceil(20 / 8)
    # 12 steps of 8 per epoch; step 13 is epoch 1, step 1 -> 8 blocks into epoch 1 of the new layout
    assert resume_micro_step(13, 100, (2, 4), (1, 4)) == 25 + 2
    # 88 blocks read; 16 per new step leaves no full step in epoch 0: start epoch 1 (6 steps each)
    assert resume_micro_step(11, 100, (2, 4), (4, 4)) == 6


BAD_INPUTS = {
    "preset": (["--model", "huge"], ["--model", "'huge'", "tiny", "1.2b"]),
    "missing config": (["--deepspeed_config", "{tmp}/nope.json"], ["deepspeed config", "nope.json", "not found"]),
    "optimizer type": (["--deepspeed_config", "{tmp}/lion.json"], ["optimizer.type", "'Lion'", "AdamW",
                                                                     "PreconditionedFunctionalSAM"]),
    "dataset path": (["--dataset", "{tmp}/no/such.txt"], ["--dataset", "such.txt", "no such file", "default"]),
    "resume empty": (["--resume", "--save-dir", "{tmp}/empty"], ["--resume", "empty", "latest"]),
}


def test_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    write_config(tmp_path / "good.json")
    write_config(tmp_path / "lion.json", type="Lion")
    procs = {}
    for name, (args, _) in BAD_INPUTS.items():
        argv = ["--deepspeed_config", str(tmp_path / "good.json"), "--save-dir", str(tmp_path / "run")]
        argv += [a.format(tmp=tmp_path) for a in args]
        procs[name] = subprocess.Popen([sys.executable, "-m", "fsam_ds.train", *argv], cwd=tmp_path,
                                       env=child_env(tmp_path / "cache"), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("fsam-train: error: "), (name, err)
        for word in BAD_INPUTS[name][1]:
            assert word in lines[0], (name, word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("argv,words", [
    (["--deepspeed_config", "x.json", "--steps", "-1"], ["--steps", ">= 0", "-1"]),
    (["--deepspeed_config", "x.json", "--bogus"], ["--bogus"]),
    (["--model", "tiny"], ["--deepspeed_config", "required"]),
])
def test_argument_errors_are_one_line(argv, words, capsys):
    from fsam_ds.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fsam-train: error: ")
    assert all(w in err for w in words), err
