"""The method, as pure functions over lists of tensors.

Nothing here knows about DeepSpeed or Megatron: callers hand in the tensors *this rank holds*
(whole parameters, ZeRO partitions or tensor-parallel shards) and the process group(s) over which
a sum must be reduced so that every element of the model counts exactly once.

Notation (see the README's "The method" section):

* ``g``   the full-batch gradient (rank- and micro-batch averaged), ``g_F`` the gradient of the
  loss with respect to the logits ``F``;
* ``M = sqrt(v / (1 - beta2**t)) + eps``, AdamW's own bias-corrected denominator;
* SAM / FunctionalSAM:          ``eps = rho * g / ||g||``;
* preconditioned, "perturbation" normalisation (default): ``eps = rho * M^-1 g / ||M^-1 g||``;
* preconditioned, "gradient" normalisation:               ``eps = rho * M^-1 (g / ||g||)``.

A zero or non-finite ``||g||`` (or ``||M^-1 g||``) gives a zero perturbation, never NaN.

``ascent_direction(..., regions=...)`` also returns the share of ``||eps||^2`` that falls on given
parts of the model (e.g. the input-embedding rows and the output layer), summed in the same
all-reduce as the norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.distributed as dist

from .distributed import comm_device
from .lm import causal_lm_loss  # noqa: F401  (the causal-LM loss lives in fsam_ds.lm)
from .names import PRECONDITION_NORMS

Group = Union[None, "dist.ProcessGroup", Sequence["dist.ProcessGroup"]]
# a part of the model as this rank holds it: (index of a local tensor, first element of its flattened
# form, number of elements or None for the rest of the tensor) per piece
Region = Sequence[Tuple[int, int, Optional[int]]]
# what torch's foreach ops take and return (they return tuples)
Tensors = Union[List[torch.Tensor], Tuple[torch.Tensor, ...]]


def _groups(group: Group) -> List[dist.ProcessGroup]:
    if group is None:
        return []
    if isinstance(group, (list, tuple)):
        return [g for g in group if g is not None]
    return [cast("dist.ProcessGroup", group)]  # one group (a list or tuple of groups is handled above)


def all_reduce_sum(values: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Sum ``values`` over every process group in ``group`` (in order), in place.

    ``group=None`` means "local only": the caller holds every element itself. Pass
    ``torch.distributed.group.WORLD`` to reduce over all ranks, or a list of groups whose
    product covers the ranks holding distinct elements (e.g. tensor- and data-parallel groups).
    """
    for g in _groups(group):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(g) > 1:
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=g)
    return values


