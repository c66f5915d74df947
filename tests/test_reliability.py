"""Long runs die and restart: a rank killed mid-step, a rank killed mid-save, and resume.

Two ranks under the deepspeed launcher, ZeRO-3, preconditioned FunctionalSAM, on a model with
attention dropout (so the random state must carry over too):

* an uninterrupted run of 6 steps (checkpoints at 2, 4, 6);
* the same run with rank 1 SIGKILLed in step 5 between the two passes: the job ends non-zero
  within 60 s, ``latest`` names step4, which loads;
* resumed from there to step 6: the losses of steps 5 and 6 and the final weights equal the
  uninterrupted run's;
* rank 1 SIGKILLed while writing its ZeRO files of step 4: ``latest`` still names step2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from common import read_metrics
from launch import HERE, ROOT, child_env, deepspeed

from fsam_ds.train import train_argv  # noqa: E402

WORKER = HERE / "fault_worker.py"


def _config(path: Path) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "preconditioned_functional_sam.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 4
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from fsam_ds.models import llama_config

    work = tmp_path_factory.mktemp("reliability")
    _config(work / "ds.json")
    cfg = llama_config("tiny", max_seq_len=64)
    cfg.attention_dropout = 0.1
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(work / "model")
    return work


def run(work: Path, save: str, steps: int, fault: str = "", resume: bool = False, timeout: int = 400):
    mark = work / f"{save}.killed"
    env = child_env(work / "cache", FSAM_TEST_FAULT=fault, FSAM_TEST_FAULT_MARK=mark)
    proc = deepspeed(
        WORKER,
        *train_argv(
            work / "ds.json", work / save, steps, model=work / "model", eval_batches=2, save_every=2, resume=resume
        ),
        env=env,
        cwd=work,
        timeout=timeout,
        check=False,
    )
    ended = time.time()
    return proc, (ended - float(mark.read_text())) if mark.is_file() else None


def fp32_weights(folder: Path, tag: str):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)


@pytest.fixture(scope="module")
def runs(work):
    full, _ = run(work, "full", 6)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    killed, after_kill = run(work, "killed", 6, fault="between_passes:1:5")
    resumed, _ = run(work, "killed", 6, resume=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    saving, after_save_kill = run(work, "saving", 4, fault="saving:1:step4")
    return {"killed": (killed, after_kill), "resumed": resumed, "saving": (saving, after_save_kill)}


@pytest.mark.slow
def test_lost_rank_ends_the_job_quickly(runs, work):
    proc, after_kill = runs["killed"]
    assert proc.returncode != 0
    assert after_kill is not None and after_kill < 60, after_kill
    assert (work / "killed" / "latest").read_text().strip() == "step6"  # written by the resumed run
    assert "resumed from" in runs["resumed"].stdout and "at step 4" in runs["resumed"].stdout


@pytest.mark.slow
def test_resume_after_a_lost_rank_reproduces_the_run(runs, work):
    full_steps, _ = read_metrics(work / "full")
    resumed_steps, _ = read_metrics(work / "killed")
    full = {r["step"]: r["loss"] for r in full_steps}
    got = {r["step"]: r["loss"] for r in resumed_steps}
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the records of the lost step 5 were dropped on resume
    for step in (5, 6):
        assert got[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7)
    assert full[5] != pytest.approx(full[4], rel=1e-4)  # losses move: the equality can fail
    a, b = fp32_weights(work / "full", "step6"), fp32_weights(work / "killed", "step6")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).detach().abs().max()) for k in a) <= 1e-6
    start = fp32_weights(work / "full", "step4")
    assert max(float((a[k] - start[k]).detach().abs().max()) for k in a) > 1e-4


@pytest.mark.slow
def test_checkpoint_being_written_is_never_latest(runs, work):
    proc, after_kill = runs["saving"]
    assert proc.returncode != 0 and after_kill is not None and after_kill < 60
    assert (work / "saving" / "latest").read_text().strip() == "step2"
    assert not (work / "saving" / "latest.tmp").exists()
    fp32_weights(work / "saving", "step2")  # the last published checkpoint loads
