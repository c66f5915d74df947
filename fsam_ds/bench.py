"""fsam-bench: step time and peak memory of AdamW and every method variant, measured in one run.

    fsam-bench --quick                                             # ~2M preset, a few steps: < 1 min on 2 CPU cores
    fsam-bench --preset 2m --micro-batch 8 --seq-len 128 --steps 10 --json bench.json
    fsam-bench --preset 24m --zero-stage 3 --world-size 2          # two ranks under the deepspeed launcher
    fsam-bench --gpu --preset 118m --micro-batch 8 --seq-len 1024  # GPU mode: bf16, CUDA timings and memory

One invocation trains the same preset (same seed, same random tokens) with every variant in turn:
AdamW, SAM, PreconditionedSAM, FunctionalSAM, PreconditionedFunctionalSAM (``logit_grad_cache``
"device"), the functional types with "host" and "recompute", PreconditionedFunctionalSAM and
SAM with ``ascent_every`` k (``--every``) and PreconditionedFunctionalSAM with ``ascent_direction``
"momentum" (``+momentum``). Timing: every variant's engine is built first, then
each takes one optimizer step in turn, ``--warmup`` untimed rounds and ``--steps`` timed ones, so
a drift of the machine's load hits every variant alike (``--sequential``: one variant after the
other). The table gives the median step time, its spread (min-max), the ratio to AdamW's median,
and the peak memory, measured in a separate pass before the timing where each variant is built
alone and takes ``max(warmup, 1) + 1`` steps (``--sequential --mmap-threshold-for all``: over the
variant's own timed run):

* GPU: ``torch.cuda.max_memory_allocated`` (reset before each variant is built);
* CPU: the peak resident set of each rank (``VmHWM``, reset before each variant through
  ``/proc/self/clear_refs``; without that file the process's monotone ``ru_maxrss``), and the
  variant's own share: that peak less the resident set just before the variant was built. The
  memory pass runs in its own worker process with glibc's mmap threshold fixed
  (``MALLOC_MMAP_THRESHOLD_``, ``--malloc-mmap-threshold``, default 131072 bytes) so freed tensors
  leave the resident set and variants do not inherit each other's heap. The timing runs in a second
  worker process without it (``--mmap-threshold-for all``: one worker with it for both, as before):
  with every allocation above 128 KiB an mmap/munmap pair, the CPU step times roughly double
  (AdamW on the 2m preset: 0.16 s -> 0.31 s here) and the ratios to AdamW shift a little.

The workers are separate processes (one, or ``--world-size`` ranks started by the ``deepspeed``
launcher; one set for the memory pass and one for the timing); this process only collects their
JSON, prints the table and writes ``--json`` (schema ``fsam-bench/2``: the arguments, the setting,
the memory resolution, the mmap threshold of each pass and, per variant, every timed step of rank 0
in ``times_s``, round by round; ``python -m tools.targets`` on a checkout renders the targets table from it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import names as _names
from .distributed import free_port

PROG = "fsam-bench"
SCHEMA = "fsam-bench/2"
MMAP_THRESHOLD = 131072  # bytes: glibc's default threshold, fixed (no dynamic growth) for the memory pass
METHODS = _names.METHODS
CACHES = _names.LOGIT_GRAD_CACHES


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def variant_name(method: str, cache: str = "device", every: int = 1, momentum: bool = False) -> str:
    name = method
    if cache != "device":
        name += f"+{cache}"
    if every > 1:
        name += f"+every{every}"
    if momentum:
        name += "+momentum"
    return name


def parse_variant(name: str) -> Dict[str, Any]:
    parts = name.split("+")
    method, cache, every, momentum = parts[0], "device", 1, False
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in variant {name!r}; accepted: {', '.join(METHODS)}")
    for p in parts[1:]:
        if p in CACHES:
            cache = p
        elif p.startswith("every") and p[5:].isdigit() and int(p[5:]) >= 1:
            every = int(p[5:])
        elif p == "momentum":  # ascent_direction "momentum"
            momentum = True
        else:
            raise ValueError(
                f"unknown option {p!r} in variant {name!r}; accepted: {', '.join(CACHES)}, everyK, momentum"
            )
    if method == "AdamW" and (cache != "device" or every > 1 or momentum):
        raise ValueError(f"variant {name!r}: AdamW takes no cache, everyK or momentum option")
    if momentum and every > 1:
        raise ValueError(f"variant {name!r}: momentum and everyK do not combine")
    if cache != "device" and not method.endswith("FunctionalSAM"):
        raise ValueError(f"variant {name!r}: logit_grad_cache applies to the functional types only")
    return {"method": method, "cache": cache, "every": every, "momentum": momentum}


def default_variants(everys: List[int], quick: bool) -> List[str]:
    out = list(METHODS)
    caches = ("host", "recompute")
    out += [variant_name("PreconditionedFunctionalSAM", c) for c in caches]
    if not quick:
        out += [variant_name("FunctionalSAM", c) for c in caches]
    for k in everys:
        out.append(variant_name("PreconditionedFunctionalSAM", every=k))
    out.append(variant_name("PreconditionedFunctionalSAM", momentum=True))  # the other sub-2x mode
    if not quick:
        out += [variant_name("PreconditionedFunctionalSAM", "recompute", k) for k in everys[-1:]]
        out += [variant_name("SAM", every=k) for k in everys[-1:]]
    return out


def ds_config(v: Dict[str, Any], a) -> dict:
    params: Dict[str, Any] = {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    if v["method"] != "AdamW":
        params["rho"] = 0.05
        if v["cache"] != "device":
            params["logit_grad_cache"] = v["cache"]
        if v["every"] > 1:
            params["ascent_every"] = v["every"]
        if v.get("momentum"):
            params["ascent_direction"] = "momentum"
    cfg = {
        "train_micro_batch_size_per_gpu": a.micro_batch,
        "gradient_accumulation_steps": a.gas,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": a.zero_stage},
        "optimizer": {"type": v["method"], "params": params},
        "wall_clock_breakdown": False,
    }
    if a.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


# ---------------------------------------------------------------------------------------------
# Memory probes
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil  # only where /proc is missing
    except ImportError as err:
        raise RuntimeError(
            "fsam-bench reads the resident set from /proc/self/status; where that file is missing "
            "it needs psutil: pip install psutil"
        ) from err
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# The worker (one per rank)
# ---------------------------------------------------------------------------------------------


def _build(vname: str, a, rank: int):
    import torch

    import fsam_ds
    from fsam_ds import models

    v = parse_variant(vname)
    cfg = ds_config(v, a)
    torch.manual_seed(0)
    model = models.build_model(
        a.preset,
        max_seq_len=a.seq_len,
        zero3_config=cfg if a.zero_stage == 3 else None,
        dtype=torch.bfloat16 if (a.dtype == "bf16" and a.zero_stage != 3) else torch.float32,
    )
    vocab = model.config.vocab_size
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    engine, *_ = fsam_ds.initialize(model=model, config=cfg)
    gen = torch.Generator().manual_seed(1 + rank)

    def batches():
        while True:
            yield {"input_ids": torch.randint(0, vocab, (a.micro_batch, a.seq_len), generator=gen)}

    return {
        "variant": vname,
        **v,
        "engine": engine,
        "data": batches(),
        "parameters": int(n_params),
        "times_s": [],
        "reused": [],
    }


def _step(item, timed: bool) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    item["engine"].train_batch(item["data"])
    if cuda:
        torch.cuda.synchronize()
    if timed:
        item["times_s"].append(time.perf_counter() - t0)
        item["reused"].append(bool(item["engine"].last_metrics.get("ascent_reused", False)))


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _PeakProbe:
    """Peak memory from ``start()`` on: CUDA max allocated, or the CPU peak resident set."""

    def start(self):
        import torch

        _free()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.reset = True
        else:
            self.base = rss_bytes()
            self.reset = reset_peak_rss()
        return self

    def read(self) -> Dict[str, Any]:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
        return {"peak_bytes": int(peak), "own_bytes": int(peak - self.base) if self.reset else None}


def _memory(vname: str, a, rank: int) -> Dict[str, Any]:
    """Peak memory of one variant alone: built after a reset of the peak, ``max(warmup, 1) + 1``
    steps (the second step is the first with AdamW's state, the preconditioner and every buffer)."""
    probe = _PeakProbe().start()
    item = _build(vname, a, rank)
    for _ in range(max(a.warmup, 1) + 1):
        _step(item, False)
    out = probe.read()
    out["parameters"] = item["parameters"]
    del item
    _free()
    return out


def worker(a) -> int:
    import torch

    import fsam_ds

    fsam_ds.init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if not torch.cuda.is_available() and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // world))

    def say(msg):
        if rank == 0:
            print(f"[{PROG}] {msg}", flush=True)

    # one untimed build and step first: one-time costs (lazy imports, DeepSpeed's compiled ops,
    # allocator pools) are then not charged to the first variant
    warm = _build("AdamW", a, rank)
    _step(warm, False)
    del warm
    _free()
    memory = {}
    rows = []
    if a.phase == "memory":  # the memory pass alone (its own process: the mmap threshold is fixed here)
        for vname in a.variants:
            memory[vname] = _memory(vname, a, rank)
            say(f"memory {vname}: peak {memory[vname]['peak_bytes'] / 2**20:.1f} MiB")
        rows = [
            {"variant": v, **parse_variant(v), "parameters": memory[v].pop("parameters"), "times_s": [], "reused": []}
            for v in a.variants
        ]
    elif a.sequential:  # one build per variant: memory over its warm-up and timed steps
        for vname in a.variants:
            probe = _PeakProbe().start()
            item = _build(vname, a, rank)
            for i in range(a.warmup + a.steps):
                _step(item, i >= a.warmup)
            item.pop("engine"), item.pop("data")
            if not a.no_memory:
                memory[vname] = probe.read()
            rows.append(item)
            _free()
            say(f"{vname}: median {statistics.median(item['times_s']):.4f} s")
    else:
        if not a.no_memory:
            for vname in a.variants:
                memory[vname] = _memory(vname, a, rank)
                memory[vname].pop("parameters")
                say(f"memory {vname}: peak {memory[vname]['peak_bytes'] / 2**20:.1f} MiB")
        # every engine alive at once, one step of each in turn: drift of the machine's load hits
        # every variant alike
        items = [_build(v, a, rank) for v in a.variants]
        for i in range(a.warmup + a.steps):
            for item in items:
                _step(item, i >= a.warmup)
        for item in items:
            item.pop("engine"), item.pop("data")
            rows.append(item)
            say(f"time {item['variant']}: median {statistics.median(item['times_s']):.4f} s")
        del items
        _free()
    for row in rows:
        row.update(memory.get(row["variant"], {"peak_bytes": None, "own_bytes": None}))
        row["rank"] = rank
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    Path(a.worker_out, f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "world": world, "device": device, "threads": torch.get_num_threads(), "rows": rows})
    )
    dist.barrier()
    return 0


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def cpu_cores_and_model(default: str) -> Tuple[Optional[int], str]:
    """The CPU cores this process may run on and the CPU's model name (``/proc/cpuinfo``;
    ``default`` where that file has none)."""
    cpu = default
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores, cpu


