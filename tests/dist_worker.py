"""Multi-rank worker: started once by the deepspeed launcher, runs every case of a test module in
one process group and saves what the test compares (rank 0's weights, every rank's losses)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from common import ds_config, engine_run  # noqa: E402
from launch import save_rank_result, worker_parser  # noqa: E402

METHODS = ("AdamW", "SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")
SAM_TYPES = METHODS[1:]
PFSAM = "PreconditionedFunctionalSAM"


@dataclass(frozen=True)
class Case:
    """One training run of the worker: the method and how DeepSpeed and the engine are set up.
    Every field left at its default leaves that part of :func:`common.ds_config` as it is."""

    method: str
    stage: Optional[int] = None  # ZeRO stage; None: no zero_optimization section (ZeRO 0)
    persist: Optional[int] = None  # stage3_param_persistence_threshold (0: every parameter partitioned)
    bf16: bool = False  # bf16 enabled (fp32 masters)
    precondition_norm: Optional[str] = None  # optimizer.params.precondition_norm (None: "perturbation")
    eps: Optional[float] = None  # AdamW's eps (None: 1e-8)
    cache: Optional[str] = None  # optimizer.params.logit_grad_cache
    every: Optional[int] = None  # optimizer.params.ascent_every
    momentum: bool = False  # optimizer.params.ascent_direction "momentum"
    loop: Optional[str] = None  # loop mode with the model's own loss ("hf") or the logits' ("logits")
    sched: bool = False  # a WarmupLR over 4 steps and rho_warmup_steps 3
    run: Optional[str] = None  # a RUNS entry (steps, data, injected faults) with the same warm-ups

    def options(self) -> dict:
        """The fields set away from their defaults, under their short names (what :attr:`name` lists)."""
        short = {"momentum": "mom"}
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "method" and value != f.default:
                out[short.get(f.name, f.name)] = int(value) if isinstance(value, bool) else value
        return out

    @property
    def name(self) -> str:
        """The file stem of this case's results, and its test id: the method and its options."""
        return self.method + "".join(f"-{k}={v}" for k, v in sorted(self.options().items()))

    @property
    def layout(self) -> str:
        """The options but ``run``: which data/fault schedule ran is in ``run``, the layout is the rest."""
        return "-".join(f"{k}={v}" for k, v in sorted(self.options().items()) if k != "run")

    def but(self, **changes) -> "Case":
        """This case with some fields changed."""
        return replace(self, **changes)

    def reference_options(self) -> dict:
        """The keyword arguments of the reference (``common.reference_state``) this case's
        optimizer settings need."""
        out = {}
        if self.precondition_norm is not None:
            out["precondition_norm"] = self.precondition_norm
        if self.eps is not None:
            out["eps"] = self.eps
        return out


# the layouts of the non-finite cases: ZeRO 0 fp32 and bf16, ZeRO 1 and 2 bf16, ZeRO 3 fp32
NONFINITE_LAYOUTS = (
    Case(PFSAM, stage=0),
    Case(PFSAM, stage=0, bf16=True),
    Case(PFSAM, stage=1, bf16=True),
    Case(PFSAM, stage=2, bf16=True),
    Case(PFSAM, stage=3),
)

