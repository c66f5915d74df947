"""Reading and validating the optimizer section of a DeepSpeed JSON config.

A standard DeepSpeed config selects the method with one word::

    "optimizer": {"type": "PreconditionedFunctionalSAM",
                  "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                             "rho": 0.1, "precondition_norm": "perturbation",
                             "rho_warmup_steps": 0, "logit_grad_cache": "device", "ascent_every": 1,
                             "ascent_direction": "gradient"}}

:func:`parse_config` returns the config DeepSpeed itself is given (the same section with
``"type": "AdamW"`` and the SAM keys removed, so ZeRO, loss scaling, clipping and schedulers behave
exactly as in a plain DeepSpeed job) and a :class:`SAMConfig` with the method's own settings.
Every problem is reported as one :class:`FSAMConfigError` naming the key and the accepted values,
before any model is built.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from .names import ASCENT_DIRECTIONS, LOGIT_GRAD_CACHES, METHODS, PRECONDITION_NORMS, SAM_METHODS

__all__ = [
    "METHODS",
    "SAM_METHODS",
    "LOGIT_GRAD_CACHES",
    "ASCENT_DIRECTIONS",
    "PRECONDITION_NORMS",
    "ADAMW_KEYS",
    "SAM_KEYS",
    "DIAGNOSTIC_KEYS",
    "SAM_DEFAULTS",
    "FSAMConfigError",
    "SAMConfig",
    "load_json_config",
    "canonical_method",
    "sam_config",
    "parse_config",
    "take_sam_section",
    "zero_stage",
]

# AdamW parameters DeepSpeed's own Adam accepts, and the SAM keys on top of them.
ADAMW_KEYS = (
    "lr",
    "betas",
    "eps",
    "weight_decay",
    "bias_correction",
    "torch_adam",
    "adam_w_mode",
    "fp32_optimizer_states",
)
SAM_KEYS = ("rho", "precondition_norm", "rho_warmup_steps", "logit_grad_cache", "ascent_every", "ascent_direction")
# accepted for every type, AdamW included; never handed to DeepSpeed
DIAGNOSTIC_KEYS = ("sharpness_every",)
SAM_DEFAULTS = {
    "rho": 0.05,
    "precondition_norm": "perturbation",
    "rho_warmup_steps": 0,
    "logit_grad_cache": "device",
    "ascent_every": 1,
    "ascent_direction": "gradient",
}


class FSAMConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass(frozen=True)
class SAMConfig:
    """The method's settings, read from ``optimizer.type`` and ``optimizer.params``."""

    method: str = "AdamW"
    rho: float = 0.0
    precondition_norm: str = "perturbation"
    rho_warmup_steps: int = 0
    logit_grad_cache: str = "device"
    # recompute the ascent direction every k optimizer steps and reuse it (rescaled to the current
    # rho) in between; 1 = exact
    ascent_every: int = 1
    # "gradient": eps from this step's pass-1 gradient; "momentum": from AdamW's first moment m
    # (eps = rho M^-1 m / ||M^-1 m|| preconditioned, rho m / ||m|| otherwise), so SAM has no pass 1
    # and FunctionalSAM's pass 1 is a forward at theta for g_F; exact until AdamW's first update
    ascent_direction: str = "gradient"
    sharpness_every: int = 0  # sharpness diagnostics every N optimizer steps (0: off)

    @property
    def is_sam(self) -> bool:
        return self.method in SAM_METHODS

    @property
    def preconditioned(self) -> bool:
        return self.method.startswith("Preconditioned")

    @property
    def functional(self) -> bool:
        return self.method.endswith("FunctionalSAM")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int_at_least(label: str, value: Any, low: int, note: str = "") -> None:
    """Refuse ``value`` unless it is an integer (not a bool) >= ``low``; ``note`` follows the bound."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise FSAMConfigError(f"{label} must be an integer >= {low}{note}, got {value!r}")


def _check_one_of(label: str, value: Any, accepted: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of the strings ``accepted``."""
    if not isinstance(value, str) or value not in accepted:
        raise FSAMConfigError(f"{label} {value!r} is not supported; accepted: {', '.join(accepted)}")


