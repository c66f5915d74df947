"""Llama-style models on megatron-core: configs, and weights between Hugging Face and
megatron-core's ``GPTModel`` at any tensor/pipeline-parallel layout.

The megatron model is ``GPTModel`` with the local layer spec (no TransformerEngine, no apex):
RMSNorm, RoPE (rotate-half, like Hugging Face), SwiGLU, no biases. Its weights, in the
TP=1/PP=1 naming used throughout this module ("full megatron" state dicts, global layer
numbers), map to Hugging Face ``LlamaForCausalLM`` as follows (``qpg = heads / query_groups``,
``hd`` the head dimension)::

    embedding.word_embeddings.weight                  model.embed_tokens.weight
    decoder.layers.{i}.input_layernorm.weight         model.layers.{i}.input_layernorm.weight
    decoder.layers.{i}.self_attention.linear_qkv.weight
        rows grouped by query group g = 0..groups-1:  [q rows of heads g*qpg .. (g+1)*qpg-1,
                                                        k rows of group g, v rows of group g]
                                                      from q_proj, k_proj, v_proj
    decoder.layers.{i}.self_attention.linear_proj.weight  ...self_attn.o_proj.weight
    decoder.layers.{i}.pre_mlp_layernorm.weight       ...post_attention_layernorm.weight
    decoder.layers.{i}.mlp.linear_fc1.weight          cat([mlp.gate_proj, mlp.up_proj], dim 0)
    decoder.layers.{i}.mlp.linear_fc2.weight          ...mlp.down_proj.weight
    decoder.final_layernorm.weight                    model.norm.weight
    output_layer.weight                               lm_head.weight (absent when tied)

Tensor parallelism splits a "full" weight along the parameter's own ``partition_dim`` (megatron
sets ``tensor_model_parallel``/``partition_dim`` on every split parameter): the vocabulary of the
embedding and output layer, whole query groups of ``linear_qkv`` (the group-major row order above
makes a contiguous split exact), the rows of ``linear_fc1`` *separately* for its gate and up
halves (each rank holds ``[gate shard; up shard]``), the columns of ``linear_proj`` and
``linear_fc2``. Norms are replicated. Pipeline stages hold consecutive layers; a local layer's
global number is its ``layer_number - 1``.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


class LayoutError(ValueError):
    """A model, layout or checkpoint that this module cannot map."""


# ---- configs ------------------------------------------------------------------------------------


def rope_theta_of(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    if theta is None:
        params = getattr(hf_config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
        if params.get("rope_type", "default") != "default":
            raise LayoutError(f"rope_type {params.get('rope_type')!r} is not supported; accepted: 'default'")
    return float(theta)


def check_llama(hf_config) -> None:
    """Refuse Hugging Face configs this mapping does not cover, naming the key."""
    arch = getattr(hf_config, "model_type", None)
    if arch != "llama":
        raise LayoutError(f"model_type {arch!r} is not supported for megatron-core; accepted: 'llama'")
    for key, ok in (
        ("hidden_act", lambda v: v == "silu"),
        ("attention_bias", lambda v: not v),
        ("mlp_bias", lambda v: not v),
    ):
        if hasattr(hf_config, key) and not ok(getattr(hf_config, key)):
            raise LayoutError(
                f"{key}={getattr(hf_config, key)!r} is not supported for megatron-core; "
                "accepted: hidden_act 'silu', attention_bias false, mlp_bias false"
            )
    rope_theta_of(hf_config)


def transformer_config(hf_config, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
    """megatron-core ``TransformerConfig`` of a Hugging Face Llama config at a TP x PP layout."""
    from megatron.core.transformer import TransformerConfig

    check_llama(hf_config)
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if hf_config.num_hidden_layers % pp:
        raise LayoutError(
            f"num_hidden_layers {hf_config.num_hidden_layers} is not divisible by the pipeline-parallel size {pp}"
        )
    if groups % tp or heads % tp:
        raise LayoutError(
            f"num_key_value_heads {groups} and num_attention_heads {heads} must be divisible "
            f"by the tensor-parallel size {tp}"
        )
    if hf_config.vocab_size % tp:
        raise LayoutError(f"vocab_size {hf_config.vocab_size} is not divisible by the tensor-parallel size {tp}")
    kw = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_gpt(hf_config, config, vp_stage: Optional[int] = None):
    """This rank's ``GPTModel`` stage (local layer spec) for ``hf_config``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    kw = {} if vp_stage is None else {"vp_stage": vp_stage}
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=rope_theta_of(hf_config),
        **kw,
    )


# ---- Hugging Face <-> full megatron -------------------------------------------------------------


def _dims(hf_config):
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return heads, groups, head_dim


