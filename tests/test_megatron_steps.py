"""The Megatron step's bookkeeping, in one process (world size 1, TP = PP = 1, gloo):

* Adam's step count read at every optimizer layout, including the layout of
  TransformerEngine's and apex's FusedAdam (``param_groups[i]["step"]``), which megatron-core
  picks before torch's AdamW when either is installed. Before the fix the preconditioned types
  found no step there and silently ran unpreconditioned (denominators None);
* megatron-core's ``RerunStateMachine`` driven in mode ``disabled``, any other mode
  refused in one line before any work; exactly ``num_microbatches`` output-layer forwards in
  each pass of the functional types.

tests/megatron_step_worker.py runs all the cases in one process of its own (megatron_patches.cpu
patches torch for good) and these tests read its results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from launch import child_env, run
from optional import require_module

require_module("megatron.core", "megatron-core is an optional extra: pip install -e .[megatron]")

HERE = Path(__file__).resolve().parent
LAYOUTS = ["fp32", "distopt", "bf16", "bf16_distopt"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron_steps") / "results.pt"
    env = child_env(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    run([sys.executable, HERE / "megatron_step_worker.py", "--out", out], env=env, tail=3000)
    return torch.load(out, weights_only=False)


def _ok(case):
    assert "traceback" not in case, case.get("traceback")
    return case


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_in_param_groups_keeps_the_preconditioner(results, layout):
    case = _ok(results[f"group_step/{layout}"])
    torch_run, group_run, sam_run = case["torch"], case["group"], case["sam"]
    assert torch_run["adam_updates"] == group_run["adam_updates"] == 1
    # a view that looks for the step in the parameters' state only finds None here
    assert group_run["denominators"] is not None
    assert len(group_run["denominators"]) == len(torch_run["denominators"]) > 0
    for a, b in zip(torch_run["denominators"], group_run["denominators"]):
        assert torch.equal(a, b)
    # the same method bit for bit: PreconditionedSAM's weights with either layout ...
    for name, w in torch_run["weights"].items():
        assert torch.equal(w, group_run["weights"][name]), name
    # ... and not SAM's, which is what the preconditioned type silently becomes when the step is not found
    gap = max(float((sam_run["weights"][n] - group_run["weights"][n]).abs().max()) for n in sam_run["weights"])
    assert gap > 1e-3


def test_missing_step_count_raises(results):
    case = results["missing_step"]
    assert "traceback" in case, "a preconditioned step without Adam's step count must raise"
    assert "no step count" in case["error"] and "param_groups" in case["error"]


def test_zero_moments_before_the_first_update_are_step_zero(results):
    assert _ok(results["zero_moments"])["adam_updates"] == 0


def test_preconditioned_types_refuse_sgd(results):
    case = results["sgd_refused"]
    assert "traceback" in case and "accepted: optimizer 'adam'" in case["error"]


def test_one_output_forward_per_micro_batch_in_each_pass(results):
    assert _ok(results["stray_forward/none"]) == {"error": None, "count": 2}
    extra1 = _ok(results["stray_forward/pass 1"])
    assert "pass 1 ran 3 output-layer forwards for num_microbatches=2" in extra1["error"]
    assert extra1["restored"]  # raised before the weights were perturbed
    short2 = _ok(results["stray_forward/pass 2 short"])
    assert "pass 2 ran 1 output-layer forwards for num_microbatches=2" in short2["error"]
    assert short2["restored"]  # raised after theta was restored
    extra2 = _ok(results["stray_forward/pass 2"])
    assert "no logit gradient kept for micro-batch 2" in extra2["error"]


def test_rerun_state_machine_disabled_is_driven(results):
    case = _ok(results["rerun/disabled"])
    assert case["error"] is None and case["tuple_len"] == 8 and len(case["losses"]) == 2
    # as under Megatron-LM's own train_step: one initial run per step, then back to NOT_RUNNING_YET
    assert case["iteration"] == 1 and case["state"] == "NOT_RUNNING_YET"
    assert case["saved"] == [0, 0] and not case["unchanged"]


@pytest.mark.parametrize("mode", ["validate_results", "report_determinism_stats"])
def test_rerun_modes_other_than_disabled_are_refused_before_any_work(results, mode):
    case = _ok(results[f"rerun/{mode}"])
    assert case["error"] == (
        f"FSAMConfigError: --rerun-mode {mode} is not supported by the SAM types (the step "
        "replays its micro-batches itself for pass 2); accepted: --rerun-mode disabled"
    )
    assert "\n" not in case["error"]
    assert case["losses"] == [] and case["unchanged"] and case["iteration"] == -1


def test_rho_warmup_with_sgd_is_refused(results):
    """The rho warm-up counts applied AdamW updates; SGD has no such count (it would stay at 0)."""
    case = results["sgd_warmup_refused"]
    assert "traceback" in case and "rho_warmup_steps counts AdamW updates" in case["error"]
    assert "accepted: optimizer 'adam'" in case["error"]


# Every SAMConfig field on megatron-core: honoured (with the test that shows it) or refused.
HONOURED = {
    "method": "tests/test_megatron.py (every type against the reference, every layout)",
    "rho": "tests/test_megatron.py",
    "precondition_norm": "tests/test_megatron.py::test_bf16_perturbation_matches_the_fp32_formula",
    "rho_warmup_steps": "tests/test_megatron.py::test_injected_inf_skips_the_step_on_every_rank",
    "logit_grad_cache": "device, host: tests/test_megatron.py::test_host_logit_grad_cache_is_bit_identical_to_device",
    "ascent_every": "tests/test_megatron.py::test_ascent_every_matches_reference",
    "ascent_direction": "tests/test_megatron.py::test_momentum_direction_matches_reference",
}
REFUSED = {  # field: (a refused value, what the one-line error says)
    "logit_grad_cache": ("recompute", "logit_grad_cache 'recompute' is not supported on megatron-core"),
    "sharpness_every": (5, "sharpness_every 5 is not supported on megatron-core"),
}


def test_every_sam_config_field_is_honoured_or_refused():
    import dataclasses

    from fsam_ds.config import SAMConfig

    assert {f.name for f in dataclasses.fields(SAMConfig)} == set(HONOURED) | set(REFUSED)


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_unsupported_settings_are_refused_in_one_line_before_any_work(field):
    from fsam_ds.config import FSAMConfigError, SAMConfig
    from megatron_patches.sam import MegatronSAM, check_sam_config

    value, message = REFUSED[field]
    sam = SAMConfig(method="FunctionalSAM", rho=0.05, **{field: value})
    with pytest.raises(FSAMConfigError) as err:
        check_sam_config(sam)
    assert str(err.value).startswith(message) and "accepted: " in str(err.value) and "\n" not in str(err.value)
    # the step refuses it before it looks at the model or the optimizer
    with pytest.raises(FSAMConfigError, match="^" + message):
        MegatronSAM(model_chunks=None, optimizer=None, sam=sam)
    # the command line names its flag
    with pytest.raises(FSAMConfigError, match="^--sam-x "):
        check_sam_config(sam, {field: "--sam-x"})


def test_supported_settings_pass_the_check():
    from fsam_ds.config import SAMConfig
    from megatron_patches.sam import check_sam_config

    for sam in (
        SAMConfig(method="FunctionalSAM", rho=0.05, logit_grad_cache="host", ascent_every=3),
        SAMConfig(method="PreconditionedSAM", rho=0.05, ascent_direction="momentum", rho_warmup_steps=4),
        SAMConfig(method="SAM", rho=0.05, logit_grad_cache="recompute"),
    ):  # no g_F: the cache is unused
        check_sam_config(sam)