def load_json_config(config: Union[str, os.PathLike[str], Mapping[str, Any]]) -> Dict[str, Any]:
    """A deep copy of a config given as a dict or a JSON file path."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    path = Path(config)
    if not path.is_file():
        raise FSAMConfigError(f"deepspeed config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FSAMConfigError(f"deepspeed config: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FSAMConfigError(f"deepspeed config: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def canonical_method(name: Any, key_name: str = "optimizer.type") -> str:
    """The method ``name`` stands for (any case); errors call the setting ``key_name`` (the
    DeepSpeed key, or a command-line flag such as ``--sam-type``)."""
    if not isinstance(name, str):
        raise FSAMConfigError(f"{key_name} must be a string, one of {', '.join(METHODS)}; got {name!r}")
    for m in METHODS:
        if m.lower() == name.lower():
            return m
    raise FSAMConfigError(f"{key_name} {name!r} is not supported; accepted: {', '.join(METHODS)}")


def _check_adamw_params(params: Mapping[str, Any]) -> None:
    params = {k: v for k, v in params.items() if v != "auto"}  # Hugging Face fills "auto" values later
    if "lr" in params and (not _is_number(params["lr"]) or params["lr"] < 0):
        raise FSAMConfigError(f"optimizer.params.lr must be a number >= 0, got {params['lr']!r}")
    if "betas" in params:
        b = params["betas"]
        if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(_is_number(x) and 0 <= x < 1 for x in b):
            raise FSAMConfigError(f"optimizer.params.betas must be two numbers in [0, 1), got {b!r}")
    if "eps" in params and (not _is_number(params["eps"]) or params["eps"] <= 0):
        raise FSAMConfigError(f"optimizer.params.eps must be a number > 0, got {params['eps']!r}")
    if "weight_decay" in params and (not _is_number(params["weight_decay"]) or params["weight_decay"] < 0):
        raise FSAMConfigError(f"optimizer.params.weight_decay must be a number >= 0, got {params['weight_decay']!r}")
    for key in ("bias_correction", "torch_adam", "adam_w_mode", "fp32_optimizer_states"):
        if key in params and not isinstance(params[key], bool):
            raise FSAMConfigError(f"optimizer.params.{key} must be true or false, got {params[key]!r}")
    if params.get("adam_w_mode") is False:
        raise FSAMConfigError(
            "optimizer.params.adam_w_mode: false is not accepted; the base optimizer is AdamW "
            "(decoupled weight decay); accepted: true or leave it out"
        )


def sam_config(method: str, params: Mapping[str, Any], key_names: Optional[Mapping[str, str]] = None) -> SAMConfig:
    """The :class:`SAMConfig` of a SAM type ``method`` from its settings ``params`` (the SAM keys;
    the missing ones take :data:`SAM_DEFAULTS`). An error names the setting by its entry in
    ``key_names`` (e.g. ``{"rho": "--sam-rho"}`` for a command line), else as the DeepSpeed key
    ``optimizer.params.<key>``."""
    names = dict(key_names or {})

    def key(k: str) -> str:
        return names.get(k, f"optimizer.params.{k}")

    values = {**SAM_DEFAULTS, **{k: params[k] for k in SAM_KEYS if k in params}}
    rho = values["rho"]
    if not _is_number(rho) or rho < 0:
        raise FSAMConfigError(f"{key('rho')} must be a number >= 0, got {rho!r}")
    norm = values["precondition_norm"]
    _check_one_of(key("precondition_norm"), norm, PRECONDITION_NORMS)
    warm = values["rho_warmup_steps"]
    _check_int_at_least(key("rho_warmup_steps"), warm, 0)
    cache = values["logit_grad_cache"]
    _check_one_of(key("logit_grad_cache"), cache, LOGIT_GRAD_CACHES)
    every = values["ascent_every"]
    _check_int_at_least(key("ascent_every"), every, 1, " (1: exact)")
    direction = values["ascent_direction"]
    _check_one_of(key("ascent_direction"), direction, ASCENT_DIRECTIONS)
    if direction == "momentum" and every > 1:
        raise FSAMConfigError(
            f'{key("ascent_direction")} "momentum" with ascent_every > 1 is not supported '
            f'(got ascent_every {every}); accepted: ascent_every 1 with "momentum", or '
            'ascent_direction "gradient"'
        )
    return SAMConfig(
        method=method,
        rho=float(rho),
        precondition_norm=norm,
        rho_warmup_steps=warm,
        logit_grad_cache=cache,
        ascent_every=every,
        ascent_direction=direction,
    )


def parse_config(config: Union[str, os.PathLike[str], Mapping[str, Any]]) -> Tuple[Dict[str, Any], SAMConfig]:
    """Split a DeepSpeed config into (config for DeepSpeed, :class:`SAMConfig`).

    Raises :class:`FSAMConfigError` for an unknown method or key, a value of the wrong type or
    range, or a combination this version does not support.
    """
    ds_config = load_json_config(config)
    return ds_config, take_sam_section(ds_config)


def take_sam_section(ds_config: Dict[str, Any]) -> SAMConfig:
    """:func:`parse_config` on a config dict in place: its optimizer section becomes DeepSpeed's
    AdamW, and the method's settings are returned. Hugging Face's ``"auto"`` values (filled in
    by the Trainer or Accelerate later) are accepted wherever DeepSpeed's own keys allow them."""
    opt = ds_config.get("optimizer")
    if opt is None:
        raise FSAMConfigError(
            'deepspeed config: the "optimizer" section is missing; fsam_ds needs '
            f'"optimizer": {{"type": one of {", ".join(METHODS)}, "params": {{...}}}}'
        )
    if not isinstance(opt, dict):
        raise FSAMConfigError(f'deepspeed config: "optimizer" must be an object, got {type(opt).__name__}')
    unknown_section = sorted(set(opt) - {"type", "params"})
    if unknown_section:
        raise FSAMConfigError(f"optimizer.{unknown_section[0]} is not a known key; accepted: type, params")
    method = canonical_method(opt.get("type"))
    params = opt.get("params", {})
    if not isinstance(params, dict):
        raise FSAMConfigError(f"optimizer.params must be an object, got {type(params).__name__}")
    accepted = ADAMW_KEYS + DIAGNOSTIC_KEYS + (SAM_KEYS if method in SAM_METHODS else ())
    for key in params:
        if key not in accepted:
            hint = " (it belongs to the SAM types only)" if key in SAM_KEYS else ""
            raise FSAMConfigError(
                f"optimizer.params.{key} is not accepted for {method}{hint}; accepted: {', '.join(accepted)}"
            )
    _check_adamw_params(params)
    sam = sam_config(method, params) if method in SAM_METHODS else SAMConfig(method=method)
    every = params.get("sharpness_every", 0)
    _check_int_at_least("optimizer.params.sharpness_every", every, 0, " (0: off)")
    if every:
        sam = dataclasses.replace(sam, sharpness_every=every)

    if sam.is_sam:
        _check_sam_compatibility(ds_config)
    ds_config["optimizer"] = {"type": "AdamW", "params": {k: v for k, v in params.items() if k in ADAMW_KEYS}}
    return sam