def hf_to_megatron(hf_sd: Mapping[str, torch.Tensor], hf_config) -> Dict[str, torch.Tensor]:
    """A Hugging Face Llama state dict in full-megatron naming (see the module docstring)."""
    heads, groups, hd = _dims(hf_config)
    qpg = heads // groups
    out = {
        "embedding.word_embeddings.weight": hf_sd["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf_sd["model.norm.weight"],
    }
    if not getattr(hf_config, "tie_word_embeddings", False):
        out["output_layer.weight"] = hf_sd["lm_head.weight"]
    for i in range(hf_config.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = hf_sd[h + "self_attn.q_proj.weight"].reshape(groups, qpg * hd, -1)
        k = hf_sd[h + "self_attn.k_proj.weight"].reshape(groups, hd, -1)
        v = hf_sd[h + "self_attn.v_proj.weight"].reshape(groups, hd, -1)
        out[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).reshape(-1, q.shape[-1])
        out[m + "self_attention.linear_proj.weight"] = hf_sd[h + "self_attn.o_proj.weight"]
        out[m + "input_layernorm.weight"] = hf_sd[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf_sd[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_sd[h + "mlp.gate_proj.weight"], hf_sd[h + "mlp.up_proj.weight"]], 0
        )
        out[m + "mlp.linear_fc2.weight"] = hf_sd[h + "mlp.down_proj.weight"]
    return out


def megatron_to_hf(meg_sd: Mapping[str, torch.Tensor], hf_config) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_megatron`."""
    heads, groups, hd = _dims(hf_config)
    qpg = heads // groups
    missing = [k for k in ("embedding.word_embeddings.weight", "decoder.final_layernorm.weight") if k not in meg_sd]
    if missing:
        raise LayoutError(f"megatron weights lack {missing}")
    out = {
        "model.embed_tokens.weight": meg_sd["embedding.word_embeddings.weight"],
        "model.norm.weight": meg_sd["decoder.final_layernorm.weight"],
    }
    if getattr(hf_config, "tie_word_embeddings", False):
        out["lm_head.weight"] = meg_sd["embedding.word_embeddings.weight"]
    else:
        if "output_layer.weight" not in meg_sd:
            raise LayoutError("megatron weights lack output_layer.weight but the config is untied")
        out["lm_head.weight"] = meg_sd["output_layer.weight"]
    for i in range(hf_config.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        if m + "self_attention.linear_qkv.weight" not in meg_sd:
            raise LayoutError(f"megatron weights lack layer {i} (expected {hf_config.num_hidden_layers} layers)")
        qkv = meg_sd[m + "self_attention.linear_qkv.weight"]
        qkv = qkv.reshape(groups, (qpg + 2) * hd, -1)
        out[h + "self_attn.q_proj.weight"] = qkv[:, : qpg * hd].reshape(heads * hd, -1)
        out[h + "self_attn.k_proj.weight"] = qkv[:, qpg * hd : (qpg + 1) * hd].reshape(groups * hd, -1)
        out[h + "self_attn.v_proj.weight"] = qkv[:, (qpg + 1) * hd :].reshape(groups * hd, -1)
        out[h + "self_attn.o_proj.weight"] = meg_sd[m + "self_attention.linear_proj.weight"]
        out[h + "input_layernorm.weight"] = meg_sd[m + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = meg_sd[m + "pre_mlp_layernorm.weight"]
        gate, up = meg_sd[m + "mlp.linear_fc1.weight"].chunk(2, 0)
        out[h + "mlp.gate_proj.weight"] = gate
        out[h + "mlp.up_proj.weight"] = up
        out[h + "mlp.down_proj.weight"] = meg_sd[m + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- full megatron <-> this rank's stage ----------------------------------------------------------


def unwrap(module):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _global_name(gpt, local_name: str) -> str:
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = gpt.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def _is_gated_fc1(gpt, name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") and gpt.config.gated_linear_unit


def _stage_params(model_chunks) -> Iterable:
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        for name, p in gpt.named_parameters():
            if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
                full = "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
            else:
                full = _global_name(gpt, name)
            yield gpt, name, full, p


def _tp_shard(full: torch.Tensor, p, gpt, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    if not getattr(p, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = p.partition_dim
    if _is_gated_fc1(gpt, name):
        halves = full.chunk(2, dim)
        return torch.cat([h.chunk(tp, dim)[tp_rank] for h in halves], dim)
    return full.chunk(tp, dim)[tp_rank]


@torch.no_grad()
def load_full_state_dict(model_chunks, meg_sd: Mapping[str, torch.Tensor]) -> None:
    """Copy full-megatron weights into this rank's stage (its layers, its TP shard of each)."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for gpt, name, full_name, p in _stage_params(model_chunks):
        if full_name not in meg_sd:
            raise LayoutError(f"weights lack {full_name} (this rank's {name})")
        shard = _tp_shard(meg_sd[full_name], p, gpt, name, tp_rank, tp)
        if tuple(shard.shape) != tuple(p.shape):
            raise LayoutError(f"{full_name}: shard {tuple(shard.shape)} does not fit parameter {tuple(p.shape)}")
        p.data.copy_(shard.to(p.dtype))


@torch.no_grad()
def gather_full_state_dict(model_chunks, params: str = "model") -> Dict[str, torch.Tensor]:
    """The full-megatron weights, on every rank (float32, CPU): TP shards concatenated, pipeline
    stages joined. ``params="model"`` reads the model parameters. Collective over the world."""
    from megatron.core import parallel_state as ps

    tp, tp_group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    local: Dict[str, torch.Tensor] = {}
    for gpt, name, full_name, p in _stage_params(model_chunks):
        t = p.detach().float()
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            dim = p.partition_dim
            if _is_gated_fc1(gpt, name):
                gates, ups = zip(*[q.chunk(2, dim) for q in parts])
                t = torch.cat(list(gates) + list(ups), dim)
            else:
                t = torch.cat(parts, dim)
        local.setdefault(full_name, t.cpu())
    stages: List[Optional[dict]] = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, local)
    out: Dict[str, torch.Tensor] = {}
    for st in stages:
        for k, v in (st or {}).items():  # all_gather_object filled every entry
            out.setdefault(k, v)
    return out
