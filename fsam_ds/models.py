"""Llama-style causal language models from size presets, or from a local Hugging Face folder.

Presets are named by their parameter count with the preset's own vocabulary (untied input and
output embeddings, SwiGLU MLP, RMSNorm, RoPE, no dropout). ``24m`` to ``1.2b`` mirror the
decoder-only transformers of the Functional-SAM paper (23.9M, 42.5M, 117.9M, ~1.2B).

=======  ======  ======  =====  =====  ======  =======  ==============
preset   hidden  layers  heads  ffn    vocab   max pos  parameters
=======  ======  ======  =====  =====  ======  =======  ==============
tiny         32       2      4     64     512      256          53,408
2m          128       4      4    512    4096     1024       2,098,304
24m         256       8      4    896   32000     2048      23,990,528
42m         384      10      6   1024   32000     2048      42,278,784
118m        768      10     12   2048   32000     2048     119,947,008
1.2b       2048      22     16   5376   32000     2048   1,226,926,080
=======  ======  ======  =====  =====  ======  =======  ==============

The counts are those of :func:`count_parameters` on the built model (``tests`` check this
table). With another vocabulary size V the count changes by ``2 * hidden * (V - vocab)``.

Typical use::

    torch.manual_seed(0)
    model = build_model("24m", vocab_size=len(tokenizer), max_seq_len=1024)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

__all__ = [
    "ModelPreset",
    "PRESETS",
    "DEFAULT_ATTN_IMPLEMENTATION",
    "llama_config",
    "build_model",
    "count_parameters",
    "preset_num_parameters",
    "describe",
]

logger = logging.getLogger(__name__)

#: PyTorch's scaled-dot-product attention: deterministic on CPU and exact in float64 (the
#: "eager" implementation computes its softmax in float32, which float64 checks would notice).
DEFAULT_ATTN_IMPLEMENTATION = "sdpa"


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a Llama-style decoder; ``vocab_size`` is the tokenizer size to train for it."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=512,
        max_position_embeddings=256,
    ),
    "2m": ModelPreset(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=512,
        vocab_size=4096,
        max_position_embeddings=1024,
    ),
    "24m": ModelPreset(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=896,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "42m": ModelPreset(
        hidden_size=384,
        num_hidden_layers=10,
        num_attention_heads=6,
        num_key_value_heads=6,
        intermediate_size=1024,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "118m": ModelPreset(
        hidden_size=768,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=12,
        intermediate_size=2048,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "1.2b": ModelPreset(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5376,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
}


def _preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; accepted presets: {', '.join(PRESETS)}") from None


def llama_config(
    preset: str,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
) -> LlamaConfig:
    """The :class:`~transformers.LlamaConfig` of a preset.

    ``vocab_size`` replaces the preset's vocabulary (use the tokenizer's length);
    ``max_seq_len`` replaces ``max_position_embeddings``. Raises ``ValueError`` for an unknown
    preset, naming the accepted ones.
    """
    p = _preset(preset)
    vocab = p.vocab_size if vocab_size is None else int(vocab_size)
    max_pos = p.max_position_embeddings if max_seq_len is None else int(max_seq_len)
    if vocab <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab}")
    if max_pos <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_pos}")
    return LlamaConfig(  # type: ignore[call-arg]  # transformers' LlamaConfig takes these through **kwargs
        vocab_size=vocab,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=p.rms_norm_eps,
        rope_theta=p.rope_theta,
        tie_word_embeddings=p.tie_word_embeddings,
        attention_dropout=0.0,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation=attn_implementation,
    )


_ZERO3_HF_CONFIG = None  # transformers reads ZeRO-3 settings from a live HfDeepSpeedConfig


def _zero3_context(zero3_config: dict | None):
    """``deepspeed.zero.Init`` for ``zero3_config`` (a DeepSpeed config at stage 3), registered
    with transformers so that its weight initialisation and ``from_pretrained`` work shard-wise."""
    import contextlib

    if zero3_config is None:
        return contextlib.nullcontext()
    global _ZERO3_HF_CONFIG
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    _ZERO3_HF_CONFIG = HfDeepSpeedConfig(zero3_config)
    return deepspeed.zero.Init(config_dict_or_path=zero3_config)


def build_model(
    name_or_path: str | os.PathLike[str],
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = DEFAULT_ATTN_IMPLEMENTATION,
    zero3_config: dict | None = None,
) -> PreTrainedModel:
    """A causal LM on the CPU, in training mode, with parameters of ``dtype``.

    ``name_or_path`` is either a preset name (see :data:`PRESETS`), built from its config with
    a random initialisation drawn from torch's current RNG (seed with ``torch.manual_seed``;
    weights are drawn in float32 and then cast, so a seed gives the same model in every dtype),
    or a local folder holding a ``config.json`` (and weights), loaded with
    ``AutoModelForCausalLM.from_pretrained`` without network access. For a folder,
    ``vocab_size`` is checked against the model's (a larger one is an error) and
    ``max_seq_len`` is only checked for a warning.

    With ``zero3_config`` (a DeepSpeed config dict at ZeRO stage 3, distributed already
    initialised) the model is built inside ``deepspeed.zero.Init``: every parameter is partitioned
    as it is created and a folder's weights are loaded shard-wise, so no rank ever holds the
    whole model.
    """
    name = os.fspath(name_or_path)
    if name in PRESETS:
        config = llama_config(name, vocab_size, max_seq_len, attn_implementation)
        with _zero3_context(zero3_config):
            model: PreTrainedModel = LlamaForCausalLM(config)
        if zero3_config is None:
            model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' decorator typing of .to
        model.train()
        return model

    folder = Path(name).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        if zero3_config is not None:
            _zero3_context(zero3_config)  # from_pretrained then loads under zero.Init itself
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            attn_implementation=attn_implementation,
        )
        emb = model.get_input_embeddings().weight
        model_vocab = int(getattr(emb, "ds_shape", emb.shape)[0])  # type: ignore[index]  # Module.__getattr__'s union
        if vocab_size is not None and vocab_size > model_vocab:
            raise ValueError(
                f"model in {folder} has {model_vocab} token embeddings, fewer than the "
                f"requested vocab_size {vocab_size}"
            )
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_seq_len is not None and max_pos is not None and max_seq_len > max_pos:
            logger.warning(
                "max_seq_len %d exceeds max_position_embeddings %d of %s",
                max_seq_len,
                max_pos,
                folder,
            )
        model.train()
        return model

    raise ValueError(
        f"model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local folder; "
        "a model folder must contain config.json"
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (shared tensors counted once; ZeRO-3 partitioned ones
    counted at their full size)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += int(getattr(p, "ds_numel", p.numel()))
    return total


def preset_num_parameters(preset: str, vocab_size: int | None = None) -> int:
    """Parameter count of a preset, from a model built on the meta device (nothing allocated)."""
    config = llama_config(preset, vocab_size)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return count_parameters(model)


def describe(preset: str, vocab_size: int | None = None) -> str:
    """One line for logs, e.g. ``24m: hidden 256, 8 layers, 4 heads (4 kv), ffn 896,
    vocab 32000, 23.99M params``."""
    p = _preset(preset)
    fields = asdict(p)
    vocab = p.vocab_size if vocab_size is None else vocab_size
    n = preset_num_parameters(preset, vocab_size)
    if n >= 1e9:
        size = f"{n / 1e9:.3g}B"
    elif n >= 1e6:
        size = f"{n / 1e6:.4g}M"
    else:
        size = f"{n / 1e3:.4g}k"
    return (
        f"{preset}: hidden {fields['hidden_size']}, {fields['num_hidden_layers']} layers, "
        f"{fields['num_attention_heads']} heads ({fields['num_key_value_heads']} kv), "
        f"ffn {fields['intermediate_size']}, vocab {vocab}, {size} params"
    )