def zero_stage(ds_config: Mapping[str, Any]) -> int:
    zero = ds_config.get("zero_optimization", {}) or {}
    if not isinstance(zero, dict):
        raise FSAMConfigError(f"zero_optimization must be an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise FSAMConfigError(f"zero_optimization.stage must be one of 0, 1, 2, 3; got {stage!r}")
    return int(stage)


def _enabled(ds_config: Mapping[str, Any], key: str) -> bool:
    section = ds_config.get(key)
    return isinstance(section, dict) and section.get("enabled", False) is True


def _check_sam_compatibility(ds_config: Mapping[str, Any]) -> None:
    stage = zero_stage(ds_config)  # every stage DeepSpeed has (0-3) runs the SAM types
    zero = ds_config.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none") if isinstance(zero.get(key) or {}, dict) else "?"
        if device not in ("none", None):
            raise FSAMConfigError(
                f"zero_optimization.{key}.device {device!r} is not supported with the SAM types "
                'in this version; accepted: "none" (or leave the section out)'
            )
    if _enabled(ds_config, "fp16") and _enabled(ds_config, "bf16"):
        raise FSAMConfigError("fp16.enabled and bf16.enabled are both true; accepted: at most one of them")
    if _enabled(ds_config, "fp16") and stage == 0:
        raise FSAMConfigError(
            "fp16.enabled with zero_optimization.stage 0 is not supported with the SAM types: "
            "DeepSpeed's stage-0 fp16 path does not scale the loss in engine.backward while its "
            "FP16_Optimizer divides the gradient by the loss scale; accepted: bf16, or fp16 with "
            "zero_optimization.stage 1, 2 or 3"
        )
    if ds_config.get("managed_gradient_accumulation", True) is False:
        raise FSAMConfigError(
            "managed_gradient_accumulation: false is not supported with the SAM types (the ascent "
            "needs the reduced gradient before the step); accepted: true or leave it out"
        )
    tp = ds_config.get("tensor_parallel")
    autotp = tp.get("autotp_size", 0) if isinstance(tp, dict) else 0
    if autotp not in (0, 1, "auto", None):
        raise FSAMConfigError(
            f"tensor_parallel.autotp_size {autotp!r} is not supported with the SAM types (the norms "
            "would count tensor-parallel shards per rank); accepted: 0 or 1, or use Megatron-core "
            "(megatron_patches) for tensor parallelism"
        )
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if gas != "auto":
        _check_int_at_least("gradient_accumulation_steps", gas, 1)
