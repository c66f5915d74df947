"""One megatron-core layout (TP x PP x DP) training every requested method from the same weights.

    torchrun --nproc_per_node N tests/megatron_worker.py --tp T --pp P [--distopt] --out FILE

Weights start from ``reference.tiny_llama`` (a Hugging Face Llama) mapped onto megatron-core's
GPTModel; micro-batches are ``reference.micro_batch`` of this rank's data-parallel index. Rank 0
writes, per method, the trained weights in Hugging Face naming (TP shards and pipeline stages
gathered), the pass-1 losses, and the kept logit gradients of step 0 (this rank's vocabulary
shard of every TP rank, gathered).
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--distopt", action="store_true")
    ap.add_argument("--methods", default="SAM,PreconditionedSAM,FunctionalSAM,PreconditionedFunctionalSAM")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=2, help="per data-parallel rank")
    ap.add_argument("--dp-equivalent", type=int, default=0,
                    help="feed the micro-batches of this many data-parallel ranks to each rank in turn "
                         "(a 1-rank run reproducing the global batch of a DP run)")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    dist.init_process_group("gloo")
    import megatron.core  # noqa: F401
    from megatron_patches import cpu
    cpu.apply()
    from megatron.core import parallel_state as ps, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fsam_ds.config import SAMConfig
    from megatron_patches import layout
    from megatron_patches.sam import MegatronSAM

    ps.initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = reference.tiny_llama(seed=0)
    full = layout.hf_to_megatron(hf.state_dict(), hf.config)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    results = {}
    for method in args.methods.split(","):
        cfg = layout.transformer_config(hf.config, args.tp, args.pp, dtype)
        gpt = layout.build_gpt(hf.config, cfg)
        layout.load_full_state_dict([gpt], full)
        module = gpt
        if args.bf16:
            from megatron.core.transformer.module import Float16Module
            module = Float16Module(cfg, gpt)
        model = DistributedDataParallel(config=cfg, module=module, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.distopt))
        cfg.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
            clip_grad=1.0, bf16=args.bf16, params_dtype=dtype, use_distributed_optimizer=args.distopt), [model])
        sam = SAMConfig(method=method, rho=args.rho if method != "AdamW" else 0.0)
        runner = MegatronSAM([model], opt, sam)
        runner.skip_unperturbed_pass2 = False
        losses, gfs = [], None
        ranks = range(args.dp_equivalent) if args.dp_equivalent else [dp_rank]
        world = args.dp_equivalent or dp
        for step in range(args.steps):
            mbs = [reference.micro_batch(step, r, i, world, args.microbatches) for r in ranks
                   for i in range(args.microbatches)]
            seq = mbs[0]["input_ids"].shape[1] - 1
            data = iter(mbs)

            def loss_func(output_tensor):
                loss = output_tensor.float().mean()
                return loss, {"lm loss": loss.detach().clone()}

            def forward_step(data_iterator, model):
                ids = next(data_iterator)["input_ids"]
                tokens, labels = ids[:, :-1], ids[:, 1:]
                b, s = tokens.shape
                pos = torch.arange(s).unsqueeze(0).expand(b, s)
                mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).logical_not().view(1, 1, s, s)
                return model(tokens, pos, mask, labels=labels), loss_func

            runner.forward_backward(get_forward_backward_func(), forward_step, data,
                                    num_microbatches=len(mbs), seq_length=seq, micro_batch_size=mbs[0]["input_ids"].shape[0])
            if step == 0 and runner.cache is not None:
                pass
            _, _, _ = opt.step()
            runner.steps += 1
            losses.append(runner.last_metrics.get("loss"))
        meg = layout.gather_full_state_dict([model])
        results[method] = {"weights": layout.megatron_to_hf(meg, hf.config),
                           "grad_norm": runner.last_metrics.get("grad_norm")}
        del model, opt, runner
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