def _machine() -> str:
    import platform

    cores, cpu = cpu_cores_and_model(platform.machine())
    try:
        load = " load average %.2f %.2f %.2f at start" % os.getloadavg()
    except OSError:
        load = ""
    return f"{cores} CPU cores ({cpu}),{load}"


def summarise(ranks: List[dict]) -> List[Dict[str, Any]]:
    """One row per variant: rank 0's step times over every round, memory maxima over ranks."""
    by: Dict[str, Dict[str, Any]] = {}
    for rk in ranks:
        for row in rk["rows"]:
            d = by.setdefault(
                row["variant"],
                {
                    "variant": row["variant"],
                    "method": row["method"],
                    "cache": row["cache"],
                    "every": row["every"],
                    "times_s": [],
                    "peak_bytes_per_rank": {},
                    "own_bytes_per_rank": {},
                    "parameters": row["parameters"],
                    "reused_fraction": None,
                },
            )
            if rk["rank"] == 0:
                d["times_s"] += row["times_s"]
                d["reused_fraction"] = sum(row["reused"]) / max(1, len(row["reused"]))
            r = str(rk["rank"])
            if row["peak_bytes"] is not None:
                d["peak_bytes_per_rank"][r] = max(d["peak_bytes_per_rank"].get(r, 0), row["peak_bytes"])
            if row["own_bytes"] is not None:
                d["own_bytes_per_rank"][r] = max(d["own_bytes_per_rank"].get(r, 0), row["own_bytes"])
    rows = list(by.values())
    for d in rows:
        t = d["times_s"]
        d.update(
            median_s=statistics.median(t),
            min_s=min(t),
            max_s=max(t),
            peak_bytes=max(d["peak_bytes_per_rank"].values()) if d["peak_bytes_per_rank"] else None,
            own_bytes=max(d["own_bytes_per_rank"].values()) if d["own_bytes_per_rank"] else None,
        )
    base = next((d for d in rows if d["variant"] == "AdamW"), rows[0])
    for d in rows:
        d["time_ratio"] = d["median_s"] / base["median_s"]
        d["memory_ratio"] = d["peak_bytes"] / base["peak_bytes"] if d["peak_bytes"] else None
        d["own_memory_ratio"] = (
            d["own_bytes"] / base["own_bytes"] if d["own_bytes"] is not None and base["own_bytes"] else None
        )
    return rows


