"""Causal-LM conventions shared by every part of the package (a leaf: imports nothing from it).

What the engine, loop mode, the sharpness analysis and the tests read from a model output and a
micro-batch: the logits (:func:`logits_of`), the labels (:func:`labels_of`), the loss
(:func:`causal_lm_loss`, :func:`default_loss`) and the loss's gradient with respect to the logits,
FunctionalSAM's ``g_F`` (:func:`logit_grad`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


def logits_of(outputs: Any) -> Optional[torch.Tensor]:
    """The logits of a model output: a tensor, an object with ``.logits``, a dict with
    ``"logits"``, or a tuple whose first element is the logits."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dim() >= 2 else None
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0] if outputs[0].dim() >= 2 else None
    return logits


def labels_of(batch: Mapping[str, Any]) -> torch.Tensor:
    """Hugging Face conventions: ``labels`` if given, else ``input_ids`` with padding
    (``attention_mask == 0``) set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return labels


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy with the Hugging Face shift (``labels[:, 1:]`` vs
    ``logits[:, :-1]``), ``ignore_index`` tokens left out, computed in float32, or in float64 for
    float64 logits (the independent references and the sharpness analysis run in float64)."""
    shift_logits = logits[..., :-1, :]
    shift_labels = labels[..., 1:].to(logits.device)
    flat = shift_logits.reshape(-1, shift_logits.size(-1))
    flat = flat if flat.dtype == torch.float64 else flat.float()
    return torch.nn.functional.cross_entropy(flat, shift_labels.reshape(-1), ignore_index=ignore_index)


def default_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean next-token cross-entropy with the Hugging Face shift; -100 labels and padding ignored."""
    return causal_lm_loss(logits, labels_of(batch))


def model_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def finite_or_nan(loss: torch.Tensor) -> torch.Tensor:
    """1 where ``loss`` is finite, NaN where it is not (no host sync). Multiplying what is
    backpropagated by it turns a non-finite loss whose gradients are finite (``loss + inf``) into
    non-finite gradients, so the step is skipped by the same overflow path as a non-finite
    gradient; times 1 it changes nothing, bit for bit."""
    loss = loss.detach()
    return torch.where(torch.isfinite(loss), torch.ones_like(loss), torch.full_like(loss, float("nan")))


def logit_grad(loss_fn: LossFn, logits: torch.Tensor, batch: Mapping[str, Any]):
    """``(loss, g_F)``: the loss and its gradient with respect to ``logits`` by autograd on a
    detached copy (no graph through the model); ``g_F`` is NaN where the loss is not finite."""
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf, batch)
        (g_f,) = torch.autograd.grad(loss, leaf)
    return loss, g_f.mul_(finite_or_nan(loss).to(g_f.dtype))  # g_f is autograd's fresh tensor: in place
