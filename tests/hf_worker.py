"""Multi-rank worker for tests/test_hf.py, started once by the deepspeed launcher: the real
transformers Trainer (FSAMTrainer) and a user's own Accelerate loop (FSAMAccelerator) on the tiny
Llama, with the reference's data order. Saves each case's rank-0 weights and every rank's logs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import GAS, LR, RHO, STEPS, full_state  # noqa: E402
from launch import save_rank_result, worker_parser  # noqa: E402
from reference import micro_batch, tiny_llama  # noqa: E402

MBS = 2


class ReferenceOrder(torch.utils.data.Dataset):
    """Rows laid out so that a sequential sampler, sharded over ``world`` ranks batch by batch
    (batch m to rank m % world), gives rank r at step s the reference's micro-batch
    ``micro_batch(s, r, i, world, GAS)``."""

    def __init__(self, world: int, steps: int = STEPS):
        self.world, self.steps = world, steps

    def __len__(self):
        return self.steps * GAS * self.world * MBS

    def __getitem__(self, n):
        m, row = divmod(n, MBS)
        q, r = divmod(m, self.world)
        s, i = divmod(q, GAS)
        ids = micro_batch(s, r, i, self.world, GAS, mbs=MBS)["input_ids"][row]
        return {"input_ids": ids, "labels": ids.clone()}


def ds_json(method: str, stage: int) -> dict:
    params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if method != "AdamW":
        params["rho"] = RHO
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "optimizer": {"type": method, "params": params},
    }


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(
        tiny_llama(0),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights="gaussian"
        ),
    )


def cpu_state():
    """On a CPU machine Accelerate counts the DeepSpeed ranks only with an explicit gloo backend
    (on GPUs it picks nccl itself): the process state is set up once, before the Trainer."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(backend="gloo")
    assert state.num_processes == int(os.environ["WORLD_SIZE"])


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def reference_args(output_dir: str, steps: int, deepspeed: dict, cls=None, **overrides):
    """The Trainer arguments of the reference run (its batch sizes, learning rate, AdamW constants,
    clipping, constant schedule, sequential order, seed), with the DeepSpeed config and any override;
    ``cls``: a TrainingArguments subclass (TRL's SFTConfig)."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=MBS,
        gradient_accumulation_steps=GAS,
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        deepspeed=deepspeed,
        seed=7,
        dataloader_num_workers=0,
        accelerator_config={"use_configured_state": True},
    )
    kwargs.update(overrides)
    return (cls or TrainingArguments)(**kwargs)


def trainer_case(
    out: Path, name: str, method: str, stage: int, world: int, steps: int = STEPS, lora=False, save_steps=0, resume=None
):

    from fsam_ds.hf import FSAMTrainer

    reset_accelerate()
    model = lora_model() if lora else tiny_llama(0)
    args = reference_args(
        str(out / name),
        steps,
        ds_json(method, stage),
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_only_model=False,
    )
    trainer = FSAMTrainer(model=model, args=args, train_dataset=ReferenceOrder(world, steps=STEPS))
    trainer.train(resume_from_checkpoint=resume)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    engine = trainer.model_wrapped
    state = full_state(engine)
    rank = torch.distributed.get_rank()
    save_rank_result(out, name, rank, {"logs": logs}, state=state)
    eval_loss = trainer.evaluate(eval_dataset=ReferenceOrder(world, steps=1))["eval_loss"]
    after = full_state(engine)
    assert all(torch.equal(state[k], after[k]) for k in state), "evaluate changed the weights"
    save_rank_result(out, name, rank, {"eval_loss": eval_loss}, kind="eval")


def trl_case(out: Path, name: str, method: str, stage: int, world: int, loss_func: bool):
    """TRL's SFTTrainer with FSAMTrainerMixin: its own loss (a fused LM head, no logits) for the
    non-functional types; the functional types get the logits through compute_loss_func."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fsam_ds.data import get_tokenizer, load_texts
    from fsam_ds.hf import FSAMTrainerMixin, causal_lm_loss_func

    class FSAMSFTTrainer(FSAMTrainerMixin, SFTTrainer):
        pass

    reset_accelerate()
    data = ReferenceOrder(world)
    rows = Dataset.from_dict({"input_ids": [data[n]["input_ids"].tolist() for n in range(len(data))]})
    args = reference_args(str(out / name), STEPS, ds_json(method, stage), cls=SFTConfig, bf16=False)
    tokenizer = get_tokenizer(load_texts("default")[0][:200], vocab_size=300)  # SFTTrainer wants one; ids given
    trainer = FSAMSFTTrainer(
        model=tiny_llama(0),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        **({"compute_loss_func": causal_lm_loss_func} if loss_func else {}),
    )
    trainer.train()
    state = full_state(trainer.model_wrapped)
    rank = torch.distributed.get_rank()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    save_rank_result(out, name, rank, {"logs": logs}, state=state)


def accelerate_case(out: Path, name: str, method: str, stage: int, world: int):
    """A user's own Accelerate loop, unchanged but for FSAMAccelerator in place of Accelerator."""
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    from fsam_ds.hf import FSAMAccelerator

    reset_accelerate()
    cfg = ds_json(method, stage)
    cfg.update(train_micro_batch_size_per_gpu=MBS, gradient_accumulation_steps=GAS, gradient_clipping=1.0)
    cfg["optimizer"]["params"].update(lr=LR, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    accelerator = FSAMAccelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg), kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")]
    )
    model = tiny_llama(0)
    loader = torch.utils.data.DataLoader(ReferenceOrder(world), batch_size=MBS, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, DummyOptim(model.parameters()), loader)
    metrics = []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            metrics.append(dict(accelerator.fsam_engine.last_metrics))
    state = full_state(model)
    rank = torch.distributed.get_rank()
    save_rank_result(out, name, rank, {"metrics": metrics}, state=state)


def main():
    args = worker_parser().parse_args()
    out = Path(args.out)
    world = int(os.environ["WORLD_SIZE"])
    cpu_state()
    trainer_case(out, "trainer-pfsam-z2", "PreconditionedFunctionalSAM", 2, world, save_steps=2)
    trainer_case(
        out,
        "trainer-pfsam-z2-resumed",
        "PreconditionedFunctionalSAM",
        2,
        world,
        resume=str(out / "trainer-pfsam-z2" / "checkpoint-2"),
    )
    trainer_case(out, "trainer-sam-z3", "SAM", 3, world)
    trainer_case(out, "trainer-lora-pfsam-z2", "PreconditionedFunctionalSAM", 2, world, lora=True)
    accelerate_case(out, "accelerate-pfsam-z2", "PreconditionedFunctionalSAM", 2, world)
    trl_case(out, "trl-psam-z2", "PreconditionedSAM", 2, world, loss_func=False)
    trl_case(out, "trl-pfsam-z3", "PreconditionedFunctionalSAM", 3, world, loss_func=True)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
