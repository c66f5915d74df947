"""fsam_ds.train end to end: a 2-rank run under the deepspeed launcher on CPU and its resume, one
in-process run, and the one-line errors for bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from common import read_metrics, write_config
from launch import ROOT, child_env, deepspeed

from fsam_ds.train import train_argv  # noqa: E402

TRAIN = ROOT / "fsam_ds" / "train.py"
STEP_KEYS = {"step", "loss", "grad_norm", "eps_norm", "rho", "lr", "tokens_per_s", "method"}


def launch(work: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    return deepspeed(
        TRAIN,
        *train_argv(work / "ds.json", work / "run", steps, eval_every=3, eval_batches=2, save_every=3),
        *extra,
        cwd=work,
        env=child_env(work / "cache"),
        timeout=300,
    )


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
    rc = main([*train_argv(config, tmp_path / "run", 3), "--local_rank=0"])
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
    "optimizer type": (
        ["--deepspeed_config", "{tmp}/lion.json"],
        ["optimizer.type", "'Lion'", "AdamW", "PreconditionedFunctionalSAM"],
    ),
    "dataset path": (["--dataset", "{tmp}/no/such.txt"], ["--dataset", "such.txt", "no such file", "default"]),
    "resume empty": (["--resume", "--save-dir", "{tmp}/empty"], ["--resume", "empty", "latest"]),
}


def test_bad_input_exits_2_with_one_line(tmp_path, clean_env):
    (tmp_path / "empty").mkdir()
    write_config(tmp_path / "good.json")
    write_config(tmp_path / "lion.json", type="Lion")
    procs = {}
    for name, (args, _) in BAD_INPUTS.items():
        argv = ["--deepspeed_config", str(tmp_path / "good.json"), "--save-dir", str(tmp_path / "run")]
        argv += [a.format(tmp=tmp_path) for a in args]
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fsam_ds.train", *argv],
            cwd=tmp_path,
            env=clean_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in err, (name, err)
        assert len(lines) == 1 and lines[0].startswith("fsam-train: error: "), (name, err)
        for word in BAD_INPUTS[name][1]:
            assert word in lines[0], (name, word, lines[0])
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--deepspeed_config", "x.json", "--steps", "-1"], ["--steps", ">= 0", "-1"]),
        (["--deepspeed_config", "x.json", "--bogus"], ["--bogus"]),
        (["--model", "tiny"], ["--deepspeed_config", "required"]),
    ],
)
def test_argument_errors_are_one_line(argv, words, capsys):
    from fsam_ds.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fsam-train: error: ")
    assert all(w in err for w in words), err


# ---- refusals checked in this process, before any rank starts ---------------


def _checkpoint(folder: Path, stage: int) -> Path:
    """A real one-rank DeepSpeed checkpoint of the tiny reference model at ``stage``, tag step1."""
    from common import ds_config
    from reference import micro_batch, tiny_llama

    import fsam_ds

    cfg = ds_config("SAM", gas=1)
    if stage:
        cfg["zero_optimization"] = {"stage": stage}
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
    engine.train_batch(iter([micro_batch(0, 0, 0, 1, 1)]))
    engine.save_checkpoint(str(folder), tag="step1")
    assert (folder / "latest").read_text().strip() == "step1"
    return folder / "step1"


def _resume_argv(tmp_path: Path, save_dir: Path):
    config = write_config(tmp_path / "ds.json")
    return ["--deepspeed_config", str(config), "--save-dir", str(save_dir), "--resume"]


def _assert_refused(argv, words, capsys):
    from fsam_ds.train import UsageError, build_parser, main, validate

    with pytest.raises(UsageError) as info:  # refused here, not by DeepSpeed's traceback later
        validate(build_parser().parse_args(argv))
    assert "\n" not in str(info.value)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fsam-train: error: --resume: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("stage", [0, 3])
def test_resume_refuses_a_tag_folder_missing_a_rank_file(tmp_path, stage, capsys):
    import shutil

    import torch

    from fsam_ds.train import check_checkpoint_files

    tag = _checkpoint(tmp_path / "run", stage)
    info = check_checkpoint_files(tag)  # a complete checkpoint passes
    assert info["world_size"] == 1 and info["partitioned"] == (stage == 3)
    argv = _resume_argv(tmp_path, tmp_path / "run")
    if stage == 3:
        # the same checkpoint as if written by 2 ranks whose second rank's files never arrived
        header = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        state = torch.load(header, weights_only=False)
        state["dp_world_size"] = 2
        torch.save(state, header)
        shutil.copy(
            tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        )
        _assert_refused(
            argv, ["missing shard file(s) zero_pp_rank_1_mp_rank_00_model_states.pt", "2 data-parallel"], capsys
        )
    else:
        (tag / "mp_rank_00_model_states.pt").unlink()
        _assert_refused(argv, ["step1: no *_model_states.pt"], capsys)


@pytest.mark.parametrize("which", ["model", "optim"])
def test_resume_refuses_a_truncated_file(tmp_path, which, capsys):
    tag = _checkpoint(tmp_path / "run", 1)
    name = "mp_rank_00_model_states.pt" if which == "model" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = (tag / name).read_bytes()
    (tag / name).write_bytes(data[: len(data) // 2])
    _assert_refused(_resume_argv(tmp_path, tmp_path / "run"), [name, "truncated"], capsys)


def test_empty_dataset_file_is_named(tmp_path, capsys):
    from fsam_ds.train import UsageError, build_parser, main, prepare_data, validate

    config = write_config(tmp_path / "ds.json")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = ["--deepspeed_config", str(config), "--save-dir", str(tmp_path / "run"), "--dataset", str(empty)]
    with pytest.raises(UsageError, match=r"^--dataset '.*empty\.txt': the file is empty"):
        validate(build_parser().parse_args(argv))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dataset" in err and "empty.txt" in err
    # blank lines only: found when the texts are read (the same path every rank takes)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError) as info:
        prepare_data(str(blank), None, "tiny", True, 32)
    msg = str(info.value)
    assert msg.startswith(f"--dataset {str(blank)!r}: ") and "no text to train on" in msg and "\n" not in msg
    # the same for a folder of blank files
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(" \n")
    with pytest.raises(ValueError, match=r"^--dataset '.*texts': no text to train on"):
        prepare_data(str(folder), None, "tiny", True, 32)


def test_main_destroys_the_process_group_it_started(tmp_path, clean_env):
    """fsam-train as a command ends with no process group left (what Megatron's trainer does),
    whatever its exit status; an in-process call with an argv list keeps it for the caller (who
    may use the engine), and a group that was there before is left alone. One process."""
    code = f"""
import torch.distributed as dist
import fsam_ds.train as t
def fake(rc, name):
    def run(argv):
        dist.init_process_group("gloo", init_method="file://{tmp_path}/pg" + name, rank=0, world_size=1)
        return rc
    return run
out = []
for rc in (0, 2):  # as the command: argv None
    t._main = fake(rc, str(rc))
    out.append((t.main(), dist.is_initialized()))
t._main = fake(0, "inproc")  # in process: the caller's
out.append((t.main(["--x"]), dist.is_initialized()))
dist.destroy_process_group()
t._main = fake(0, "asked")
out.append((t.main(["--x"], destroy_process_group=True), dist.is_initialized()))
dist.init_process_group("gloo", init_method="file://{tmp_path}/pg_outer", rank=0, world_size=1)
t._main = lambda argv: 0
out.append((t.main(), dist.is_initialized()))
print("RESULT", out)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT [(0, False), (2, False), (0, True), (0, False), (0, True)]" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )
