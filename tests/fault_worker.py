"""fsam-train with one injected fault, for the lost-rank tests (started by the deepspeed launcher).

FSAM_TEST_FAULT="between_passes:RANK:STEP"  SIGKILL rank RANK during optimizer step STEP, after
                                            pass 1 and the ascent, before pass 2;
FSAM_TEST_FAULT="saving:RANK:TAG"           SIGKILL rank RANK while DeepSpeed writes its ZeRO
                                            files of checkpoint TAG.
Just before the kill the rank writes the time to $FSAM_TEST_FAULT_MARK.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die():
    Path(os.environ["FSAM_TEST_FAULT_MARK"]).write_text(str(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    kind, rank, where = spec.split(":")
    if int(os.environ.get("RANK", "0")) != int(rank):
        return
    if kind == "between_passes":
        from fsam_ds import step as S

        original = S.SAMStep.compute_ascent

        def compute_ascent(self, rho, momentum=False):
            out = original(self, rho, momentum)
            if self.step_index() + 1 == int(where):
                _die()
            return out

        S.SAMStep.compute_ascent = compute_ascent
    elif kind == "saving":
        from deepspeed.runtime import engine as DE

        original = DE.DeepSpeedEngine._save_zero_checkpoint

        def _save_zero_checkpoint(self, save_path, tag):
            if str(tag) == where:
                _die()
            return original(self, save_path, tag)

        DE.DeepSpeedEngine._save_zero_checkpoint = _save_zero_checkpoint
    else:
        raise ValueError(spec)


if __name__ == "__main__":
    if os.environ.get("FSAM_TEST_FAULT"):
        install(os.environ["FSAM_TEST_FAULT"])
    from fsam_ds.train import main

    sys.exit(main())
