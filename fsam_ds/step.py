"""One step of the method, written once for every back end.

A step of a SAM type is

1. pass 1 at theta: forward and backward over the step's micro-batches (FunctionalSAM keeps
   ``g_F`` of each), or, when the ascent direction is not taken from this step's gradient
   (``ascent_every`` reusing it, ``ascent_direction: "momentum"``), a forward at theta for
   FunctionalSAM's ``g_F`` only and nothing at all for SAM;
2. the ascent ``eps`` (:func:`fsam_ds.method.ascent_direction`) from what this rank holds;
3. theta + eps written into the weights the forward reads, gradients cleared;
4. pass 2 at theta + eps on the same micro-batches with pass 1's random state (dropout masks);
5. theta restored bit-exactly, the random state put back to where pass 1 left it;
6. the back end's own update (or its skip path when a loss or gradient is not finite).

:class:`SAMStep` runs 1-5 and keeps what lives between steps (the reused direction of
``ascent_every``); a back end supplies only its passes (:class:`Passes`) and what its rank holds
(:class:`RankView`). The DeepSpeed engine (``train_batch`` and loop mode,
:mod:`fsam_ds.engine`, :mod:`fsam_ds.loop`) and megatron-core (:mod:`megatron_patches.sam`) both
run their steps through it.

"AdamW updates applied so far" is called ``adam_updates`` everywhere: it drives the rho warm-up
(a skipped step does not advance it, as it does not advance the LR schedule) and the bias
correction of the preconditioner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from .config import SAMConfig
from .method import Ascent, Region, Tensors, ascent_direction, rho_at
from .names import SHARE_KEYS  # the last_metrics keys of the shares of ||eps||^2 (input embedding, output layer)


class RankView(Protocol):
    """What one rank holds of the parameters the optimizer updates, in the layout it holds them.

    The DeepSpeed views (:mod:`fsam_ds.shards`, one per ZeRO layout) and megatron-core's main
    parameters (:class:`megatron_patches.sam.MainParams`) implement it.
    """

    #: process group(s) a sum of squares over this rank's tensors is reduced over so that every
    #: element counts once (None: this rank holds every element)
    norm_group: Any

    @property
    def grad_scale(self) -> float:
        """How many times larger ``grads()`` are than the true gradient (fp16 loss scale)."""

    def grads(self) -> List[torch.Tensor]:
        """This rank's gradient tensors after pass 1's reduction (read, never modified)."""

    def weights(self) -> Optional[Sequence[float]]:
        """Per-tensor multiplicity of ``grads()`` in the norms (1 counted, 0 a duplicate of an
        element counted elsewhere); None: every tensor counts once."""

    def denominators(self, adam_updates: int) -> Optional[List[torch.Tensor]]:
        """AdamW's ``sqrt(v / (1 - beta2^t)) + eps`` of the same tensors at ``t = adam_updates``;
        None before the first update."""

    def first_moments(self, adam_updates: int) -> Optional[List[torch.Tensor]]:
        """AdamW's ``exp_avg`` of the same tensors; None before the first update."""

    def perturb(self, ascent: Ascent) -> None:
        """Write ``theta + eps`` into the weights the forward reads."""

    def restore(self) -> None:
        """Put ``theta`` back bit-exactly."""

    def zero_grad(self) -> None:
        """Clear the gradients before pass 2."""

    def local_shapes(self) -> List[torch.Size]:
        """Shapes of the tensors ``grads()`` returns."""

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        """Where ``params`` lie in the tensors ``grads()`` returns."""


class Passes(Protocol):
    """A back end's passes over the micro-batches of one step.

    ``replay`` is whatever the back end needs to run pass 2 on the same micro-batches with the
    same random state (the data and the random states pass 1 saw); :class:`SAMStep` only hands
    it from pass 1 to pass 2.
    """

    def pass1(self) -> Tuple[List[Any], Any]:
        """Forward and backward at theta; FunctionalSAM keeps ``g_F``. Returns (losses, replay)."""

    def forward_pass(self) -> Tuple[List[Any], Any]:
        """FunctionalSAM only: ``g_F`` at theta without a backward through the model (the
        direction of this step is not taken from its gradient). Returns (losses, replay)."""

    def pass2(self, replay: Any) -> List[Any]:
        """The step's micro-batches at theta + eps (``replay`` None: no pass 1 ran, SAM reusing a
        direction). Returns pass 2's losses."""

    def rng_state(self) -> Any:
        """The random state now (every generator the model draws from)."""

    def set_rng_state(self, state: Any) -> None:
        """Set what :meth:`rng_state` returned."""


