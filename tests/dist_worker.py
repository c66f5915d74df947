"""Multi-rank worker: started once by the deepspeed launcher, runs every case of a test module in
one process group and saves what the test compares (rank 0's weights, every rank's losses)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from common import ds_config, engine_run  # noqa: E402

METHODS = ("AdamW", "SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")
SAM_TYPES = METHODS[1:]
CASES = {
    "zero0": [(m, {}) for m in METHODS]
    + [("PreconditionedFunctionalSAM", {"precondition_norm": "gradient", "eps": 1e-3})]
    # loop mode (a plain DeepSpeed loop: engine(...), engine.backward(loss), engine.step()): with the
    # model's own loss, a DeepSpeed LR warm-up and a rho warm-up against the reference ("hf"), and with
    # the default loss of the logits bit-identical to train_batch's case without "loop" ("logits")
    + [(m, {"loop": "hf", "sched": 1}) for m in SAM_TYPES] + [(m, {"loop": "logits"}) for m in SAM_TYPES],
    # ZeRO-1/2/3, fp32; ZeRO-3 with every parameter partitioned (threshold 0) and with every
    # parameter persistent (the default threshold on this tiny model); ZeRO-3 and ZeRO-0 in bf16
    "zero": [(m, {"stage": st}) for st in (1, 2, 3) for m in METHODS]
    + [(m, {"stage": 3, "persist": 0}) for m in METHODS[1:]]
    + [("PreconditionedFunctionalSAM", {"stage": st, "bf16": 1}) for st in (0, 3)]
    + [(m, {"stage": 2, "loop": "logits"}) for m in SAM_TYPES]
    + [("PreconditionedFunctionalSAM", {"stage": 1, "loop": "logits"})]
    + [("PreconditionedFunctionalSAM", {"stage": st, "bf16": 1, "loop": "logits"}) for st in (0, 3)]
    + [(m, {"stage": 3, "loop": "hf", "sched": 1}) for m in SAM_TYPES],
    # tests/test_launcher.py: two launcher "nodes" of one rank each, and four ranks on one node
    "twonode": [("PreconditionedFunctionalSAM", {"stage": 3}), ("SAM", {"stage": 1})],
    "fourrank": [("PreconditionedFunctionalSAM", {"stage": 3}), ("FunctionalSAM", {"stage": 2})],
    # tests/test_perf_modes.py: the logit-gradient caches and ascent_every at ZeRO-3 with every
    # parameter partitioned (the output layer's weight is gathered only for its forward)
    "perf": [("PreconditionedFunctionalSAM", {"stage": 3, "persist": 0, "cache": c})
             for c in ("device", "host", "recompute")]
    + [("PreconditionedFunctionalSAM", {"stage": 3, "persist": 0, "every": 2}),
       ("SAM", {"stage": 3, "persist": 0, "every": 2})]
    # ascent_direction "momentum" at ZeRO 0 and ZeRO 3 (every parameter partitioned)
    + [("PreconditionedFunctionalSAM", {"stage": 0, "mom": 1}),
       ("PreconditionedFunctionalSAM", {"stage": 3, "persist": 0, "mom": 1}),
       ("SAM", {"stage": 3, "persist": 0, "mom": 1})]
    # the caches and ascent_every in loop mode (a plain DeepSpeed loop): bit-identical to train_batch's cases above
    + [("PreconditionedFunctionalSAM", {"stage": 3, "persist": 0, "cache": c, "loop": "logits"})
       for c in ("device", "host", "recompute")]
    + [(m, {"stage": 3, "persist": 0, "every": 2, "loop": "logits"}) for m in ("PreconditionedFunctionalSAM", "SAM")],
    # tests/test_nonfinite.py: an infinite logit in pass 1 (step 1, rank 1) and in pass 2 (step 3,
    # rank 0) against the run that never saw those two steps' data; a rho that blows up pass 2.
    # ZeRO 0 fp32 is skipped by the engine itself, the others by DeepSpeed's own check
    "nonfinite": [("PreconditionedFunctionalSAM", dict(layout, run=run))
                  for layout in ({"stage": 0}, {"stage": 0, "bf16": 1}, {"stage": 1, "bf16": 1},
                                 {"stage": 2, "bf16": 1}, {"stage": 3},
                                 # the "gradient" normalisation sees a wrong bias-correction step count
                                 # after a skipped step (the default normalisation cancels it)
                                 {"stage": 1, "bf16": 1, "precondition_norm": "gradient", "eps": 1e-3},
                                 {"stage": 3, "precondition_norm": "gradient", "eps": 1e-3})
                  for run in ("faults", "ref")]
    + [("SAM", {"stage": 0, "run": "blowup"}), ("PreconditionedFunctionalSAM", {"stage": 3, "run": "blowup"})]
    # a loss that is infinite while its gradients are finite (loss_fn's loss + inf) on rank 1 in pass 1
    # of step 1 (and, for SAM, whose pass 2 recomputes the loss, on rank 0 in pass 2 of step 3)
    + [("PreconditionedFunctionalSAM", dict(layout, run=run))
       for layout in ({"stage": 0}, {"stage": 0, "bf16": 1}, {"stage": 1, "bf16": 1}, {"stage": 2, "bf16": 1},
                      {"stage": 3}) for run in ("lossinf", "ref1")]
    + [("SAM", {"stage": 0, "run": run}) for run in ("lossinf2", "ref")],
}
FAULTS = ((1, 1, 1), (3, 2, 0))
LOSS_FAULTS = ((1, 1, 1),)
RUNS = {"faults": dict(steps=5, faults=FAULTS), "ref": dict(steps=3, data_steps=[0, 2, 4]), "blowup": dict(steps=2),
        "lossinf": dict(steps=5, loss_faults=LOSS_FAULTS), "ref1": dict(steps=4, data_steps=[0, 2, 3, 4]),
        "lossinf2": dict(steps=5, loss_faults=FAULTS)}


def case_config(method, opts):
    cfg = ds_config(method, precondition_norm=opts.get("precondition_norm", "perturbation"))
    if "eps" in opts:
        cfg["optimizer"]["params"]["eps"] = opts["eps"]
    if "stage" in opts:
        cfg["zero_optimization"] = {"stage": opts["stage"]}
        if "persist" in opts:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = opts["persist"]
    if "cache" in opts:
        cfg["optimizer"]["params"]["logit_grad_cache"] = opts["cache"]
    if "every" in opts:
        cfg["optimizer"]["params"]["ascent_every"] = opts["every"]
    if opts.get("mom"):
        cfg["optimizer"]["params"]["ascent_direction"] = "momentum"
    if opts.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    if opts.get("sched"):  # a warm-up of both the learning rate and rho
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg["optimizer"]
                            ["params"]["lr"], "warmup_num_steps": 4, "warmup_type": "linear"}}
        cfg["optimizer"]["params"]["rho_warmup_steps"] = 3
    if "run" in opts:  # a warm-up of both the learning rate and rho: a skipped step must hold both
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": cfg["optimizer"]
                            ["params"]["lr"], "warmup_num_steps": 4, "warmup_type": "linear"}}
        if opts["run"] == "blowup":
            cfg["optimizer"]["params"]["rho"] = 1e30
        else:
            cfg["optimizer"]["params"]["rho_warmup_steps"] = 3
    return cfg


def case_name(method, opts):
    return method + "".join(f"-{k}={v}" for k, v in sorted(opts.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--suite", default="zero0")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for method, opts in CASES[args.suite]:
        state, losses, metrics = engine_run(method, world=world, rank=rank, config=case_config(method, opts),
                                            check_restore=method != "AdamW", loop=opts.get("loop"),
                                            **RUNS.get(opts.get("run"), {}))
        name = case_name(method, opts)
        if rank == 0:
            torch.save(state, out / f"{name}.pt")
        (out / f"{name}.rank{rank}.json").write_text(json.dumps({"losses": losses, "metrics": metrics}))
    dist.barrier()
    # a group left to the interpreter's exit sometimes aborts a rank ("terminate called without an
    # active exception", exit -6) after all its work is written; fsam-train destroys its group too
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
