"""Two-rank ZeRO-3 checks that need their own setup (started once by the deepspeed launcher):

* ``deepspeed.zero.Init`` through ``fsam_ds.models.build_model``: per-rank parameter memory, and a
  Hugging Face folder loaded shard-wise equals the saved weights;
* the preconditioned ascent reads this rank's own ``exp_avg_sq`` partition;
* bf16: the gradient ZeRO-3 hands to AdamW equals ZeRO-0's to bf16 round-off, and at every step
  (preconditioned from step 1 on) the perturbation each rank applies to its partition equals the
  fp32 formula on that rank's bf16-run gradient and ``exp_avg_sq`` partitions (norms over both
  ranks; ``bf16_worker``), in both normalisations.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import ds_config, engine_run  # noqa: E402
from launch import save_rank_result, worker_parser  # noqa: E402
from reference import micro_batch, tiny_llama  # noqa: E402


def zero3(method, **extra):
    cfg = ds_config(method, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0}, **extra)
    return cfg


def memory_and_folder(out: Path, rank: int, world: int, report: dict):
    import deepspeed

    import fsam_ds
    from fsam_ds import models
    from fsam_ds.config import parse_config

    ds_cfg, _ = parse_config(zero3("PreconditionedFunctionalSAM"))
    model = models.build_model("2m", zero3_config=ds_cfg)
    params = list(model.parameters())
    report["full_numel"] = sum(p.ds_numel for p in params)
    report["local_numel"] = sum(p.ds_tensor.numel() for p in params)
    report["gathered_numel"] = sum(p.data.numel() for p in params)  # 0: nothing held in full
    # a Hugging Face folder (written by rank 0 without ZeRO), loaded shard-wise under ZeRO-3
    folder = out / "hf_tiny"
    if rank == 0:
        tiny_llama(3).save_pretrained(folder)
    dist.barrier()
    loaded = models.build_model(str(folder), zero3_config=ds_cfg)
    report["folder_local_numel"] = sum(p.ds_tensor.numel() for p in loaded.parameters())
    report["folder_full_numel"] = sum(p.ds_numel for p in loaded.parameters())
    with deepspeed.zero.GatheredParameters(list(loaded.parameters())):
        got = {k: v.detach().clone() for k, v in loaded.named_parameters()}
    expected = dict(tiny_llama(3).named_parameters())
    report["folder_max_diff"] = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    # and it trains: one step of preconditioned FSAM
    engine, *_ = fsam_ds.initialize(model=loaded, config=zero3("PreconditionedFunctionalSAM"))
    data = iter([micro_batch(0, rank, i, world, 2) for i in range(2)])
    engine.train_batch(data)
    report["folder_step_eps"] = engine.last_metrics["eps_norm"]


def exp_avg_sq_shard(rank: int, world: int, report: dict):
    """Change rank 1's exp_avg_sq partition of one parameter; with the "gradient" normalisation
    eps = rho M^-1 g / ||g||, so eps may change only in that partition."""
    from deepspeed.utils import safe_get_local_optimizer_state

    import fsam_ds

    cfg = zero3("PreconditionedSAM", precondition_norm="gradient")
    cfg["optimizer"]["params"]["eps"] = 1e-3
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
    data = iter([micro_batch(s, rank, i, world, 2) for s in range(3) for i in range(2)])
    for _ in range(2):
        engine.train_batch(data)
    # pass 1 of the next step, then the ascent twice
    batches = [engine._to_device(next(data)) for _ in range(2)]
    engine._backward_pass(batches)
    before = [e.clone() for e in engine.compute_ascent(0.05).perturbations()]
    target = [p for p in engine.module.parameters()][1]
    if rank == 1:
        v = safe_get_local_optimizer_state(target, "exp_avg_sq")
        v.mul_(100.0)
    after = engine.compute_ascent(0.05).perturbations()
    changed = [int(not torch.equal(a, b)) for a, b in zip(before, after)]
    report["changed"] = changed
    report["target_index"] = 1


def full_grad_vector(engine) -> torch.Tensor:
    """The full gradient AdamW is about to use (every rank calls this: a collective at ZeRO-3)."""
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_full_grad

        return torch.cat([safe_get_full_grad(p).float().cpu().reshape(-1) for p in engine.module.parameters()])
    return torch.cat([p.grad.float().cpu().reshape(-1) for p in engine.module.parameters()])


def bf16_gradients(rank: int, world: int, report: dict):
    method = "PreconditionedFunctionalSAM"
    grads = {}
    for rho, stage in ((0.05, 0), (0.05, 3), (0.0, 0)):
        got = []
        cfg = ds_config(method, rho=rho, bf16={"enabled": True}, zero_optimization={"stage": stage})
        engine_run(
            method,
            rho=rho,
            steps=1,
            world=world,
            rank=rank,
            config=cfg,
            force_pass2=True,
            before_step=lambda e: got.append(full_grad_vector(e)),
        )
        grads[(rho, stage)] = got[0]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    report["bf16_z3_vs_z0"] = rel(grads[(0.05, 3)], grads[(0.05, 0)])
    report["bf16_perturbed_vs_unperturbed"] = rel(grads[(0.05, 0)], grads[(0.0, 0)])


def bf16_ascent(rank: int, world: int, report: dict):
    """ZeRO-3 bf16, every parameter partitioned, 4 steps: per step the engine's eps against the
    formula (see bf16_worker.capture_ascent) on this rank's partitions."""
    from bf16_worker import capture_ascent

    import fsam_ds

    out = {}
    for method, norm, eps in (
        ("PreconditionedFunctionalSAM", "perturbation", 1e-8),
        ("PreconditionedSAM", "gradient", 1e-3),
    ):
        cfg = zero3(method, rho=0.2, precondition_norm=norm, bf16={"enabled": True})
        cfg["optimizer"]["params"]["eps"] = eps
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
        records = capture_ascent(engine, 0.2, norm, hidden_step=False)
        gas = cfg["gradient_accumulation_steps"]
        data = iter([micro_batch(s, rank, i, world, gas) for s in range(4) for i in range(gas)])
        for _ in range(4):
            engine.train_batch(data)
        out[norm] = records
    report["bf16_ascent"] = out


def main():
    args = worker_parser().parse_args()
    out = Path(args.out)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    report: dict = {}
    memory_and_folder(out, rank, world, report)
    exp_avg_sq_shard(rank, world, report)
    bf16_gradients(rank, world, report)
    bf16_ascent(rank, world, report)
    save_rank_result(out, "report", rank, report)
    dist.barrier()


if __name__ == "__main__":
    main()
