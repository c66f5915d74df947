"""Config parsing: what DeepSpeed receives, and one clear error per bad input."""

from __future__ import annotations

import json

import pytest
import torch
from common import cfg_with, ds_config
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import tiny_llama

import fsam_ds
from fsam_ds.config import METHODS, SAM_KEYS, FSAMConfigError, parse_config


def base(method="PreconditionedFunctionalSAM", **params):
    p = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if method != "AdamW":
        p["rho"] = 0.1
    p.update(params)
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "optimizer": {"type": method, "params": p}}


@pytest.mark.parametrize("method", METHODS)
def test_deepspeed_gets_plain_adamw(method):
    ds, sam = parse_config(base(method))
    assert ds["optimizer"]["type"] == "AdamW"
    assert not set(ds["optimizer"]["params"]) & set(SAM_KEYS)
    assert ds["optimizer"]["params"]["lr"] == 1e-3 and ds["gradient_clipping"] == 1.0
    assert sam.method == method
    assert sam.is_sam == (method != "AdamW")
    assert sam.functional == ("Functional" in method)
    assert sam.preconditioned == method.startswith("Preconditioned")


def test_defaults_and_case_insensitive_type(tmp_path):
    cfg = base("preconditionedfunctionalsam")
    del cfg["optimizer"]["params"]["rho"]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    _, sam = parse_config(path)
    assert sam.method == "PreconditionedFunctionalSAM"
    assert (sam.rho, sam.precondition_norm, sam.rho_warmup_steps, sam.logit_grad_cache) == (
        0.05,
        "perturbation",
        0,
        "device",
    )


