"""Benchmark: turn latency of the default assistant with and without n-gram drafts (speculative decoding).

    python bench/speculative_decoding.py [--n 12] [--tasks describe,ground,count] [--bundle DIR]

The default bundle's assistant (its controller, detector and counter; `toolvlm.vlm.drafting` for the drafts)
answers held-out world requests (`toolvlm eval controller`'s scenes and phrasings, another seed) twice: with the
controller's draft corpus, and with drafts off. Greedy decoding keeps the text the same either way; the bench
checks it reply by reply. In bf16 the engine turns drafts off (their rounding could change the text; see
`toolvlm.vlm.engine.TIE_MARGINS`), so run it with `--dtype float32` to see them. Each turn starts from a fresh assistant state (no KV prefix from an earlier turn), so
both runs do the same prefill. Runs alternate per request, so load changes on the machine hit both alike.

Last line: one JSON object with the median turn seconds per task with and without drafts, the speedups, the
share of identical replies, tokens per forward pass (prefill included) of the drafted runs' final reply
steps (a tool turn's call step is not counted) and the settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.profiles import load_profile
from toolvlm.bundle import bundle_dir
from toolvlm.evaluation.controller import plan_eval
from toolvlm.world import render_scene

BENCH_SEED = 515151  # not the eval's seed: other scenes, the same held-out phrasings


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON figures last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12, help="requests (cycling through the tasks)")
    parser.add_argument("--tasks", default="describe,ground,count")
    parser.add_argument("--bundle", default=str(bundle_dir()))
    parser.add_argument("--seed", type=int, default=BENCH_SEED)
    parser.add_argument("--dtype", default=None, help="the controller's dtype (default: the profile's)")
    args = parser.parse_args(argv)
    tasks = tuple(args.tasks.split(","))

    started = time.perf_counter()
    profile = load_profile(f"{args.bundle}/profile.yaml")
    if args.dtype:
        profile.controller["dtype"] = args.dtype
    assistant = Assistant.from_profile(profile)
    load_s = time.perf_counter() - started
    vlm = assistant.agent.controller.vlm
    drafter = vlm.drafter
    if drafter is None:
        parser.error(f"{args.bundle}'s controller has no draft corpus")

    seconds: dict[str, dict[str, list[float]]] = {"drafts": defaultdict(list), "plain": defaultdict(list)}
    same, generated, passes = 0, 0, 0
    plan = plan_eval(args.n, args.seed, tasks=tasks)
    for i, (scene, turn) in enumerate(plan):
        image = render_scene(scene)
        replies = {}
        for mode in ("drafts", "plain") if i % 2 == 0 else ("plain", "drafts"):
            vlm.drafter = drafter if mode == "drafts" else None
            assistant.reset()  # (the controller's caches too)
            t0 = time.perf_counter()
            replies[mode] = assistant.chat(turn.text, [image]).text
            seconds[mode][turn.task].append(time.perf_counter() - t0)
            if mode == "drafts":  # the answer step's figures (a tool turn's call step came before)
                generated += vlm.engine.stats.generated_tokens
                passes += vlm.engine.stats.forward_passes + 1  # + the prefill's
        same += replies["drafts"] == replies["plain"]
        print(f"[{i + 1}/{len(plan)}] {turn.task}: {seconds['drafts'][turn.task][-1]:.2f} s with drafts, "
              f"{seconds['plain'][turn.task][-1]:.2f} s without", file=sys.stderr)  # fmt: skip
    vlm.drafter = drafter

    def medians(mode: str) -> dict[str, float]:
        return {task: round(statistics.median(v), 3) for task, v in seconds[mode].items()}

    with_drafts, plain = medians("drafts"), medians("plain")
    figures = {
        "median_turn_s_drafts": with_drafts,
        "median_turn_s_plain": plain,
        "speedup": {task: round(plain[task] / with_drafts[task], 2) for task in with_drafts},
        "identical_replies": round(same / len(plan), 4),
        "tokens_per_forward_answers": round(generated / max(passes, 1), 2),
        "load_s": round(load_s, 2),
        "dtype": str(vlm.engine.dtype).removeprefix("torch."),  # bf16, fp16: no drafts (engine.py)
        "n": len(plan),
        "tasks": list(tasks),
        "seed": args.seed,
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
