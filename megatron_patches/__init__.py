"""The methods on megatron-core: tensor, pipeline and data parallel groups, the distributed optimizer.

* :class:`~megatron_patches.sam.MegatronSAM` - one optimizer step of any method for megatron-core
  model chunks and optimizer;
* :func:`~megatron_patches.megatron_lm.fsam_train_step` - Megatron-LM's ``train_step`` running it,
  :func:`~megatron_patches.megatron_lm.install` and :func:`~megatron_patches.megatron_lm.add_sam_args`
  for Megatron-LM;
* :mod:`megatron_patches.trainer` - ``fsam-megatron-train``, a standalone trainer;
* :mod:`megatron_patches.layout` - Llama-style models between Hugging Face and ``GPTModel``;
* :mod:`megatron_patches.cpu` - running megatron-core without a GPU.

Importing this package imports neither megatron-core nor torch.distributed state; the names below
load on first use.
"""

__all__ = ["MegatronSAM", "fsam_train_step", "install", "add_sam_args", "sam_config_from_args"]


def __getattr__(name):
    if name == "MegatronSAM":
        from .sam import MegatronSAM

        return MegatronSAM
    if name in ("fsam_train_step", "install", "add_sam_args", "sam_config_from_args"):
        from . import megatron_lm

        return getattr(megatron_lm, name)
    raise AttributeError(name)
