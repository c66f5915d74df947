"""PyTorch Lightning: ``FSAMDeepSpeedStrategy`` in place of Lightning's ``DeepSpeedStrategy``.

The strategy takes the method out of the DeepSpeed config (DeepSpeed is given its AdamW) and runs
the engine it builds in loop mode (:mod:`fsam_ds.loop`): Lightning's automatic optimization calls
the training step through the engine, ``engine.backward(loss)`` and ``engine.step()``, which is
exactly the loop loop mode follows; SAM's pass 2 runs the training step again at ``theta + eps``
(its loss is the step's returned loss).

Lightning's ``DeepSpeedStrategy`` runs only on CUDA GPUs (it refuses any other accelerator in
``setup_environment``), so this path has not been run on the CPU machines the test suite uses;
there, fitting is refused by Lightning before any step.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.strategies import DeepSpeedStrategy
except ImportError as err:
    raise ImportError("fsam_ds.lightning needs Lightning: pip install 'fsam-ds[lightning]'") from err

from .config import load_json_config, take_sam_section
from .hf import attach_engine


class FSAMDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy running the DeepSpeed config's SAM type."""

    def __init__(self, *args: Any, config=None, **kwargs: Any):
        cfg = load_json_config(config) if config is not None else None
        self.fsam_sam = take_sam_section(cfg) if cfg is not None and "optimizer" in cfg else None
        self.fsam_engine = None
        super().__init__(*args, config=cfg, **kwargs)  # type: ignore[misc]  # config is not in args

    def _setup_model_and_optimizer(self, *args: Any, **kwargs: Any):
        engine, optimizer = super()._setup_model_and_optimizer(*args, **kwargs)
        if self.fsam_sam is not None and self.fsam_sam.is_sam:
            self.fsam_engine = attach_engine(engine, self.fsam_sam)
        return engine, optimizer
