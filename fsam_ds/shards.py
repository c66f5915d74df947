"""What this rank holds: the tensors the method reads and writes, one adapter per optimizer layout.

Every adapter answers the same questions for the engine:

* ``grads()``: this rank's slice of the reduced (rank-averaged) gradient, after the pass-1
  backward at the accumulation boundary;
* ``grad_scale``: how many times larger those gradients are than the true gradient (fp16 loss
  scaling, exactly what ``engine.backward`` multiplied the loss by);
* ``denominators(updates)``: AdamW's denominator ``M`` for the same slices, given the number of
  real AdamW updates so far (``None`` before the first one: then ``exp_avg_sq`` does not exist
  yet, or holds nothing);
* ``norm_group``: the process group(s) a sum of squares over those slices is reduced over so that
  every element of the model counts exactly once;
* ``perturb(ascent)``: write ``theta + eps`` into the weights the forward reads;
* ``restore()``: put ``theta`` back bit-exactly (from the fp32 master where one exists, else from
  a saved copy of the local slice);
* ``zero_grad()``: clear the pass-1 gradients before pass 2;
* ``first_moments(updates)``: AdamW's ``exp_avg`` for the same slices (``"ascent_direction":
  "momentum"``; ``None`` before the first update);
* ``region(params)``: where the given module parameters lie in the tensors ``grads()`` returns
  (a :data:`fsam_ds.method.Region`: the pieces this rank holds; empty if it holds none).

Checked against DeepSpeed 0.19.8.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch._utils import _unflatten_dense_tensors

from .method import Ascent, Region, Tensors, adam_denominator, adam_denominators

Hparams = Tuple[float, float, bool]  # a parameter group's (beta2, eps, bias_correction)


def _unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Per-tensor views of ``flat`` shaped as ``like`` (torch's own helper, which is unannotated)."""
    return list(_unflatten_dense_tensors(flat, like))  # type: ignore[no-untyped-call]


def loss_scale_of(engine: Any) -> float:
    """The factor ``engine.backward`` multiplies the loss by (mirrors DeepSpeed's own rule)."""
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    opt = engine.optimizer
    if isinstance(opt, ZeROOptimizer):
        probe = torch.ones((), requires_grad=True) * 1.0
        return float(opt.scale_if_loss(probe).detach().float().item())
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    return 1.0


def _group_hparams(group: Mapping[str, Any]) -> Hparams:
    beta2 = group["betas"][1]
    return beta2, group["eps"], group.get("bias_correction", True)


def _missing_moments(layout: str, updates: int) -> RuntimeError:
    return RuntimeError(
        f"{layout}: the optimizer has applied {updates} update(s) but holds no exp_avg_sq; the "
        "preconditioned SAM types need AdamW's second moment (optimizer Adam/AdamW)"
    )


def _missing_first_moments(layout: str, updates: int) -> RuntimeError:
    return RuntimeError(
        f"{layout}: the optimizer has applied {updates} update(s) but holds no exp_avg; "
        '"ascent_direction": "momentum" needs AdamW\'s first moment (optimizer Adam/AdamW)'
    )


def _whole_tensors(params: Sequence[torch.Tensor], wanted: Sequence[torch.Tensor]) -> Region:
    """Region of ``wanted`` among per-parameter local tensors (``params`` in ``grads()`` order)."""
    ids = {id(p) for p in wanted}
    return [(i, 0, None) for i, p in enumerate(params) if id(p) in ids]


def _denominators(vs: Sequence[torch.Tensor], hparams: Sequence[Hparams], step: int) -> List[torch.Tensor]:
    """AdamW's denominators of per-parameter ``exp_avg_sq`` tensors, one foreach call per run of
    parameters sharing (beta2, eps, bias_correction)."""
    out: List[torch.Tensor] = []
    i = 0
    while i < len(vs):
        j = i
        while j < len(vs) and hparams[j] == hparams[i]:
            j += 1
        beta2, eps, bc = hparams[i]
        out.extend(adam_denominators(vs[i:j], beta2, eps, step, bc))
        i = j
    return out