BAD = [
    (lambda c: c["optimizer"].update(type="Lion"), "optimizer.type 'Lion' is not supported; accepted: AdamW, SAM"),
    (lambda c: c["optimizer"].update(type=3), "optimizer.type must be a string"),
    (lambda c: c.pop("optimizer"), '"optimizer" section is missing'),
    (lambda c: c["optimizer"].update(foo=1), "optimizer.foo is not a known key; accepted: type, params"),
    (lambda c: c["optimizer"]["params"].update(rhoo=0.1), "optimizer.params.rhoo is not accepted"),
    (lambda c: c["optimizer"]["params"].update(rho=-0.1), "optimizer.params.rho must be a number >= 0"),
    (lambda c: c["optimizer"]["params"].update(rho="0.1"), "optimizer.params.rho must be a number >= 0"),
    (lambda c: c["optimizer"]["params"].update(rho=float("nan")), "optimizer.params.rho must be a number >= 0"),
    (
        lambda c: c["optimizer"]["params"].update(precondition_norm="both"),
        "precondition_norm 'both' is not supported; accepted: perturbation, gradient",
    ),
    (lambda c: c["optimizer"]["params"].update(rho_warmup_steps=1.5), "rho_warmup_steps must be an integer >= 0"),
    (lambda c: c["optimizer"]["params"].update(logit_grad_cache="disk"), "logit_grad_cache 'disk' is not supported"),
    (lambda c: c["optimizer"]["params"].update(lr=-1), "optimizer.params.lr must be a number >= 0"),
    (lambda c: c["optimizer"]["params"].update(betas=[0.9]), "optimizer.params.betas must be two numbers"),
    (lambda c: c["optimizer"]["params"].update(eps=0), "optimizer.params.eps must be a number > 0"),
    (lambda c: c["optimizer"]["params"].update(weight_decay=True), "optimizer.params.weight_decay"),
    (lambda c: c["optimizer"]["params"].update(adam_w_mode=False), "adam_w_mode: false is not accepted"),
    (lambda c: c["optimizer"]["params"].update(max_grad_norm=1.0), "optimizer.params.max_grad_norm is not accepted"),
    (
        lambda c: c.update(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}}),
        "zero_optimization.offload_optimizer.device 'cpu' is not supported with the SAM types",
    ),
    (
        lambda c: c.update(zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}}),
        "zero_optimization.offload_param.device 'nvme' is not supported",
    ),
    (lambda c: c.update(zero_optimization={"stage": 5}), "zero_optimization.stage must be one of 0, 1, 2, 3"),
    (lambda c: c.update(fp16={"enabled": True}, bf16={"enabled": True}), "fp16.enabled and bf16.enabled"),
    (lambda c: c.update(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an integer >= 1"),
    # DeepSpeed's stage-0 fp16 path is unsound (the loss is not scaled, the gradient is unscaled)
    (lambda c: c.update(fp16={"enabled": True}), "fp16.enabled with zero_optimization.stage 0 is not supported"),
    (lambda c: c["optimizer"].update(params=[1]), "optimizer.params must be an object"),
]


@pytest.mark.parametrize("mutate,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_gives_one_clear_error(mutate, message):
    cfg = base()
    mutate(cfg)
    with pytest.raises(FSAMConfigError) as err:
        parse_config(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sam_keys_refused_for_adamw():
    with pytest.raises(FSAMConfigError, match="optimizer.params.rho is not accepted for AdamW"):
        parse_config(base("AdamW", rho=0.1))
    # AdamW runs as plain DeepSpeed, offload included
    cfg = base("AdamW")
    cfg["zero_optimization"] = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    parse_config(cfg)


def test_bad_files(tmp_path):
    with pytest.raises(FSAMConfigError, match="file not found"):
        parse_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FSAMConfigError, match="not valid JSON"):
        parse_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(FSAMConfigError, match="must hold a JSON object"):
        parse_config(bad)


def test_functional_method_needs_logits():
    import torch

    import fsam_ds

    class LossOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids, **_):
            return (self.w.sum() * input_ids.float().mean()).reshape(())

    cfg = base("FunctionalSAM")
    cfg["gradient_accumulation_steps"] = 1
    engine, *_ = fsam_ds.initialize(model=LossOnly(), config=cfg)
    before = engine.module.w.detach().clone()
    with pytest.raises(FSAMConfigError, match="needs a model whose forward returns logits.*Accepted for such"):
        engine.train_batch(iter([{"input_ids": torch.ones(2, 4, dtype=torch.long)}]))
    assert torch.equal(engine.module.w, before)


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.lists(st.floats(0, 1), max_size=3),
)
keys = st.sampled_from(
    [
        "lr",
        "betas",
        "eps",
        "weight_decay",
        "rho",
        "precondition_norm",
        "rho_warmup_steps",
        "logit_grad_cache",
        "bias_correction",
        "torch_adam",
        "momentum",
        "Rho",
    ]
)


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(list(METHODS) + ["sgd", "sam "]), params=st.dictionaries(keys, values, max_size=5))
def test_parser_property(method, params):
    """Any optimizer section either parses into a plain-AdamW DeepSpeed section or raises one
    FSAMConfigError; nothing else escapes."""
    cfg = {"optimizer": {"type": method, "params": params}}
    try:
        ds, sam = parse_config(cfg)
    except FSAMConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert ds["optimizer"]["type"] == "AdamW"
    assert set(ds["optimizer"]["params"]) <= {"lr", "betas", "eps", "weight_decay", "bias_correction", "torch_adam"}
    assert sam.rho >= 0 and sam.precondition_norm in ("perturbation", "gradient")


def test_shipped_configs_parse():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "ds_configs").rglob("*.json"))
    assert len(files) == 20
    for f in files:
        ds, sam = parse_config(f)
        assert sam.method.lower().replace("_", "") == f.stem.replace("_", ""), f
        # ds_configs/hf/: Hugging Face's "auto" values, filled in from TrainingArguments
        assert ds["gradient_clipping"] == ("auto" if f.parent.name == "hf" else 1.0)


# ---- settings refused before training (one process) ------------------------------------------
# multi-rank refusals stay in their launches


def test_recompute_refuses_a_model_without_linear_output():
    import fsam_ds
    from fsam_ds import FSAMConfigError

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4))

        def forward(self, input_ids):
            return self.w[input_ids]

    with pytest.raises(
        FSAMConfigError, match='logit_grad_cache "recompute" needs .*accepted for this model: device, host'
    ):
        fsam_ds.initialize(model=Bare(), config=cfg_with("FunctionalSAM", logit_grad_cache="recompute"))