@dataclass
class StepOutcome:
    """What passes 1-5 produced, for the update and the metrics of the step."""

    losses: Optional[List[Any]]  # pass 1's (pass 2's when no pass 1 ran: SAM reusing a direction)
    rho: float
    grad_norm: Optional[torch.Tensor] = None  # ||g|| of pass 1 (None when no ascent was computed)
    eps_norm: Optional[torch.Tensor] = None
    reused: bool = False  # ascent_every: the stored direction was reused
    momentum: bool = False  # ascent_direction "momentum": eps from AdamW's first moment
    shares: Optional[torch.Tensor] = None  # shares of ||eps||^2 (SHARE_KEYS), None without a perturbation
    pass2: bool = False  # whether pass 2 ran (its gradients are the ones the update sees)


class SAMStep:
    """Passes 1-5 of the configured method, for any back end.

    ``adam_updates()``: AdamW updates applied so far; ``step_index()``: optimizer steps taken so
    far, skipped ones included (the ``ascent_every`` cycle counts them, as DeepSpeed's
    ``global_steps`` does); ``share_params``: the parameters of :data:`SHARE_KEYS` (empty dict
    when unknown).
    """

    def __init__(
        self,
        sam: SAMConfig,
        view: RankView,
        adam_updates: Callable[[], int],
        step_index: Callable[[], int],
        share_params: Optional[Mapping[str, Sequence[torch.nn.Parameter]]] = None,
    ):
        self.sam = sam
        self.view = view
        self.adam_updates = adam_updates
        self.step_index = step_index
        self.share_params = share_params or {}
        # An unperturbed step (rho = 0, ||g|| = 0) has pass-2 gradients identical to pass 1's, so
        # pass 2 is skipped; tests switch this off to run both passes.
        self.skip_unperturbed_pass2 = True
        # ascent_every > 1: the last direction at rho = 1 (this rank's tensors, fp32), its global
        # norm, whether it is a real perturbation, its shares and the step it was computed at
        self._eps_unit: Optional[Tensors] = None
        self._eps_unit_norm: Optional[torch.Tensor] = None
        self._eps_unit_ok = False
        self._eps_unit_shares: Optional[torch.Tensor] = None
        self._eps_step = -1

    # ---- what this step does ----------------------------------------------------------------
    def current_rho(self) -> float:
        """rho of the coming step: the warm-up counts applied AdamW updates."""
        return rho_at(self.adam_updates(), self.sam.rho, self.sam.rho_warmup_steps) if self.sam.is_sam else 0.0

    def reuses_ascent(self) -> bool:
        """``ascent_every: k > 1``: whether this step reuses the stored direction (every k-th
        step and the first compute it; an unusable one, ``||g|| = 0`` or not finite, is
        recomputed at the next step)."""
        every = self.sam.ascent_every
        return every > 1 and self._eps_unit is not None and self._eps_unit_ok and self.step_index() % every != 0

    def uses_momentum(self) -> bool:
        """``ascent_direction: "momentum"``: whether this step's ascent comes from AdamW's first
        moment (from AdamW's first update on; the steps before it are exact)."""
        return self.sam.ascent_direction == "momentum" and self.adam_updates() >= 1

    # ---- the ascent ---------------------------------------------------------------------------
    def compute_ascent(self, rho: float, momentum: bool = False) -> Ascent:
        """The ascent from this rank's pass-1 gradients, or with ``momentum`` from AdamW's first
        moment."""
        view = self.view
        updates = self.adam_updates()
        if momentum:
            tensors, scale = view.first_moments(updates), 1.0
            if tensors is None:
                raise RuntimeError('ascent_direction "momentum" before AdamW\'s first update: there is no first moment')
        else:
            tensors, scale = view.grads(), view.grad_scale
        denoms = view.denominators(updates) if self.sam.preconditioned else None
        regions = [view.region(self.share_params[k]) for k in SHARE_KEYS] if self.share_params else None
        return ascent_direction(
            tensors,
            rho,
            denoms,
            self.sam.precondition_norm,
            group=view.norm_group,
            grad_scale=scale,
            weights=view.weights(),
            regions=regions,
        )

    def _stored_ascent(self, rho: float) -> Tuple[Ascent, Optional[torch.Tensor]]:
        """``ascent_every: k > 1`` on a computing step: the direction at rho = 1, stored; returns
        (the ascent at ``rho``, ``||g||``)."""
        unit = self.compute_ascent(1.0)
        self._eps_unit = unit.perturbations()  # new fp32 tensors: theta's own layout on this rank
        self._eps_unit_norm = unit.eps_norm
        self._eps_unit_shares = unit.shares
        self._eps_unit_ok = not unit.is_zero
        self._eps_step = self.step_index()
        return self._reused_ascent(rho), unit.grad_norm

    def _reused_ascent(self, rho: float) -> Ascent:
        assert self._eps_unit is not None and self._eps_unit_norm is not None  # reuses_ascent() holds
        ok = self._eps_unit_ok and rho > 0
        coef = torch.tensor(float(rho) if ok else 0.0, dtype=torch.float32, device=self._eps_unit_norm.device)
        return Ascent(
            directions=self._eps_unit,
            coef=coef,
            grad_norm=None,
            eps_norm=self._eps_unit_norm * coef,
            shares=self._eps_unit_shares,
        )

    def _exact_ascent(self, rho: float) -> Tuple[Ascent, Optional[torch.Tensor]]:
        if self.sam.ascent_every > 1:
            return self._stored_ascent(rho)
        ascent = self.compute_ascent(rho)
        return ascent, ascent.grad_norm

    def _runs_pass2(self, ascent: Ascent, grad_norm: Optional[torch.Tensor]) -> bool:
        """Pass 2 runs unless the perturbation is zero (then its gradients would be pass 1's) or
        pass 1's gradient is not finite (the step is skipped: pass 1's gradients go to it)."""
        if not ascent.is_zero:
            return True
        return not self.skip_unperturbed_pass2 and grad_norm is not None and bool(torch.isfinite(grad_norm))

    # ---- the step -----------------------------------------------------------------------------
    def run(self, passes: Passes, pass1: Optional[Tuple[List[Any], Any]] = None) -> StepOutcome:
        """Passes 1-5. ``pass1``: (losses, replay) of a pass 1 that already ran (loop mode: the
        loop's own forwards and backwards). The update is the caller's."""
        sam = self.sam
        rho = self.current_rho()
        if not sam.is_sam:
            return StepOutcome(losses=passes.pass1()[0] if pass1 is None else pass1[0], rho=rho)
        reused = self.reuses_ascent()
        momentum = pass1 is None and not reused and self.uses_momentum()
        grad_norm: Optional[torch.Tensor] = None
        losses: Optional[List[Any]]
        if reused:
            ascent = self._reused_ascent(rho)
        elif momentum:
            ascent = self.compute_ascent(rho, momentum=True)
        if pass1 is not None:
            losses, replay = pass1
        elif reused or momentum:
            losses, replay = passes.forward_pass() if sam.functional else (None, None)
        else:
            losses, replay = passes.pass1()
        if not (reused or momentum):
            ascent, grad_norm = self._exact_ascent(rho)
        out = StepOutcome(
            losses=losses,
            rho=rho,
            grad_norm=grad_norm,
            eps_norm=ascent.eps_norm,
            reused=reused,
            momentum=momentum,
            shares=None if ascent.shares is None or ascent.is_zero else ascent.shares,
        )
        if reused or momentum or self._runs_pass2(ascent, grad_norm):
            pass2_losses = self._perturbed_pass(passes, ascent, replay)
            out.pass2 = True
            if out.losses is None:
                out.losses = pass2_losses
        return out

    def _perturbed_pass(self, passes: Passes, ascent: Ascent, replay: Any) -> List[Any]:
        """Steps 3-5: theta + eps, gradients cleared, pass 2 with pass 1's random state, theta
        and the random state after pass 1 restored."""
        view = self.view
        rng_after = passes.rng_state()
        perturbed = not ascent.is_zero
        if perturbed:
            view.perturb(ascent)
        view.zero_grad()
        del ascent
        try:
            return passes.pass2(replay)
        finally:
            if replay is not None:
                passes.set_rng_state(rng_after)
            if perturbed:
                view.restore()

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What this rank needs beyond the back end's checkpoint to continue exactly: with
        ``ascent_every > 1`` the stored direction (this rank's tensors, in the layout it holds),
        its norm and the step it was computed at. Under sharding each rank's differs: save one
        per rank."""
        state: Dict[str, Any] = {
            "method": self.sam.method,
            "ascent_every": self.sam.ascent_every,
            "eps_step": self._eps_step,
            "eps_unit": None,
        }
        if self._eps_unit is not None:
            assert self._eps_unit_norm is not None  # stored with the direction
            state.update(
                eps_unit=[t.detach().cpu().clone() for t in self._eps_unit],
                eps_unit_norm=float(self._eps_unit_norm),
                eps_unit_ok=bool(self._eps_unit_ok),
                eps_unit_shares=(None if self._eps_unit_shares is None else [float(x) for x in self._eps_unit_shares]),
            )
        return state

    def load_state_dict(self, state: Dict[str, Any], device: torch.device) -> None:
        """Restore what :meth:`state_dict` returned (same rank and layout; ValueError for a
        direction of another layout)."""
        eps = state.get("eps_unit")
        if eps is None:
            self._eps_unit, self._eps_unit_norm, self._eps_unit_ok, self._eps_step = None, None, False, -1
            self._eps_unit_shares = None
            return
        shapes = [tuple(s) for s in self.view.local_shapes()]
        if [tuple(t.shape) for t in eps] != shapes:
            raise ValueError(
                "the stored ascent direction was written for another layout (world size, ZeRO stage, "
                "parallel sizes or model) than this rank's; it is recomputed at the next step instead"
            )
        self._eps_unit = [t.to(device, dtype=torch.float32) for t in eps]
        self._eps_unit_norm = torch.tensor(float(state["eps_unit_norm"]), dtype=torch.float32, device=device)
        self._eps_unit_ok = bool(state["eps_unit_ok"])
        self._eps_step = int(state.get("eps_step", -1))
        shares = state.get("eps_unit_shares")
        self._eps_unit_shares = None if shares is None else torch.tensor(shares, dtype=torch.float32, device=device)


def step_metrics(
    sam: SAMConfig,
    out: StepOutcome,
    loss: Optional[float],
    lr: Optional[float],
    skipped: bool,
    step_time: float,
    have_shares: bool,
) -> Dict[str, Any]:
    """The metrics of one step, the same keys on every back end: ``method``, ``loss``,
    ``grad_norm``, ``eps_norm``, ``rho``, ``lr``, ``skipped``, ``step_time`` (``loss`` None where this
    rank has none: a pipeline stage before the last); ``ascent_reused``
    with ``ascent_every > 1``, ``ascent_momentum`` with ``ascent_direction: "momentum"`` and the
    :data:`SHARE_KEYS` for the SAM types."""
    m: Dict[str, Any] = {
        "method": sam.method,
        "loss": loss,
        "grad_norm": float(out.grad_norm) if out.grad_norm is not None else None,
        "eps_norm": float(out.eps_norm) if out.eps_norm is not None else 0.0,
        "rho": out.rho,
        "lr": lr,
        "skipped": skipped,
        "step_time": step_time,
    }
    if sam.ascent_every > 1:
        m["ascent_reused"] = out.reused
    if sam.ascent_direction == "momentum":
        m["ascent_momentum"] = out.momentum
    if sam.is_sam:
        values = out.shares.tolist() if out.shares is not None else [None] * len(SHARE_KEYS)
        for key, value in zip(SHARE_KEYS, values):
            m[key] = float(value) if have_shares and value is not None and value == value else None
    return m
