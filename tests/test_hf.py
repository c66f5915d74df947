"""The real transformers Trainer (FSAMTrainer, 2 ranks under the deepspeed launcher, ZeRO 2 and 3,
gradient accumulation 2), TRL's SFTTrainer (FSAMTrainerMixin) and a user's own Accelerate loop
(FSAMAccelerator) against the independent reference; Trainer resume; a PEFT LoRA model. One launch
(tests/hf_worker.py) for all of them."""

from __future__ import annotations

import pytest
import torch
from common import LR, STEPS, reference_state
from launch import HERE, deepspeed, load_rank_results
from launch import load_case as _load
from reference import weight_distance

TOL = 2e-3  # fp32 round-off in units of lr * steps (as test_engine); other methods are >= 0.2 away
UNIT = LR * STEPS


@pytest.fixture(scope="module")
def hf_run(module_dir):
    deepspeed(HERE / "hf_worker.py", "--out", module_dir, timeout=1200, tail=6000)
    return module_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,method", [("trainer-pfsam-z2", "PreconditionedFunctionalSAM"), ("trainer-sam-z3", "SAM")]
)
def test_trainer_matches_reference(hf_run, name, method):
    state, ranks = _load(hf_run, name)
    ref_state, ref_losses = reference_state(method, world=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    assert weight_distance(state, reference_state("AdamW", world=2)[0]) / UNIT > 50 * TOL
    logs = ranks[0]["logs"]
    assert [e["step"] for e in logs] == list(range(1, STEPS + 1))
    # the Trainer's own log: its loss, DeepSpeed's grad_norm, and the method's eps_norm and rho
    assert [e["loss"] for e in logs] == pytest.approx(ref_losses, rel=1e-4)
    assert all(e["eps_norm"] == pytest.approx(0.05, rel=1e-5) and e["rho"] == 0.05 for e in logs)
    assert all(e["grad_norm"] > 0 and e["ascent_grad_norm"] > 0 for e in logs)
    # evaluate() after training: no weight changed, and both ranks agree
    evals = [r["eval_loss"] for r in load_rank_results(hf_run, name, kind="eval")]
    assert evals[0] == pytest.approx(evals[1]) and 0 < evals[0] < 10


@pytest.mark.slow
def test_trainer_resume_repeats_the_uninterrupted_losses(hf_run):
    full, full_ranks = _load(hf_run, "trainer-pfsam-z2")
    resumed, resumed_ranks = _load(hf_run, "trainer-pfsam-z2-resumed")
    tail = [e for e in resumed_ranks[0]["logs"] if e["step"] > 2]  # steps 1-2 come from the checkpoint
    assert [e["step"] for e in tail] == [3, 4]
    assert [e["loss"] for e in tail] == pytest.approx([e["loss"] for e in full_ranks[0]["logs"][2:]], rel=1e-6)
    assert weight_distance(full, resumed) < 1e-6


@pytest.mark.slow
def test_trainer_lora_perturbs_only_the_adapters(hf_run):
    from hf_worker import lora_model
    from reference import reference_train

    state, _ = _load(hf_run, "trainer-lora-pfsam-z2")
    initial = {k: v.detach().clone() for k, v in lora_model().state_dict().items()}
    frozen = [k for k in initial if "lora_" not in k]
    assert frozen and all(torch.equal(state[k], initial[k]) for k in frozen)
    ref = lora_model()
    reference_train(ref, STEPS, 2, 2, "PreconditionedFunctionalSAM", 0.05, lr=LR)
    ref_state = {k: v.detach().float() for k, v in ref.state_dict().items()}
    adapters = [k for k in initial if "lora_" in k]
    assert adapters and max(float((state[k] - ref_state[k]).abs().max()) for k in adapters) / UNIT < TOL
    # the adapters moved, and an AdamW run of the adapters lands far away
    adamw = lora_model()
    reference_train(adamw, STEPS, 2, 2, "AdamW", 0.0, lr=LR)
    assert max(float((state[k] - adamw.state_dict()[k]).abs().max()) for k in adapters) / UNIT > 10 * TOL


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,method", [("trl-psam-z2", "PreconditionedSAM"), ("trl-pfsam-z3", "PreconditionedFunctionalSAM")]
)
def test_trl_sft_trainer_matches_reference(hf_run, name, method):
    """TRL's SFTTrainer with FSAMTrainerMixin: PreconditionedSAM recomputes TRL's own loss (its fused
    LM head) at theta + eps; the functional type takes the logits through compute_loss_func."""
    state, ranks = _load(hf_run, name)
    ref_state, ref_losses = reference_state(method, world=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    assert weight_distance(state, reference_state("AdamW", world=2)[0]) / UNIT > 50 * TOL
    logs = ranks[0]["logs"]
    assert [e["loss"] for e in logs] == pytest.approx(ref_losses, rel=1e-4)
    assert all(e["eps_norm"] == pytest.approx(0.05, rel=1e-5) for e in logs)


@pytest.mark.slow
def test_accelerate_loop_matches_reference(hf_run):
    state, ranks = _load(hf_run, "accelerate-pfsam-z2")
    ref_state, ref_losses = reference_state("PreconditionedFunctionalSAM", world=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    metrics = ranks[0]["metrics"]
    assert len(metrics) == STEPS and all(m["method"] == "PreconditionedFunctionalSAM" for m in metrics)
    assert [m["loss"] for m in metrics] == pytest.approx(ref_losses, rel=1e-4)


def test_plain_trainer_with_a_sam_type_is_never_adamw():
    """Without FSAMTrainer a SAM type in the JSON cannot train silently: DeepSpeed refuses the
    unknown optimizer; FSAMTrainer takes it out before DeepSpeed sees it."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from fsam_ds.hf import sam_config_of

    cfg = HfTrainerDeepSpeedConfig(
        {
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "PreconditionedFunctionalSAM", "params": {"lr": "auto", "rho": 0.1}},
        }
    )
    sam = sam_config_of(cfg)
    assert sam.method == "PreconditionedFunctionalSAM" and sam.rho == 0.1
    assert cfg.config["optimizer"] == {"type": "AdamW", "params": {"lr": "auto"}}
    assert sam_config_of(cfg) is sam  # taken once


def test_lightning_deepspeed_strategy_is_refused_off_cuda():
    """Lightning's DeepSpeedStrategy runs only on CUDA: on this CPU the fit is refused before any
    step (never a plain AdamW step); the strategy has taken the method out of the config."""
    import lightning.pytorch as pl

    from fsam_ds.lightning import FSAMDeepSpeedStrategy

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.model(batch).square().mean()

        def configure_optimizers(self):
            return None  # the DeepSpeed config's optimizer section

    strategy = FSAMDeepSpeedStrategy(
        config={
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "FunctionalSAM", "params": {"lr": 1e-3, "rho": 0.1}},
        }
    )
    assert strategy.fsam_sam.method == "FunctionalSAM"
    assert strategy.config["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3}}
    module = Tiny()
    before = module.model.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(RuntimeError, match="only supported on CUDA"):
        trainer.fit(module, torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=1))
    assert torch.equal(module.model.weight, before)