def _perturbed_masters(masters: List[torch.Tensor], ascent: Ascent) -> Tensors:
    """``master + eps`` as new fp32 tensors, built inside the list of perturbations (one fp32 copy
    of this rank's slice at a time, not two; bit-identical to ``master + eps``)."""
    eps = ascent.perturbations()
    if eps:
        torch._foreach_add_(eps, masters)
    return eps


class RankView:
    """Base of the DeepSpeed adapters (each implements :class:`fsam_ds.step.RankView`);
    subclasses fill in the layout-specific parts."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._saved: Optional[List[torch.Tensor]] = None

    # What the engine may communicate over for norms (None: this rank holds every element).
    norm_group = None

    @property
    def grad_scale(self) -> float:
        return loss_scale_of(self.engine)

    def grads(self) -> List[torch.Tensor]:
        raise NotImplementedError

    def weights(self) -> Optional[List[float]]:
        """Every element a DeepSpeed layout holds is counted once (no duplicates): None."""
        return None

    def local_shapes(self) -> List[torch.Size]:
        """Shapes of the tensors ``grads()`` returns (and of the perturbation this rank holds)."""
        raise NotImplementedError

    def denominators(self, updates: int) -> Optional[List[torch.Tensor]]:
        raise NotImplementedError

    def perturb(self, ascent: Ascent) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def first_moments(self, updates: int) -> Optional[List[torch.Tensor]]:
        raise NotImplementedError

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        raise NotImplementedError


class PlainView(RankView):
    """ZeRO stage 0 in fp32: DeepSpeed's AdamW works on the module's own parameters.

    Every rank holds every element, and after the boundary backward the gradients are already
    averaged over the data-parallel group, so norms need no communication. There is no separate
    master copy, so ``perturb`` saves the weights and ``restore`` copies them back.
    """

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        opt = engine.optimizer
        self._buffer: Optional[List[torch.Tensor]] = None
        self.params: List[torch.nn.Parameter] = []
        self.hparams: List[Hparams] = []
        for group in opt.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self.params.append(p)
                    self.hparams.append(_group_hparams(group))

    def grads(self) -> List[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def local_shapes(self) -> List[torch.Size]:
        return [p.shape for p in self.params]

    def denominators(self, updates: int) -> Optional[List[torch.Tensor]]:
        # DeepSpeed's FusedAdam advances state["step"] only on the last parameter of a group, so
        # the bias-correction step is the engine's count of applied updates.
        state = self.engine.optimizer.state
        if updates < 1:
            return None
        vs = [state.get(p, {}).get("exp_avg_sq") for p in self.params]
        if all(v is None for v in vs):
            raise _missing_moments("ZeRO stage 0", updates)
        # a parameter AdamW has never updated (no gradient so far) has no moments: its step has no
        # preconditioner to follow, its direction is left as it is (denominator 1)
        held = [i for i, v in enumerate(vs) if v is not None]
        dens = _denominators([vs[i] for i in held], [self.hparams[i] for i in held], updates)
        out = [torch.ones_like(p, dtype=torch.float32) for p in self.params]
        for i, d in zip(held, dens):
            out[i] = d
        return out

    def perturb(self, ascent: Ascent) -> None:
        data = [p.data for p in self.params]
        # one buffer for theta, allocated at the first perturbation and kept: no allocation per step
        if self._buffer is None:
            self._buffer = [torch.empty_like(d) for d in data]
        torch._foreach_copy_(self._buffer, data)
        self._saved = self._buffer
        if not ascent.is_zero:  # theta += coef * d in place: no separate list of perturbations
            torch._foreach_add_(data, ascent.directions, alpha=float(ascent.coef))

    def restore(self) -> None:
        assert self._saved is not None  # perturb saved theta
        torch._foreach_copy_([p.data for p in self.params], self._saved)
        self._saved = None

    def first_moments(self, updates: int) -> Optional[List[torch.Tensor]]:
        if updates < 1:
            return None
        state = self.engine.optimizer.state
        ms = [state.get(p, {}).get("exp_avg") for p in self.params]
        if all(m is None for m in ms):
            raise _missing_first_moments("ZeRO stage 0", updates)
        # a parameter AdamW has never updated has no first moment: no ascent along it
        return [m if m is not None else torch.zeros_like(p, dtype=torch.float32) for m, p in zip(ms, self.params)]

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        return _whole_tensors(self.params, params)

    def saved_copy(self, param: torch.nn.Parameter) -> Optional[Callable[[], torch.Tensor]]:
        """A callable giving ``param`` at theta while the weights are perturbed (the copy
        ``perturb`` saved; the parameter itself when unperturbed), or None if not held here."""
        for i, p in enumerate(self.params):
            if p is param:
                return lambda: self._saved[i] if self._saved is not None else p.data
        return None

    def zero_grad(self) -> None:
        self.engine.zero_grad()


class MixedPrecisionView(RankView):
    """ZeRO stage 0 with bf16 or fp16: DeepSpeed's FP16_Optimizer keeps one flat fp32 master per
    parameter group (not partitioned) and the module's low-precision weights are views into a flat
    low-precision buffer. The perturbed weight is ``(master + eps)`` rounded to the low-precision
    dtype; restoring writes ``master`` rounded again, which is exactly what the optimizer step
    itself writes after every update.
    """

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        opt = engine.optimizer
        self.lp_groups = opt.fp16_groups
        self.masters = opt.fp32_groups_flat
        self.inner = opt.optimizer
        self.hparams = [_group_hparams(g) for g in self.inner.param_groups]
        # per-parameter fp32 views of the flat masters
        self.master_views = [_unflatten(m, lp) for m, lp in zip(self.masters, self.lp_groups)]

    def grads(self) -> List[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for lp in self.lp_groups for p in lp]

    def local_shapes(self) -> List[torch.Size]:
        return [p.shape for lp in self.lp_groups for p in lp]

    def denominators(self, updates: int) -> Optional[List[torch.Tensor]]:
        # FP16_Optimizer runs one hidden AdamW step (zero gradients) when it is built, so the
        # inner optimizer's own step count (one flat tensor per group) is the bias-correction t.
        if updates < 1:
            return None
        out = []
        for flat, lp, (beta2, eps, bc) in zip(self.masters, self.lp_groups, self.hparams):
            st = self.inner.state.get(flat, {})
            v = st.get("exp_avg_sq")
            if v is None:
                raise _missing_moments("ZeRO stage 0 mixed precision", updates)
            t = int(st.get("step", updates))
            out.extend(_unflatten(adam_denominator(v, beta2, eps, t, bc), lp))
        return out

    def first_moments(self, updates: int) -> Optional[List[torch.Tensor]]:
        if updates < 1:
            return None
        out = []
        for flat, lp in zip(self.masters, self.lp_groups):
            m = self.inner.state.get(flat, {}).get("exp_avg")
            if m is None:
                raise _missing_first_moments("ZeRO stage 0 mixed precision", updates)
            out.extend(_unflatten(m, lp))
        return out

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        return _whole_tensors([p for lp in self.lp_groups for p in lp], params)

    def _lp_params(self) -> List[torch.Tensor]:
        return [p.data for lp in self.lp_groups for p in lp]

    def _master_params(self) -> List[torch.Tensor]:
        return [m for views in self.master_views for m in views]

    def perturb(self, ascent: Ascent) -> None:
        perturbed = _perturbed_masters(self._master_params(), ascent)
        torch._foreach_copy_(self._lp_params(), perturbed)

    def restore(self) -> None:
        torch._foreach_copy_(self._lp_params(), self._master_params())

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad()


class PartitionedView(RankView):
    """ZeRO stages 1 and 2 (DeepSpeedZeroOptimizer), and stage 1 with bf16 weights and fp32
    gradient accumulation (BF16_Optimizer): each rank owns one flat fp32 master partition per
    parameter group, with AdamW's state and the reduced gradient in the same layout.

    The perturbed weights are spread the way the optimizer step spreads updated ones: this
    rank's low-precision partition gets ``master + eps`` and the flat weight buffers are
    all-gathered; restoring spreads the untouched master again (bit-exact, since the step writes
    exactly ``master`` rounded to the weights' dtype). Norms sum over the data-parallel group.
    """

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

        opt = engine.optimizer
        self.opt = opt
        self.bf16_optimizer = isinstance(opt, BF16_Optimizer)
        if self.bf16_optimizer:
            self.masters = opt.fp32_groups_flat_partition
            self.lp_flat = opt.bf16_groups_flat
            self.lp_parts = opt.bf16_partitioned_groups
        else:
            self.masters = opt.single_partition_of_fp32_groups
            self.lp_flat = opt.bit16_groups_flat
            self.lp_parts = opt.parallel_partitioned_bit16_groups
        self.groups = opt.real_dp_process_group
        self.norm_group = self.groups[0]
        self.hparams = [_group_hparams(g) for g in opt.optimizer.param_groups]

    def grads(self) -> List[torch.Tensor]:
        opt = self.opt
        if self.bf16_optimizer:
            return list(opt.fp32_groups_gradient_flat_partition)
        out = []
        for i, master in enumerate(self.masters):
            parts = opt.averaged_gradients[i]
            flat = getattr(parts, "flat_partition", None)
            if flat is None:
                flat = torch.cat([t.reshape(-1) for t in parts])
            if flat.numel() != master.numel():
                raise RuntimeError(
                    f"gradient partition of group {i} has {flat.numel()} elements, master has {master.numel()}"
                )
            out.append(flat)
        return out

    def local_shapes(self) -> List[torch.Size]:
        return [m.shape for m in self.masters]

    def denominators(self, updates: int) -> Optional[List[torch.Tensor]]:
        if updates < 1:
            return None
        out = []
        for master, (beta2, eps, bc) in zip(self.masters, self.hparams):
            st = self.opt.optimizer.state.get(master, {})
            v = st.get("exp_avg_sq")
            if v is None:
                raise _missing_moments(f"ZeRO stage {self.engine.zero_optimization_stage()}", updates)
            out.append(adam_denominator(v, beta2, eps, int(st.get("step", updates)), bc))
        return out

    def first_moments(self, updates: int) -> Optional[List[torch.Tensor]]:
        if updates < 1:
            return None
        out = []
        for master in self.masters:
            m = self.opt.optimizer.state.get(master, {}).get("exp_avg")
            if m is None:
                raise _missing_first_moments(f"ZeRO stage {self.engine.zero_optimization_stage()}", updates)
            out.append(m)
        return out

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        # DeepSpeed's own map from each parameter to its fragment of this rank's flat partition
        # (the one its universal checkpoints use); None where this rank holds none of it
        out = []
        for p in params:
            frag = getattr(p, "_hp_mapping", None)
            if frag is not None:
                addr = frag.get_hp_fragment_address()
                out.append((frag.param_group_index, addr.start, addr.numel))
        return out

    @torch.no_grad()
    def _spread(self, flat_partitions: Sequence[torch.Tensor]) -> None:
        import torch.distributed as dist
        from deepspeed.runtime.utils import all_gather_dp_groups

        for i, v in enumerate(flat_partitions):
            self.lp_parts[i][dist.get_rank(group=self.groups[i])].copy_(v)
        all_gather_dp_groups(
            groups_flat=self.lp_flat,
            partitioned_param_groups=self.lp_parts,
            dp_process_group=self.groups,
            start_alignment_factor=self.opt.nccl_start_alignment_factor,
            allgather_bucket_size=self.opt.allgather_bucket_size,
        )

    def perturb(self, ascent: Ascent) -> None:
        self._spread(_perturbed_masters(list(self.masters), ascent))

    def restore(self) -> None:
        self._spread(list(self.masters))

    def zero_grad(self) -> None:
        self.opt.zero_grad()
        # with bf16 weights and fp32 accumulation at stage 2, zero_grad keeps the reduced
        # partition buffer and pass 2 would be added onto pass 1: drop it
        averaged = getattr(self.opt, "averaged_gradients", None)
        if isinstance(averaged, dict):
            for key in list(averaged):
                averaged[key] = None


class Zero3View(RankView):
    """ZeRO stage 3: every parameter is partitioned (``ds_tensor``) and gathered for the forward.

    The local gradient, fp32 master and ``exp_avg_sq`` partitions come from DeepSpeed's own
    accessors (``safe_get_local_*``). Perturbing first releases every gathered full copy
    (persistent small parameters and any kept for reuse), then writes ``master + eps`` into
    ``ds_tensor``; the next forward gathers the perturbed weights. Restoring writes the fp32 master
    back (exact: after every step ``ds_tensor`` is the master rounded to its dtype).
    """

    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.opt = engine.optimizer
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.norm_group = self.opt.dp_process_group
        # each parameter's own group's (beta2, eps, bias_correction): ZeRO-3 splits every
        # parameter group into flat sub-groups (fp16_groups) and steps each with its group's
        # settings (sub_group_to_group_id)
        sub_group = {id(p): i for i, params in enumerate(self.opt.fp16_groups) for p in params}
        groups = self.opt.optimizer.param_groups
        self.hparams = [_group_hparams(groups[self.opt.sub_group_to_group_id[sub_group[id(p)]]]) for p in self.params]

    def grads(self) -> List[torch.Tensor]:
        from deepspeed.utils import safe_get_local_grad

        return [safe_get_local_grad(p) for p in self.params]

    def local_shapes(self) -> List[torch.Size]:
        return [p.ds_tensor.shape for p in self.params]

    def denominators(self, updates: int) -> Optional[List[torch.Tensor]]:
        from deepspeed.utils import safe_get_local_optimizer_state

        if updates < 1:
            return None
        vs = [safe_get_local_optimizer_state(p, "exp_avg_sq") for p in self.params]
        if any(v is None for v in vs):
            raise _missing_moments("ZeRO stage 3", updates)
        return _denominators(vs, self.hparams, updates)

    def first_moments(self, updates: int) -> Optional[List[torch.Tensor]]:
        from deepspeed.utils import safe_get_local_optimizer_state

        if updates < 1:
            return None
        ms = [safe_get_local_optimizer_state(p, "exp_avg") for p in self.params]
        if any(m is None for m in ms):
            raise _missing_first_moments("ZeRO stage 3", updates)
        return ms

    def region(self, params: Sequence[torch.nn.Parameter]) -> Region:
        return _whole_tensors(self.params, params)

    def _release_gathered(self) -> None:
        self.opt._partition_all_parameters()
        invalidate = getattr(self.opt, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()

    @torch.no_grad()
    def _write(self, values: Sequence[torch.Tensor]) -> None:
        self._release_gathered()
        for p, v in zip(self.params, values):
            p.ds_tensor.copy_(v)
        invalidate = getattr(self.opt, "invalidate_secondary_tensor", None)
        if invalidate is not None:
            invalidate()

    def _masters(self) -> List[torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p) for p in self.params]

    def perturb(self, ascent: Ascent) -> None:
        self._write(_perturbed_masters(self._masters(), ascent))

    def restore(self) -> None:
        self._write(self._masters())

    def zero_grad(self) -> None:
        self.opt.zero_grad()


def make_view(engine: Any) -> RankView:
    """The adapter for this engine's optimizer layout."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    stage = engine.zero_optimization_stage()
    if stage == 3:
        return Zero3View(engine)
    if stage in (1, 2):
        return PartitionedView(engine)
    if isinstance(engine.optimizer, FP16_Optimizer):
        return MixedPrecisionView(engine)
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        raise NotImplementedError(
            f"unsupported optimizer layout {type(engine.optimizer).__name__} for mixed precision at ZeRO stage 0"
        )
    return PlainView(engine)