CASES = {
    "zero0": [Case(m) for m in METHODS]
    + [Case(PFSAM, precondition_norm="gradient", eps=1e-3)]
    # loop mode (a plain DeepSpeed loop: engine(...), engine.backward(loss), engine.step()): with the
    # model's own loss, a DeepSpeed LR warm-up and a rho warm-up against the reference ("hf"), and with
    # the default loss of the logits bit-identical to train_batch's case without loop ("logits")
    + [Case(m, loop="hf", sched=True) for m in SAM_TYPES]
    + [Case(m, loop="logits") for m in SAM_TYPES],
    # ZeRO-1/2/3, fp32; ZeRO-3 with every parameter partitioned (threshold 0) and with every
    # parameter persistent (the default threshold on this tiny model); ZeRO-3 and ZeRO-0 in bf16
    "zero": [Case(m, stage=st) for st in (1, 2, 3) for m in METHODS]
    + [Case(m, stage=3, persist=0) for m in SAM_TYPES]
    + [Case(PFSAM, stage=st, bf16=True) for st in (0, 3)]
    + [Case(m, stage=2, loop="logits") for m in SAM_TYPES]
    + [Case(PFSAM, stage=1, loop="logits")]
    + [Case(PFSAM, stage=st, bf16=True, loop="logits") for st in (0, 3)]
    + [Case(m, stage=3, loop="hf", sched=True) for m in SAM_TYPES],
    # tests/test_launcher.py: two launcher "nodes" of one rank each, and four ranks on one node
    "twonode": [Case(PFSAM, stage=3), Case("SAM", stage=1)],
    "fourrank": [Case(PFSAM, stage=3), Case("FunctionalSAM", stage=2)],
    # tests/test_perf_modes.py: the logit-gradient caches and ascent_every at ZeRO-3 with every
    # parameter partitioned (the output layer's weight is gathered only for its forward)
    "perf": [Case(PFSAM, stage=3, persist=0, cache=c) for c in ("device", "host", "recompute")]
    + [Case(PFSAM, stage=3, persist=0, every=2), Case("SAM", stage=3, persist=0, every=2)]
    # ascent_direction "momentum" at ZeRO 0 and ZeRO 3 (every parameter partitioned)
    + [
        Case(PFSAM, stage=0, momentum=True),
        Case(PFSAM, stage=3, persist=0, momentum=True),
        Case("SAM", stage=3, persist=0, momentum=True),
    ]
    # the caches and ascent_every in loop mode (a plain DeepSpeed loop): bit-identical to train_batch's cases above
    + [Case(PFSAM, stage=3, persist=0, cache=c, loop="logits") for c in ("device", "host", "recompute")]
    + [Case(m, stage=3, persist=0, every=2, loop="logits") for m in (PFSAM, "SAM")],
    # tests/test_nonfinite.py: an infinite logit in pass 1 (step 1, rank 1) and in pass 2 (step 3,
    # rank 0) against the run that never saw those two steps' data; a rho that blows up pass 2.
    # ZeRO 0 fp32 is skipped by the engine itself, the others by DeepSpeed's own check
    "nonfinite": [
        layout.but(run=run)
        for layout in (
            *NONFINITE_LAYOUTS,
            # the "gradient" normalisation sees a wrong bias-correction step count
            # after a skipped step (the default normalisation cancels it)
            Case(PFSAM, stage=1, bf16=True, precondition_norm="gradient", eps=1e-3),
            Case(PFSAM, stage=3, precondition_norm="gradient", eps=1e-3),
        )
        for run in ("faults", "ref")
    ]
    + [Case("SAM", stage=0, run="blowup"), Case(PFSAM, stage=3, run="blowup")]
    # a loss that is infinite while its gradients are finite (loss_fn's loss + inf) on rank 1 in pass 1
    # of step 1 (and, for SAM, whose pass 2 recomputes the loss, on rank 0 in pass 2 of step 3)
    + [layout.but(run=run) for layout in NONFINITE_LAYOUTS for run in ("lossinf", "ref1")]
    + [Case("SAM", stage=0, run=run) for run in ("lossinf2", "ref")],
}
FAULTS = ((1, 1, 1), (3, 2, 0))
LOSS_FAULTS = ((1, 1, 1),)
RUNS = {
    "faults": dict(steps=5, faults=FAULTS),
    "ref": dict(steps=3, data_steps=[0, 2, 4]),
    "blowup": dict(steps=2),
    "lossinf": dict(steps=5, loss_faults=LOSS_FAULTS),
    "ref1": dict(steps=4, data_steps=[0, 2, 3, 4]),
    "lossinf2": dict(steps=5, loss_faults=FAULTS),
}


def case_config(case: Case) -> dict:
    params_norm = case.precondition_norm or "perturbation"
    cfg = ds_config(case.method, precondition_norm=params_norm)
    params = cfg["optimizer"]["params"]
    if case.eps is not None:
        params["eps"] = case.eps
    if case.stage is not None:
        cfg["zero_optimization"] = {"stage": case.stage}
        if case.persist is not None:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = case.persist
    if case.cache is not None:
        params["logit_grad_cache"] = case.cache
    if case.every is not None:
        params["ascent_every"] = case.every
    if case.momentum:
        params["ascent_direction"] = "momentum"
    if case.bf16:
        cfg["bf16"] = {"enabled": True}
    # a warm-up of both the learning rate and rho (the non-finite runs: a skipped step must hold both)
    if case.sched or case.run is not None:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": params["lr"],
                "warmup_num_steps": 4,
                "warmup_type": "linear",
            },
        }
    if case.sched:
        params["rho_warmup_steps"] = 3
    if case.run == "blowup":
        params["rho"] = 1e30
    elif case.run is not None:
        params["rho_warmup_steps"] = 3
    return cfg


def main():
    ap = worker_parser()
    ap.add_argument("--suite", default="zero0")
    args = ap.parse_args()
    out = Path(args.out)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for case in CASES[args.suite]:
        state, losses, metrics = engine_run(
            case.method,
            world=world,
            rank=rank,
            config=case_config(case),
            check_restore=case.method != "AdamW",
            loop=case.loop,
            **RUNS.get(case.run, {}),
        )
        save_rank_result(out, case.name, rank, {"losses": losses, "metrics": metrics}, state=state)
    dist.barrier()
    # a group left to the interpreter's exit sometimes aborts a rank ("terminate called without an
    # active exception", exit -6) after all its work is written; fsam-train destroys its group too
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
