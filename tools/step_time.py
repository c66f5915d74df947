"""Step time and peak memory of every method against AdamW, measured in one run.

    python tools/step_time.py --preset 2m --seq-len 128 --micro-batch 8 --steps 10
    python tools/step_time.py --preset 24m --dtype bf16 --seq-len 512 --micro-batch 8   # on a GPU

Each method trains the same preset (same seed) for ``--warmup`` untimed and ``--steps`` timed
optimizer steps on one rank; the table gives the median step time, its spread (min-max), the
ratio to AdamW's median and the peak memory (GPU: max allocated; CPU: the process's peak RSS,
which only grows, so read CPU memory from separate runs).
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time

import torch

METHODS = ("AdamW", "SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")


def config(method: str, args) -> dict:
    params = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if method != "AdamW":
        params["rho"] = 0.05
    cfg = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": args.gas,
           "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "zero_optimization": {"stage": args.zero_stage},
           "optimizer": {"type": method, "params": params}}
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def measure(method: str, args) -> dict:
    import fsam_ds
    from fsam_ds import models

    torch.manual_seed(0)
    model = models.build_model(args.preset, max_seq_len=args.seq_len)
    vocab = model.config.vocab_size
    engine, *_ = fsam_ds.initialize(model=model, config=config(method, args))
    dev = engine.device
    gen = torch.Generator().manual_seed(1)

    def batches():
        while True:
            yield {"input_ids": torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen)}

    data = batches()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        engine.train_batch(data)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"method": method, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
           "peak_bytes": int(peak), "device": str(dev), "last_loss": engine.last_metrics["loss"]}
    del engine, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--gas", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    rows = [measure(m, args) for m in args.methods.split(",")]
    base = next((r for r in rows if r["method"] == "AdamW"), rows[0])
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.preset} | {args.dtype} | ZeRO {args.zero_stage} | micro {args.micro_batch} x seq {args.seq_len} "
          f"x gas {args.gas} | {name}")
    print(f"{'method':<30}{'median s':>10}{'min-max s':>18}{'x AdamW':>9}{'peak GiB':>10}{'x AdamW':>9}")
    for r in rows:
        r["time_ratio"] = r["median_s"] / base["median_s"]
        r["memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        print(f"{r['method']:<30}{r['median_s']:>10.4f}{r['min_s']:>9.4f}-{r['max_s']:<8.4f}{r['time_ratio']:>9.2f}"
              f"{r['peak_bytes'] / 2**30:>10.3f}{r['memory_ratio']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": name, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
