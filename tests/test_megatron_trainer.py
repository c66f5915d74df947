"""fsam-megatron-train: resume across layouts, and every bad input refused before any work; the
Megatron-LM hooks (arguments, install) without Megatron-LM installed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from optional import require_module  # noqa: E402

require_module("megatron.core", "megatron-core is an optional extra: pip install -e .[megatron]")

from launch import ROOT, child_env  # noqa: E402
from launch import torchrun as _torchrun

from fsam_ds.config import FSAMConfigError  # noqa: E402
from megatron_patches import megatron_lm, trainer  # noqa: E402

COMMON = [
    "--model",
    "tiny",
    "--sam-type",
    "PreconditionedFunctionalSAM",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--seq-len",
    "32",
    "--eval-iters",
    "2",
    "--eval-interval",
    "0",
]


def torchrun(ranks: int, args, tmp: Path):
    return _torchrun(
        ranks, "-m", "megatron_patches.trainer", *args, env=child_env(tmp=tmp), timeout=600, tail=5000
    ).stdout


def losses(folder: Path) -> dict:
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.slow
def test_resume_at_another_layout_continues_the_run(tmp_path):
    """TP=2 for 4 iterations (checkpoints at 2 and 4); resumed from iteration 2 at DP=2 the
    iterations 3 and 4 have the same losses, and the LR/iteration/data position carry over."""
    run = tmp_path / "tp2"
    out = torchrun(
        2,
        COMMON
        + ["--tensor-model-parallel-size", "2", "--train-iters", "4", "--save-interval", "2", "--save", str(run)],
        tmp_path,
    )
    assert "final eval_loss" in out
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (run / "iter_0000002" / "hf" / "config.json").is_file()
    resumed = tmp_path / "dp2"
    out = torchrun(
        2, COMMON + ["--train-iters", "4", "--load", str(run), "--ckpt-step", "2", "--save", str(resumed)], tmp_path
    )
    assert "resumed from" in out and "at iteration 2" in out
    a, b = losses(run), losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    assert a[3] != pytest.approx(a[1], rel=1e-6)  # the losses do move: equality above can fail


def megatron_weights(run: Path, iteration: int):
    from fsam_ds.convert import MegatronSource

    return MegatronSource().read(run, str(iteration)).state_dict


@pytest.mark.slow
def test_resume_at_the_same_layout_is_exact_with_dropout(tmp_path):
    """TP=2 with attention dropout: 4 iterations uninterrupted vs 2, stop, resume, 2 more. The
    random states are part of the checkpoint, so losses and final weights are identical."""
    import torch
    from transformers import LlamaForCausalLM

    from fsam_ds.models import llama_config

    cfg = llama_config("tiny", max_seq_len=64)
    cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    args = COMMON[2:] + [
        "--model",
        str(tmp_path / "model"),
        "--tensor-model-parallel-size",
        "2",
        "--train-iters",
        "4",
        "--save-interval",
        "2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(2, args + ["--save", str(full)], tmp_path)
    out = torchrun(2, args + ["--load", str(full), "--ckpt-step", "2", "--save", str(part)], tmp_path)
    assert "random streams restart" not in out
    a, b = losses(full), losses(part)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7)
    wa, wb, w2 = megatron_weights(full, 4), megatron_weights(part, 4), megatron_weights(full, 2)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert max(float((wa[k] - w2[k]).abs().max()) for k in wa) > 1e-4


@pytest.mark.slow
def test_resume_keeps_the_stored_ascent_direction(tmp_path):
    """--sam-ascent-every 2 at TP=2: 4 iterations uninterrupted vs 3, stop, resume, 1 more. The
    4th iteration reuses the direction computed at the 3rd, which every rank saved with its part
    of the checkpoint (its own TP shard of the direction), so the resumed run ends on the same
    weights bit for bit. Measured: a resumed run that does not restore it computes a fresh
    direction at the 4th iteration and lands 1.1e-3 away (max abs; the 4th iteration itself moves the
    weights 1.0e-3); tolerance 0 (bit for bit)."""
    args = COMMON + [
        "--tensor-model-parallel-size",
        "2",
        "--train-iters",
        "4",
        "--save-interval",
        "3",
        "--sam-ascent-every",
        "2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(2, args + ["--save", str(full)], tmp_path)
    out = torchrun(2, args + ["--load", str(full), "--ckpt-step", "3", "--save", str(part)], tmp_path)
    assert "at iteration 3" in out
    import torch

    wa, wb, w3 = megatron_weights(full, 4), megatron_weights(part, 4), megatron_weights(full, 3)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert max(float((wa[k] - w3[k]).abs().max()) for k in wa) > 1e-4  # the 4th iteration does move them


def run_main(argv, monkeypatch, world=1):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return trainer.main(argv)


BAD = [
    (["--sam-type", "Adam"], "--sam-type 'Adam' is not supported"),
    (["--sam-type", "SAM", "--sam-rho", "-1"], "--sam-rho must be a number >= 0"),
    (["--sam-type", "PreconditionedSAM", "--sam-precondition-norm", "both"], "--sam-precondition-norm 'both'"),
    (["--sam-type", "SAM", "--sam-rho-warmup-steps", "-2"], "--sam-rho-warmup-steps must be an integer >= 0"),
    (["--tensor-model-parallel-size", "3"], "does not divide the world size 2"),
    (["--micro-batch-size", "4", "--global-batch-size", "6"], "--global-batch-size 6 is not a multiple"),
    (["--lr-decay-style", "exp"], "--lr-decay-style 'exp' is not supported; accepted: constant, linear, cosine"),
    (["--model", "7b"], "--model '7b' is neither a preset"),
    (["--lr", "-0.1"], "--lr must be >= 0"),
    (["--adam-beta2", "1.5"], "--adam-beta1/--adam-beta2 must be in [0, 1)"),
    (["--load", "/nonexistent/run"], "no latest_checkpointed_iteration.txt"),
    (["--ckpt-step", "3"], "--ckpt-step needs --load"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m.split()[0] + str(i) for i, (a, m) in enumerate(BAD)])
def test_bad_input_is_one_line_before_any_work(argv, message, monkeypatch, capsys):
    assert run_main(argv, monkeypatch, world=2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsam-megatron-train: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_bad_ckpt_step_and_latest(tmp_path, monkeypatch, capsys):
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    assert run_main(["--load", str(tmp_path)], monkeypatch) == 2
    assert "names '7', which is not a checkpoint folder" in capsys.readouterr().err
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2\n")
    assert run_main(["--load", str(tmp_path), "--ckpt-step", "5"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "--ckpt-step 5: no such checkpoint" in err and "accepted: 2" in err


def test_command_line_error_has_no_traceback(tmp_path, clean_env):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_patches.trainer", "--sam-type", "Nope"],
        cwd=ROOT,
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fsam-megatron-train: error: --sam-type 'Nope' is not supported; accepted: AdamW, SAM, PreconditionedSAM, "
        "FunctionalSAM, PreconditionedFunctionalSAM"
    ]


def test_megatron_lm_arguments():
    parser = megatron_lm.add_sam_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--sam-type",
            "preconditionedfunctionalsam",
            "--sam-rho",
            "0.2",
            "--sam-precondition-norm",
            "gradient",
            "--sam-rho-warmup-steps",
            "10",
        ]
    )
    sam = megatron_lm.sam_config_from_args(args)
    assert (sam.method, sam.rho, sam.precondition_norm, sam.rho_warmup_steps) == (
        "PreconditionedFunctionalSAM",
        0.2,
        "gradient",
        10,
    )
    assert sam.functional and sam.preconditioned
    assert not megatron_lm.sam_config_from_args(parser.parse_args([])).is_sam  # AdamW by default
    with pytest.raises(FSAMConfigError, match=r"^--sam-rho must be a number >= 0"):
        megatron_lm.sam_config_from_args(parser.parse_args(["--sam-type", "SAM", "--sam-rho", "-1"]))


def test_install_without_megatron_lm_changes_nothing():
    try:
        import megatron.training  # noqa: F401

        pytest.skip("Megatron-LM is installed here")
    except ImportError:
        pass
    assert megatron_lm.install() is False


SAM_BAD = [
    (
        ["--sam-type", "FunctionalSAM", "--sam-logit-grad-cache", "recompute"],
        "--sam-logit-grad-cache 'recompute' is not supported on megatron-core",
    ),
    (
        ["--sam-type", "FunctionalSAM", "--sam-logit-grad-cache", "disk"],
        "--sam-logit-grad-cache 'disk' is not supported",
    ),
    (["--sam-type", "SAM", "--sam-ascent-every", "0"], "--sam-ascent-every must be an integer >= 1"),
    (["--sam-type", "SAM", "--sam-ascent-direction", "adam"], "--sam-ascent-direction 'adam' is not supported"),
]


@pytest.mark.parametrize("argv,message", SAM_BAD, ids=[a[-2] + "=" + a[-1] for a, _ in SAM_BAD])
def test_sam_settings_megatron_does_not_run_are_one_line_before_any_work(argv, message, monkeypatch, capsys):
    assert run_main(argv, monkeypatch, world=2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fsam-megatron-train: error: ") and message in err, err
    assert len(err.splitlines()) == 1


def test_megatron_lm_arguments_of_the_other_sam_keys():
    parser = megatron_lm.add_sam_args(argparse.ArgumentParser())
    sam = megatron_lm.sam_config_from_args(
        parser.parse_args(["--sam-type", "FunctionalSAM", "--sam-ascent-every", "3", "--sam-logit-grad-cache", "host"])
    )
    assert (sam.ascent_every, sam.logit_grad_cache, sam.ascent_direction) == (3, "host", "gradient")
    sam = megatron_lm.sam_config_from_args(
        parser.parse_args(["--sam-type", "SAM", "--sam-ascent-direction", "momentum"])
    )
    assert sam.ascent_direction == "momentum"
