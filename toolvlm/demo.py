"""`toolvlm demo`: the four-step crowd workflow on a bundled example scene, end to end.

On a world scene of a crowd on grass with a tree (drawn from a fixed seed, so every machine gets the same
picture) it asks the assistant, in one session: what it sees (the VLM itself), to box the tree (grounding), how
many people there are (counter), and for a similar image with double the people (generator, checked by
counting). It prints each answer with the tools called, and writes the session (JSONL transcript + every image)
to the output folder, plus the scene's own annotations for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_SEED = 0  # a crowd scene of 27 people with one tree
QUESTIONS = (
    "What do you see in the image?",
    "Generate a bounding box around the tree.",
    "Estimate the number of people in the image.",
    "Generate a similar image with double the amount of people.",
)


def demo_scene():
    """The bundled example: a crowd on grass with a tree, and its annotations."""
    from toolvlm.world import annotate, render_scene, sample_scene

    scene = sample_scene(DEMO_SEED, family="crowd")
    return render_scene(scene), annotate(scene)


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Arguments of `toolvlm demo`."""
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="folder for the transcript and images"
    )
    parser.add_argument("--profile", help="a profile (path or name) instead of the default bundle")


def run(args: argparse.Namespace, command: str) -> int:
    """Run the four steps and print the answers."""
    from toolvlm.agent.assistant import Assistant
    from toolvlm.agent.profiles import ProfileError
    from toolvlm.agent.trajectory import ToolStep

    args.out.mkdir(parents=True, exist_ok=True)
    image, annotations = demo_scene()
    image_path = args.out / "crowd.png"
    image.save(image_path)
    (args.out / "crowd_annotations.json").write_text(json.dumps(annotations, indent=2) + "\n")
    try:
        start = time.perf_counter()
        assistant = Assistant.from_profile(args.profile, session=args.out / "session")
        print(f"loaded the assistant in {time.perf_counter() - start:.1f} s; image: {image_path}")
    except (ProfileError, FileNotFoundError) as err:
        print(f"toolvlm demo: {err}", file=sys.stderr)
        return 2
    for i, question in enumerate(QUESTIONS):
        start = time.perf_counter()
        reply = assistant.chat(question, images=[image_path] if i == 0 else [])
        tools = [step.name for step in reply.steps if isinstance(step, ToolStep)]
        print(
            f"\n[{i + 1}] {question}\n    tools: {', '.join(tools) or 'none'} ({time.perf_counter() - start:.1f} s)"
        )
        print(f"    {reply.text}")
        for path in reply.paths:
            print(f"    image: {path}")
    print(f"\nscene truth: {annotations['counts']['person']} people, {annotations['counts']['tree']} tree")
    print(f"transcript and images: {assistant.session_dir}")
    return 0
