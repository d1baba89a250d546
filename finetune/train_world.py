"""Former entry point of the world-model stages; the command is now `toolvlm train STAGE [RECIPE] [k=v ...]`.

This module re-exports the stage registry (finetune/train_stages.py) for code that imported it from here.
"""

from __future__ import annotations

import sys

from toolvlm.finetune.train_stages import STAGES, make_stage, run_stage, stage_classes

__all__ = ["STAGES", "make_stage", "run_stage", "stage_classes"]

if __name__ == "__main__":
    sys.exit(
        "python -m toolvlm.finetune.train_world is now `toolvlm train STAGE [RECIPE.yaml] [key=value ...]`"
    )
