"""`toolvlm finetune RECIPE.yaml [key=value ...]`: train a controller from a YAML recipe.

The dispatcher (toolvlm/cli.py) calls `add_arguments(parser, command)` and `run(args, command)`. Overrides are
dotted `key=value` pairs applied by `toolvlm.recipes` (`lora.r=8`, `max_steps=200`, `model.base=runs/s1/model`).
`--print-config` shows the resolved recipe without training. For several processes or machines:

    accelerate launch --multi_gpu --num_processes 4 -m toolvlm finetune RECIPE.yaml        # 4 GPUs (DDP)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m toolvlm finetune RECIPE.yaml  # CPUs

(accelerate's own config file chooses FSDP or DeepSpeed instead of DDP.)
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


def add_arguments(parser: argparse.ArgumentParser, command: str = "finetune") -> None:
    """Arguments of `toolvlm finetune`."""
    parser.add_argument("recipe", help="YAML recipe, e.g. finetune/recipes/controller_stage2.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. lora.r=8")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace, command: str = "finetune") -> int:
    """Train per the recipe; prints where the weights went and the last loss."""
    from dataclasses import asdict

    from toolvlm.finetune.train_config import load_train_config

    try:
        config = load_train_config(args.recipe, args.overrides)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"toolvlm finetune: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(asdict(config), sort_keys=False), end="")
        return 0
    from toolvlm.finetune.trainer import Trainer

    trainer = Trainer(config)
    result = trainer.train()
    if trainer.is_main:
        summary = {"steps": result.steps, "loss": result.loss, "tokens_per_s": round(result.tokens_per_s, 1),
                   "output": str(result.output)}  # fmt: skip
        print(json.dumps(summary))
    return 0
