"""One-process checks of the Megatron step's bookkeeping (world size 1, gloo, TP = PP = 1).

    python tests/megatron_step_worker.py --out FILE

Run in a process of its own (``megatron_patches.cpu.apply`` patches torch for megatron-core and
cannot be undone), by tests/test_megatron_steps.py. Writes a dict of results to FILE (torch.save):

* ``group_step/<layout>``: PreconditionedSAM for 3 steps from the same weights with torch's AdamW
  (step in every parameter's state) and with an AdamW that keeps its step in
  ``param_groups[i]["step"]`` the way TransformerEngine's and apex's FusedAdam do, at the plain
  fp32 optimizer, the distributed optimizer and bf16 main parameters (with and without it):
  ``adam_updates`` and the denominators after one update, and the trained weights of both;
* ``missing_step``: the error when the optimizer keeps Adam moments but no step count;
* ``zero_moments``: ``adam_updates`` when megatron's ``init_state_fn`` filled zero moments and no
  step (before the first update: 0, no error);
* ``sgd_warmup_refused``: the error for a rho warm-up (it counts AdamW updates) with SGD;
* ``stray_forward/<pass>``: the error when a pass makes one output-layer forward too many;
* ``rerun/<mode>``: ``fsam_train_step`` under megatron-core's ``RerunStateMachine``: the machine's
  iteration count and state after two steps in mode ``disabled``, and the refusal of
  ``validate_results`` / ``report_determinism_stats`` before any forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference  # noqa: E402

MICRO = 2


class GroupStepAdamW(torch.optim.AdamW):
    """torch's AdamW with its step count kept in ``param_groups[i]["step"]`` between steps (the
    layout of TransformerEngine's and apex's FusedAdam); the same arithmetic bit for bit.
    ``drop_step=True`` keeps no step count anywhere (a broken layout the step must refuse)."""

    drop_step = False

    def __init__(self, params, adam_w_mode=True, **kw):
        assert adam_w_mode, "decoupled weight decay only"
        super().__init__(params, **kw)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" not in st:
                    st["step"] = torch.tensor(float(group.get("step", 0)))
        out = super().step(closure)
        for group in self.param_groups:
            steps = [self.state[p].pop("step") for p in group["params"] if "step" in self.state.get(p, {})]
            if steps and not self.drop_step:
                group["step"] = int(steps[0].item())
        return out


def build_chunk(hf, full, distopt=False, bf16=False, adam_cls=None, device=None):
    """A one-chunk megatron-core GPTModel of ``hf``'s config with the weights ``full``, wrapped in
    DDP, and the optimizer megatron-core builds for it (``adam_cls``: the Adam class megatron-core
    would pick with TE or apex importable). Returns (chunks, optimizer, config). Used by this worker
    and by tools/gpu_check.py."""
    import megatron.core.optimizer as mopt
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_patches import layout

    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = layout.transformer_config(hf.config, 1, 1, dtype)
    gpt = layout.build_gpt(hf.config, cfg)
    layout.load_full_state_dict([gpt], full)
    module = gpt
    if bf16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(cfg, gpt)
    if device is not None:
        module.to(device)
    chunk = DistributedDataParallel(
        config=cfg,
        module=module,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distopt),
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    saved = (mopt.Adam, getattr(mopt, "USING_PYTORCH_OPTIMIZER", None))
    if adam_cls is not None:  # what megatron-core does when TE or apex is importable
        mopt.Adam, mopt.USING_PYTORCH_OPTIMIZER = adam_cls, False
    try:
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-2,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=0.999,
                adam_eps=1e-8,
                clip_grad=1.0,
                bf16=bf16,
                params_dtype=dtype,
                use_distributed_optimizer=distopt,
            ),
            [chunk],
        )
    finally:
        mopt.Adam, mopt.USING_PYTORCH_OPTIMIZER = saved
    return [chunk], opt, cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    init = tempfile.mktemp(prefix="fsam_megatron_step_")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    import megatron.core  # noqa: F401

    from megatron_patches import cpu

    cpu.apply()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fsam_ds.config import SAMConfig
    from megatron_patches import layout
    from megatron_patches.sam import MainParams, MegatronSAM

    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    hf = reference.tiny_llama(seed=0, layers=1)
    full = layout.hf_to_megatron(hf.state_dict(), hf.config)
    results = {}

    def build(distopt=False, bf16=False, adam_cls=None):
        return build_chunk(hf, full, distopt=distopt, bf16=bf16, adam_cls=adam_cls)

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

    def batches(step):
        mbs = [reference.micro_batch(step, 0, i, 1, MICRO) for i in range(MICRO)]
        b, seq = mbs[0]["input_ids"].shape[0], mbs[0]["input_ids"].shape[1] - 1
        return mbs, dict(num_microbatches=MICRO, seq_length=seq, micro_batch_size=b)

    def weights(chunks):
        return {k: v.float().clone() for k, v in layout.gather_full_state_dict(chunks).items()}

    def run(method, steps, **build_kw):
        chunks, opt, _ = build(**build_kw)
        runner = MegatronSAM(chunks, opt, SAMConfig(method=method, rho=0.05))
        runner.skip_unperturbed_pass2 = False
        info = {}
        for step in range(steps):
            mbs, kw = batches(step)
            runner.step(get_forward_backward_func(), forward_step, iter(mbs), **kw)
            if step == 0:
                main = MainParams(opt)
                t = main.adam_updates()
                d = main.denominators(t)
                info.update(adam_updates=t, denominators=None if d is None else [x.clone() for x in d])
        info["weights"] = weights(chunks)
        return info

    def guarded(name, fn):
        try:
            results[name] = fn()
        except Exception as exc:  # recorded for the test to report
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}

    # -- the step count at every optimizer layout ------------------------------------------
    layouts = {
        "fp32": {},
        "distopt": {"distopt": True},
        "bf16": {"bf16": True},
        "bf16_distopt": {"bf16": True, "distopt": True},
    }
    for name, kw in layouts.items():

        def case(kw=kw):
            torch_run = run("PreconditionedSAM", 3, **kw)
            group_run = run("PreconditionedSAM", 3, adam_cls=GroupStepAdamW, **kw)
            sam_run = run("SAM", 3, adam_cls=GroupStepAdamW, **kw)
            return {"torch": torch_run, "group": group_run, "sam": sam_run}

        guarded(f"group_step/{name}", case)

    def missing_step():
        class NoStepAdamW(GroupStepAdamW):
            drop_step = True

        chunks, opt, _ = build(adam_cls=NoStepAdamW)
        runner = MegatronSAM(chunks, opt, SAMConfig(method="PreconditionedSAM", rho=0.05))
        mbs, kw = batches(0)
        runner.step(get_forward_backward_func(), forward_step, iter(mbs), **kw)
        mbs, kw = batches(1)
        runner.step(get_forward_backward_func(), forward_step, iter(mbs), **kw)
        return {"error": None}

    guarded("missing_step", missing_step)

    def zero_moments():
        chunks, opt, _ = build(adam_cls=GroupStepAdamW)
        inner = opt.optimizer
        for group in inner.param_groups:  # megatron's init_state_fn before a checkpoint load
            for p in group["params"]:
                inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)
        return {"adam_updates": MainParams(opt).adam_updates()}

    guarded("zero_moments", zero_moments)

    def sgd_refused():
        chunks, _, _ = build()
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=1e-2, weight_decay=0.0, params_dtype=torch.float32), chunks
        )
        MegatronSAM(chunks, opt, SAMConfig(method="PreconditionedSAM", rho=0.05))
        return {"error": None}

    guarded("sgd_refused", sgd_refused)

    def sgd_warmup_refused():
        chunks, _, _ = build()
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="sgd", lr=1e-2, weight_decay=0.0, params_dtype=torch.float32), chunks
        )
        MegatronSAM(chunks, opt, SAMConfig(method="SAM", rho=0.05, rho_warmup_steps=3))
        return {"error": None}

    guarded("sgd_warmup_refused", sgd_warmup_refused)

    # -- one output-layer forward per micro-batch in each pass ----------------------------
    for which in ("pass 1", "pass 2", "pass 2 short"):

        def stray(which=which):
            chunks, opt, _ = build()
            runner = MegatronSAM(chunks, opt, SAMConfig(method="FunctionalSAM", rho=0.05))
            runner.skip_unperturbed_pass2 = False
            real = get_forward_backward_func()
            calls = []
            before = [p.detach().clone() for p in chunks[0].parameters()]

            def fb(**kw):
                calls.append(1)
                if which == "pass 2 short" and len(calls) == 2:  # one micro-batch fewer in pass 2
                    kw = dict(kw, num_microbatches=kw["num_microbatches"] - 1)
                out = real(**kw)
                if (len(calls) == 1) == (which == "pass 1") and which != "pass 2 short":  # one extra forward
                    mbs, _ = batches(0)
                    forward_step(iter(mbs), kw["model"][0])
                return out

            mbs, kw = batches(0)
            err = None
            try:
                runner.forward_backward(fb, forward_step, iter(mbs), **kw)
            except RuntimeError as exc:
                err = str(exc)
            restored = all(torch.equal(a, p) for a, p in zip(before, chunks[0].parameters()))
            return {"error": err, "restored": restored}

        guarded(f"stray_forward/{which}", stray)

    def clean_count():
        chunks, opt, _ = build()
        runner = MegatronSAM(chunks, opt, SAMConfig(method="PreconditionedFunctionalSAM", rho=0.05))
        mbs, kw = batches(0)
        runner.step(get_forward_backward_func(), forward_step, iter(mbs), **kw)
        return {"error": None, "count": runner.hooks._count}

    guarded("stray_forward/none", clean_count)

    # -- the rerun state machine ----------------------------------------------------------
    from megatron.core import rerun_state_machine as rsm

    from megatron_patches.megatron_lm import fsam_train_step

    for mode in ("disabled", "validate_results", "report_determinism_stats"):

        def rerun(mode=mode):
            rsm.destroy_rerun_state_machine()
            rsm.initialize_rerun_state_machine(mode=rsm.RerunMode(mode))
            machine = rsm.get_rerun_state_machine()
            chunks, opt, cfg = build()
            sam = SAMConfig(method="FunctionalSAM", rho=0.05)
            before = weights(chunks)
            out = {"error": None, "losses": []}
            consumed = []
            try:
                for step in range(2):
                    mbs, kw = batches(step)
                    data = rsm.RerunDataIterator(iter(mbs))
                    res = fsam_train_step(
                        forward_step,
                        data,
                        chunks,
                        opt,
                        None,
                        cfg,
                        get_forward_backward_func(),
                        iteration=step,
                        sam=sam,
                        **kw,
                    )
                    out["losses"].append(float(res[0]["lm loss"]))
                    out["tuple_len"] = len(res)
                    consumed.append(len(data.saved_microbatches))
            except Exception as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            after = weights(chunks)
            out.update(
                iteration=machine.current_iteration,
                state=machine.state.name,
                saved=consumed,
                unchanged=all(torch.equal(before[k], after[k]) for k in before),
            )
            rsm.destroy_rerun_state_machine()
            return out

        guarded(f"rerun/{mode}", rerun)

    torch.save(results, args.out)
    dist.destroy_process_group()
    try:
        os.unlink(init)
    except OSError:
        pass


if __name__ == "__main__":
    main()
