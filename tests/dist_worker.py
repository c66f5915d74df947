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

CASES = {
    "zero0": [(m, {}) for m in ("AdamW", "SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")]
    + [("PreconditionedFunctionalSAM", {"precondition_norm": "gradient", "eps": 1e-3})],
}


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
        cfg = ds_config(method, precondition_norm=opts.get("precondition_norm", "perturbation"))
        if "eps" in opts:
            cfg["optimizer"]["params"]["eps"] = opts["eps"]
        state, losses, metrics = engine_run(method, world=world, rank=rank, config=cfg)
        name = case_name(method, opts)
        if rank == 0:
            torch.save(state, out / f"{name}.pt")
        (out / f"{name}.rank{rank}.json").write_text(json.dumps({"losses": losses, "metrics": metrics}))
    dist.barrier()


if __name__ == "__main__":
    main()