@pytest.mark.parametrize("value", ["disk", None, 1])
def test_bad_cache_is_refused(value):
    from fsam_ds import FSAMConfigError, parse_config

    with pytest.raises(FSAMConfigError, match="logit_grad_cache .* accepted: device, host, recompute"):
        parse_config(cfg_with("FunctionalSAM", logit_grad_cache=value))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_bad_ascent_every_is_refused(value):
    from fsam_ds import FSAMConfigError, parse_config

    with pytest.raises(FSAMConfigError, match=r"optimizer.params.ascent_every must be an integer >= 1"):
        parse_config(cfg_with("SAM", ascent_every=value))


def test_ascent_every_is_a_sam_key():
    from fsam_ds import FSAMConfigError, parse_config

    ds, sam = parse_config(cfg_with("FunctionalSAM", ascent_every=4))
    assert sam.ascent_every == 4 and "ascent_every" not in ds["optimizer"]["params"]
    assert parse_config(cfg_with("SAM"))[1].ascent_every == 1
    cfg = ds_config("AdamW")
    cfg["optimizer"]["params"]["ascent_every"] = 2
    with pytest.raises(FSAMConfigError, match="ascent_every is not accepted for AdamW"):
        parse_config(cfg)


@pytest.mark.parametrize("value", ["adam", None, 1, ["momentum"], "Momentum"])
def test_bad_ascent_direction_is_refused(value):
    from fsam_ds import FSAMConfigError, parse_config

    with pytest.raises(FSAMConfigError, match=r"optimizer.params.ascent_direction .* accepted: gradient, momentum"):
        parse_config(cfg_with("PreconditionedFunctionalSAM", ascent_direction=value))


def test_ascent_direction_is_a_sam_key():
    from fsam_ds import FSAMConfigError, parse_config

    ds, sam = parse_config(cfg_with("PreconditionedSAM", ascent_direction="momentum"))
    assert sam.ascent_direction == "momentum" and "ascent_direction" not in ds["optimizer"]["params"]
    assert parse_config(cfg_with("SAM"))[1].ascent_direction == "gradient"
    cfg = ds_config("AdamW")
    cfg["optimizer"]["params"]["ascent_direction"] = "momentum"
    with pytest.raises(FSAMConfigError, match="ascent_direction is not accepted for AdamW"):
        parse_config(cfg)
    with pytest.raises(FSAMConfigError, match=r'"momentum" with ascent_every > 1 is not supported.*accepted'):
        parse_config(cfg_with("SAM", ascent_direction="momentum", ascent_every=2))


@pytest.mark.parametrize(
    "section,match",
    [
        ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation"),
        ({"tensor_parallel": {"autotp_size": 2}}, "autotp_size"),
    ],
)
def test_parallel_settings_the_norms_do_not_know_are_refused(section, match):
    with pytest.raises(FSAMConfigError, match=match):
        fsam_ds.parse_config(ds_config("SAM", **section))
    fsam_ds.parse_config(ds_config("AdamW", **section))  # plain AdamW: DeepSpeed's business


def test_mpu_is_refused():
    with pytest.raises(FSAMConfigError, match="mpu"):
        fsam_ds.initialize(model=tiny_llama(0), config=ds_config("SAM"), mpu=object())


def test_deepspeed_moe_layers_are_refused_for_the_sam_types():
    """Expert-parallel parameters would be normed over the wrong group: refused before any step
    (AdamW runs them as plain DeepSpeed)."""
    from deepspeed.moe.layer import MoE

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2, ep_size=1, k=1)
            self.out = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.moe(x)[0])

    with pytest.raises(FSAMConfigError, match="MoE"):
        fsam_ds.initialize(model=Experts(), config=ds_config("SAM"))
    assert fsam_ds.initialize(model=Experts(), config=ds_config("AdamW"))[0].has_moe_layers


@pytest.mark.parametrize("method", ["AdamW", "PreconditionedFunctionalSAM"])
def test_sharpness_every_config(method):
    ds, sam = parse_config(cfg_with(method, sharpness_every=5))
    assert sam.sharpness_every == 5 and "sharpness_every" not in ds["optimizer"]["params"]
    assert parse_config(cfg_with(method))[1].sharpness_every == 0
    for bad in (-1, 1.5, True, "2", None):
        with pytest.raises(FSAMConfigError) as err:
            parse_config(cfg_with(method, sharpness_every=bad))
        assert str(err.value).startswith("optimizer.params.sharpness_every must be an integer >= 0")
        assert "\n" not in str(err.value)