def local_sq_sum(tensors: Iterable[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Sum of squares of the given local tensors, accumulated in float32 on their device.

    ``weights`` (optional, one per tensor) lets a caller count a tensor held by several ranks
    once, e.g. weight ``1/tp`` for a layer norm duplicated over ``tp`` tensor-parallel ranks.
    """
    tensors = [t for t in tensors]
    if not tensors:
        return torch.zeros((), dtype=torch.float32, device=comm_device())
    norms = torch._foreach_norm([t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors])
    sq = torch.stack([n.to(torch.float32) for n in norms]) ** 2
    if weights is not None:
        sq = sq * torch.tensor(list(weights), dtype=torch.float32, device=sq.device)
    return sq.sum()


def global_norm(
    tensors: Iterable[torch.Tensor], group: Group = None, weights: Optional[Sequence[float]] = None
) -> torch.Tensor:
    """Global L2 norm over lists of local tensors: one all-reduce of one scalar per group."""
    return all_reduce_sum(local_sq_sum(tensors, weights), group).sqrt()


def adam_denominator(
    exp_avg_sq: torch.Tensor, beta2: float, eps: float, step: int, bias_correction: bool = True
) -> torch.Tensor:
    """AdamW's denominator ``M = sqrt(v / (1 - beta2**step)) + eps`` for one tensor."""
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    return (exp_avg_sq.float() / bc2).sqrt_().add_(eps)


def adam_denominators(
    exp_avg_sqs: Sequence[torch.Tensor], beta2: float, eps: float, step: int, bias_correction: bool = True
) -> Tensors:
    """:func:`adam_denominator` for a list of tensors with foreach ops (one new fp32 tensor each,
    then in place; the same values bit for bit)."""
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    out = torch._foreach_div([v.float() for v in exp_avg_sqs], bc2)
    torch._foreach_sqrt_(out)
    torch._foreach_add_(out, eps)
    return out


@dataclass
class Ascent:
    """Result of :func:`ascent_direction`.

    ``coef`` is a 0-dim tensor: the perturbation is ``eps_i = coef * d_i`` with ``d_i`` the
    (unscaled, optionally preconditioned) direction returned alongside. ``grad_norm`` is the
    global ``||g||`` and ``eps_norm`` the global ``||eps||``; both are 0-dim float32 tensors.
    ``shares`` (with ``regions``) holds, per region, the global share of ``||eps||^2`` that falls on
    it (a float32 vector, NaN where there is no perturbation direction).
    """

    directions: Tensors
    coef: torch.Tensor
    grad_norm: Optional[torch.Tensor]  # None for a direction reused from an earlier step
    eps_norm: torch.Tensor
    shares: Optional[torch.Tensor] = None
    _zero: Optional[bool] = field(default=None, init=False, repr=False)

    @property
    def is_zero(self) -> bool:
        """Whether there is no perturbation (one host synchronisation, then cached)."""
        if self._zero is None:
            self._zero = bool(self.coef.item() == 0.0)
        return self._zero

    def perturbations(self) -> Tensors:
        """The perturbations ``eps_i`` as new tensors (float32); exact zeros when there is no
        perturbation (even where the gradient itself is not finite)."""
        if not self.directions:
            return []
        if self.is_zero:
            return [torch.zeros_like(d, dtype=torch.float32) for d in self.directions]
        return torch._foreach_mul(self.directions, self.coef)


def ascent_direction(
    grads: Sequence[torch.Tensor],
    rho: float,
    denominators: Optional[Sequence[Optional[torch.Tensor]]] = None,
    precondition_norm: str = "perturbation",
    group: Group = None,
    grad_scale: float = 1.0,
    weights: Optional[Sequence[float]] = None,
    regions: Optional[Sequence[Region]] = None,
) -> Ascent:
    """The SAM ascent step from the local gradient tensors of this rank.

    Args:
        grads: local gradient tensors (any float dtype; read, never modified).
        rho: the radius (``>= 0``).
        denominators: ``None`` for SAM / FunctionalSAM; for the preconditioned methods, one
            AdamW denominator ``M`` per gradient (see :func:`adam_denominator`).
        precondition_norm: ``"perturbation"`` or ``"gradient"`` (only used with denominators).
        group: process group(s) the sums of squares are reduced over (see :func:`all_reduce_sum`).
        grad_scale: the gradients are ``grad_scale`` times the true gradient (fp16 loss scaling);
            the result is computed from the unscaled gradient.
        weights: optional per-tensor multiplicity weights for the sums of squares.
        regions: optional parts of the model (see :data:`Region`, in this rank's tensors); the
            result's ``shares`` is then ``||eps_region||^2 / ||eps||^2`` per region.

    One all-reduce of a (2 + number of regions)-vector per group, whatever the method.
    """
    if precondition_norm not in PRECONDITION_NORMS:
        raise ValueError(f"precondition_norm must be one of {PRECONDITION_NORMS}, got {precondition_norm!r}")
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    inv_scale = 1.0 / float(grad_scale)
    g32 = [g.float() * inv_scale if (g.dtype != torch.float32 or inv_scale != 1.0) else g for g in grads]
    preconditioned = denominators is not None
    dirs: Tensors
    if denominators is not None:
        if len(denominators) != len(g32):
            raise ValueError("one denominator per gradient tensor is required")
        dirs = torch._foreach_div(g32, cast(List[torch.Tensor], list(denominators)))
    else:
        dirs = list(g32)

    regions = list(regions) if regions is not None else []
    if g32:
        g_sq = local_sq_sum(g32, weights)
        parts = [g_sq, local_sq_sum(dirs, weights) if preconditioned else torch.zeros_like(g_sq)]
        parts += [_region_sq(dirs, r, weights).to(g_sq.device) for r in regions]
        sums = torch.stack(parts)
    else:  # this rank holds nothing (possible for tiny models under sharding)
        sums = torch.zeros(2 + len(regions), dtype=torch.float32, device=comm_device())  # the default group's backend
    sums = all_reduce_sum(sums, group)
    g_norm = sums[0].sqrt()
    d_norm = sums[1].sqrt() if preconditioned else g_norm

    if preconditioned and precondition_norm == "gradient":
        denom = g_norm
        eps_norm = rho * d_norm / g_norm
    else:
        denom = d_norm
        eps_norm = torch.full_like(d_norm, float(rho))
    ok = torch.isfinite(g_norm) & torch.isfinite(d_norm) & (g_norm > 0) & (d_norm > 0)
    zero = torch.zeros_like(denom)
    coef = torch.where(ok, float(rho) / torch.where(ok, denom, torch.ones_like(denom)), zero)
    eps_norm = torch.where(ok, eps_norm, zero)
    if rho == 0:
        eps_norm = zero
    shares = None
    if regions:
        d_sq = sums[1] if preconditioned else sums[0]
        shares = torch.where(
            ok, sums[2:] / torch.where(ok, d_sq, torch.ones_like(d_sq)), torch.full_like(sums[2:], float("nan"))
        )
    return Ascent(directions=dirs, coef=coef, grad_norm=g_norm, eps_norm=eps_norm, shares=shares)


def _region_sq(dirs: Sequence[torch.Tensor], region: Region, weights: Optional[Sequence[float]]) -> torch.Tensor:
    """This rank's sum of squares of ``dirs`` over ``region`` (float32)."""
    pieces, w = [], []
    for index, start, numel in region:
        flat = dirs[index].reshape(-1)
        stop = flat.numel() if numel is None else start + numel
        pieces.append(flat[start:stop])
        w.append(1.0 if weights is None else weights[index])
    if not pieces:
        dev = dirs[0].device if dirs else torch.device("cpu")
        return torch.zeros((), dtype=torch.float32, device=dev)
    return local_sq_sum(pieces, w if weights is not None else None)


def functional_surrogate(logits: torch.Tensor, logit_grad: torch.Tensor) -> torch.Tensor:
    """The FunctionalSAM surrogate ``S(theta') = sum F(theta') * stopgrad(g_F(theta))``.

    Its gradient with respect to the parameters is ``J(theta')^T g_F(theta)``: the loss derivative
    stays at the unperturbed point; only the network Jacobian sees the perturbation. The value is
    accumulated in float32 (it is only ever differentiated).
    """
    if logits.shape != logit_grad.shape:
        raise ValueError(f"logit gradient shape {tuple(logit_grad.shape)} does not match logits {tuple(logits.shape)}")
    return (logits * logit_grad.detach().to(logits.dtype)).sum(dtype=torch.float32)


def rho_at(step: int, rho: float, warmup_steps: int) -> float:
    """Linear ramp of rho from 0 over ``warmup_steps`` optimizer steps (``step`` counts from 0)."""
    if warmup_steps <= 0:
        return float(rho)
    return float(rho) * min(1.0, step / warmup_steps)