def table(rows: List[dict], header: str, gpu: bool) -> str:
    mem = "alloc" if gpu else "RSS"
    lines = [
        header,
        f"{'variant':<44}{'median s':>10}{'min-max s':>18}{'x AdamW':>9}"
        f"{'peak ' + mem + ' MiB':>15}{'x AdamW':>9}" + ("" if gpu else f"{'own MiB':>10}{'x AdamW':>9}"),
    ]
    for d in rows:
        line = f"{d['variant']:<44}{d['median_s']:>10.4f}{d['min_s']:>9.4f}-{d['max_s']:<8.4f}{d['time_ratio']:>9.2f}"
        line += f"{d['peak_bytes'] / 2**20:>15.1f}{d['memory_ratio']:>9.3f}" if d["peak_bytes"] else f"{'n/a':>15}"
        if not gpu:
            own = d["own_bytes"]
            line += f"{own / 2**20:>10.1f}{d['own_memory_ratio']:>9.3f}" if own is not None else f"{'n/a':>10}"
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Step time and peak memory of AdamW and every method "
        "variant, measured in one run (ratios to AdamW)",
    )
    p.add_argument("--preset", default="2m", help="model preset (tiny, 2m, 24m, 42m, 118m, 1.2b)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gas", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--world-size", type=int, default=1, help="ranks (> 1: started by the deepspeed launcher)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default fp32, bf16 with --gpu")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="time one variant after the other (default: every engine built first, then one step of each in turn)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory pass")
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD,
        metavar="BYTES",
        help=f"glibc's MALLOC_MMAP_THRESHOLD_ for the memory pass (default {MMAP_THRESHOLD}; 0: leave "
        "glibc's dynamic threshold); a value already in the environment is kept for every pass",
    )
    p.add_argument(
        "--mmap-threshold-for",
        choices=("memory", "all"),
        default="memory",
        help="'memory' (default): the memory pass runs in its own worker with the threshold and the "
        "timing in one without; 'all': one worker with the threshold for both (slower CPU steps)",
    )
    p.add_argument(
        "--memory-resolution-mib",
        type=float,
        default=None,
        help="the resolution of one memory reading "
        "written to --json for tools/targets.py (default: 15 MiB for the CPU resident set, 0 on a GPU)",
    )
    p.add_argument("--every", default="2,4", help="ascent_every values to bench (comma-separated)")
    p.add_argument(
        "--variants",
        "--methods",
        dest="variants",
        default=None,
        help="comma-separated, e.g. AdamW,FunctionalSAM+recompute,"
        "PreconditionedFunctionalSAM+every2 (default: every method, cache mode and --every)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2m preset, micro 2 x seq 32, 1 warm-up + 3 steps, "
        "sequential, fewer variants: under a minute on 2 CPU cores",
    )
    p.add_argument("--gpu", action="store_true", help="GPU mode: requires CUDA; bf16 unless --dtype fp32")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("both", "memory", "time"), default="both", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _worker_pythonpath(current: str) -> str:
    """PYTHONPATH for the workers (``python -m fsam_ds.bench``): the folder holding this ``fsam_ds``
    first (a checkout used without installing), unless it is a site directory of this interpreter."""
    import site

    parent = Path(__file__).resolve().parents[1]
    sites = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return os.pathsep.join(([] if parent in sites else [str(parent)]) + [x for x in current.split(os.pathsep) if x])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.worker:
        a.variants = a.variants.split(",")
        return worker(a)
    if a.quick:
        a.micro_batch, a.seq_len, a.warmup, a.steps, a.sequential = 2, 32, 1, 3, True
        if "--preset" not in argv:
            a.preset = "2m"
    if a.dtype is None:
        a.dtype = "bf16" if a.gpu else "fp32"
    for key in ("micro_batch", "seq_len", "gas", "world_size", "steps"):
        if getattr(a, key) < 1:
            return _error(f"--{key.replace('_', '-')} must be an integer >= 1, got {getattr(a, key)}")
    if a.warmup < 0:
        return _error(f"--warmup must be an integer >= 0, got {a.warmup}")
    try:
        everys = [int(x) for x in a.every.split(",") if x.strip()]
        if any(k < 2 for k in everys):
            raise ValueError
    except ValueError:
        return _error(f"--every {a.every!r}: accepted: comma-separated integers >= 2")
    variants = a.variants.split(",") if a.variants else default_variants(everys, a.quick)
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as err:
            return _error(f"--variants: {err}")
    if "AdamW" not in variants:
        variants = ["AdamW"] + variants
    if a.gpu:
        import torch

        if not torch.cuda.is_available():
            return _error(
                "--gpu: no CUDA device is visible; accepted: run it on a machine with a GPU, or leave --gpu out"
            )
    if a.malloc_mmap_threshold < 0:
        return _error(f"--malloc-mmap-threshold must be >= 0, got {a.malloc_mmap_threshold}")
    common = [
        "--preset",
        a.preset,
        "--micro-batch",
        str(a.micro_batch),
        "--seq-len",
        str(a.seq_len),
        "--gas",
        str(a.gas),
        "--zero-stage",
        str(a.zero_stage),
        "--dtype",
        a.dtype,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--variants",
        ",".join(variants),
        "--worker",
    ] + (["--sequential"] if a.sequential else [])
    # the worker starts its own process group: a caller's (e.g. a one-rank job in this process,
    # whose store still listens on MASTER_PORT) must not leak into it
    from fsam_ds.distributed import without_process_group_env

    env = without_process_group_env()
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONPATH"] = _worker_pythonpath(env.get("PYTHONPATH", ""))
    mem_env = dict(env)
    if a.malloc_mmap_threshold:
        mem_env.setdefault("MALLOC_MMAP_THRESHOLD_", str(a.malloc_mmap_threshold))  # freed tensors leave the RSS
    if a.no_memory:
        phases = [("time", mem_env if a.mmap_threshold_for == "all" else env)]
    elif a.mmap_threshold_for == "all":
        phases = [("both", mem_env)]
    else:
        phases = [("memory", mem_env), ("time", env)]
    machine = _machine()
    t0 = time.time()
    results: Dict[str, List[dict]] = {}
    for phase, penv in phases:
        tmp = Path(tempfile.mkdtemp(prefix="fsam-bench-"))
        args = common + ["--worker-out", str(tmp), "--phase", phase] + (["--no-memory"] if phase == "time" else [])
        if a.world_size == 1:
            cmd = [sys.executable, "-m", "fsam_ds.bench"] + args
        else:
            launcher = shutil.which("deepspeed")
            if launcher is None:
                return _error("--world-size > 1 needs the deepspeed launcher on PATH")
            cmd = [
                launcher,
                "--num_gpus",
                str(a.world_size),
                "--master_port",
                str(free_port()),
                "--module",
                "fsam_ds.bench",
            ] + args
        proc = subprocess.run(cmd, env=penv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
            return _error(f"the benchmark worker ({phase} pass) failed with exit status {proc.returncode}")
        results[phase] = [json.loads(p.read_text()) for p in sorted(tmp.glob("rank*.json"))]
        shutil.rmtree(tmp, ignore_errors=True)
        if len(results[phase]) != a.world_size:
            return _error(f"expected {a.world_size} rank results, found {len(results[phase])}")
    wall = time.time() - t0
    ranks = results.get("time") or results["both"]
    if "memory" in results:  # the memory pass's readings into the timing rows
        mem = {(rk["rank"], row["variant"]): row for rk in results["memory"] for row in rk["rows"]}
        for rk in ranks:
            for row in rk["rows"]:
                m = mem.get((rk["rank"], row["variant"]), {})
                row["peak_bytes"], row["own_bytes"] = m.get("peak_bytes"), m.get("own_bytes")
    mmap = {
        "memory_pass": None if a.no_memory else mem_env.get("MALLOC_MMAP_THRESHOLD_"),
        "timing_pass": (mem_env if a.mmap_threshold_for == "all" else env).get("MALLOC_MMAP_THRESHOLD_"),
    }
    rows = summarise(ranks)
    dev = ranks[0]["device"]
    header = (
        f"{a.preset} ({rows[0]['parameters']:,} parameters) | {a.dtype} | ZeRO {a.zero_stage} | "
        f"{a.world_size} rank(s) | micro {a.micro_batch} x seq {a.seq_len} x gas {a.gas} | "
        f"{a.warmup} warm-up + {a.steps} timed steps, {'sequential' if a.sequential else 'interleaved'} | "
        f"{dev if dev != 'cpu' else machine}, {ranks[0]['threads']} thread(s)/rank | {wall:.0f} s"
    )
    print(table(rows, header, dev != "cpu"))
    if a.json:
        res_mib = a.memory_resolution_mib if a.memory_resolution_mib is not None else (15.0 if dev == "cpu" else 0.0)
        try:
            load_end = list(os.getloadavg())
        except OSError:
            load_end = None
        setting = {
            k: getattr(a, k)
            for k in (
                "preset",
                "zero_stage",
                "world_size",
                "dtype",
                "micro_batch",
                "seq_len",
                "gas",
                "warmup",
                "steps",
                "sequential",
            )
        }
        Path(a.json).write_text(
            json.dumps(
                {
                    "schema": SCHEMA,
                    "setting": setting,
                    "args": {k: v for k, v in vars(a).items() if k not in ("worker",)},
                    "variants": variants,
                    "device": dev,
                    "machine": machine,
                    "load_average_end": load_end,
                    "malloc_mmap_threshold": mmap,
                    "memory_resolution_bytes": int(res_mib * 2**20),
                    "memory_measure": "own resident set (peak RSS less RSS before build)"
                    if dev == "cpu"
                    else "torch.cuda.max_memory_allocated",
                    "wall_s": wall,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
