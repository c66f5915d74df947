"""The names shared across fsam-ds: methods, setting values, files a run writes, metric keys.

Plain constants and the two folder-name rules, with no imports: every module (the trainers, the
converter, the supervisor, the tools, the tests) reads them from here instead of spelling them
again.
"""

# ---------------------------------------------------------------------------------------------
# Methods and their settings
# ---------------------------------------------------------------------------------------------

#: ``optimizer.type`` (DeepSpeed) / ``--sam-type`` (Megatron): the accepted methods.
METHODS = ("AdamW", "SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM")
#: The methods with a perturbation (every one but AdamW).
SAM_METHODS = METHODS[1:]
#: Each method's name in files: ``ds_configs/<short>.json`` and the default ``runs/<short>-<model>``.
SHORT_NAMES = {
    "AdamW": "adamw",
    "SAM": "sam",
    "PreconditionedSAM": "preconditioned_sam",
    "FunctionalSAM": "functional_sam",
    "PreconditionedFunctionalSAM": "preconditioned_functional_sam",
}
#: Each method's abbreviation (figure legends, run folders of the reproduction).
ABBREVIATIONS = {
    "AdamW": "adamw",
    "SAM": "sam",
    "PreconditionedSAM": "psam",
    "FunctionalSAM": "fsam",
    "PreconditionedFunctionalSAM": "pfsam",
}

#: ``optimizer.params.precondition_norm``: what the preconditioned ascent is normalised by.
PRECONDITION_NORMS = ("perturbation", "gradient")
#: ``optimizer.params.logit_grad_cache``: where the functional types keep g_F between the passes.
LOGIT_GRAD_CACHES = ("device", "host", "recompute")
#: ``optimizer.params.ascent_direction``: this step's pass-1 gradient, or AdamW's first moment.
ASCENT_DIRECTIONS = ("gradient", "momentum")

# ---------------------------------------------------------------------------------------------
# Files and folders a run writes
# ---------------------------------------------------------------------------------------------

#: One JSON object per line: a record per step and one per evaluation (both trainers).
METRICS_FILE = "metrics.jsonl"
#: Inside every checkpoint folder: the model's Hugging Face config, generation config and
#: tokenizer (no weights), from which ``fsam-convert`` rebuilds a Hugging Face folder.
HF_META_DIR = "hf"
#: ``fsam-train`` (DeepSpeed): ``<save-dir>/latest`` names the newest complete tag folder.
LATEST = "latest"
#: ``fsam-megatron-train``: ``<save>/latest_checkpointed_iteration.txt`` holds the newest
#: complete iteration (Megatron-LM's own file name).
MEGATRON_LATEST = "latest_checkpointed_iteration.txt"
#: A ``latest`` file is written as ``<name>.tmp`` first, then renamed over the old one.
TMP_SUFFIX = ".tmp"
#: Inside a DeepSpeed tag folder: each rank's random states (Python, NumPy, torch, accelerator).
RNG_FILE = "rng_state_rank{rank}.pt"
#: Inside a DeepSpeed tag folder: each rank's ``FSAMEngine.state_dict()`` (ascent_every > 1).
ENGINE_FILE = "fsam_engine_rank{rank}.pt"


def deepspeed_tag(step: int) -> str:
    """The tag folder ``fsam-train`` saves step ``step`` in."""
    return f"step{step}"


def megatron_iteration_dir(iteration: int) -> str:
    """The folder ``fsam-megatron-train`` saves iteration ``iteration`` in (Megatron-LM's name)."""
    return f"iter_{iteration:07d}"


# ---------------------------------------------------------------------------------------------
# Training metrics (engine.last_metrics, metrics.jsonl)
# ---------------------------------------------------------------------------------------------

#: Every step record of ``metrics.jsonl`` has these (both trainers).
STEP_METRICS = ("step", "loss", "grad_norm", "eps_norm", "rho", "lr", "tokens_per_s", "method", "skipped", "step_time")
#: The share of ``||eps||^2`` on the input embedding and on the output layer (the SAM types).
SHARE_KEYS = ("eps_share_embed", "eps_share_output")
#: The sub-2x modes' flags: ``ascent_every > 1`` and ``ascent_direction: "momentum"``.
ASCENT_FLAG_KEYS = ("ascent_reused", "ascent_momentum")
#: Written when the step has them.
OPTIONAL_STEP_METRICS = SHARE_KEYS + ASCENT_FLAG_KEYS
#: The sharpness diagnostics every ``optimizer.params.sharpness_every`` steps.
SHARPNESS_METRICS = (
    "tau_logit",
    "tau_func",
    "tau_cross",
    "hvp_sq_norm",
    "logit_fraction",
    "curv_hessian",
    "curv_gn",
    "lambda_max",
    "lambda_max_iters",
    "lambda_max_residual",
    "sharpness_time",
)
#: The evaluation record's key.
EVAL_LOSS = "eval_loss"
