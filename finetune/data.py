"""The training data format: conversations with images and tool calls, as JSONL or as saved agent sessions.

One example per JSONL line, images as paths relative to the JSONL file:

    {"id": "world-0-000001", "images": ["images/world-0-000001_0.png", "images/world-0-000001_1.png"],
     "messages": [
        {"role": "system", "content": "You are toolvlm, ..."},
        {"role": "user", "content": [{"type": "text", "text": "img_0:"}, {"type": "image"},
                                     {"type": "text", "text": "\\nPut a box around the tree."}]},
        {"role": "assistant", "content": "<tool_call>{\\"name\\": \\"grounding\\", \\"arguments\\": ...}</tool_call>"},
        {"role": "tool", "name": "grounding", "content": [{"type": "text", "text": "found 1 box(es) ..."},
                                                          {"type": "image"}]},
        {"role": "assistant", "content": "Here is the tree: [45, 67, 91, 135] (drawn in img_1)."}],
     "meta": {"source": "world", "phrasing": "train", "turns": [...]}}

This is LLaVA's conversation format in the shape of chat messages (`VLM.render` takes them as they are), extended
with tool calls in assistant text (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and `tool` messages
carrying text and images. LLaVA's own lines (`"image"` + `"conversations"` with `from: human/gpt` and `<image>`
in the text) are read too. An assistant message with `"supervise": false` is context, not a target.

A line `{"session": "path/to/folder"}`, or the folder itself, is a saved agent session (agent/session.py) read as
it is: its trajectory's messages, its images by handle, and the agent's system prompt in front.

This module knows files and message shapes; `ConversationDataset` renders examples with a VLM's `render`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from toolvlm.vlm.chat import message_parts
from toolvlm.vlm.images import ImageLike, image_key, load_image

logger = logging.getLogger(__name__)

# The tools of the world controller, in the order their schemas are listed in its system prompt.
TOOLSET: tuple[str, ...] = ("grounding", "counter", "generator", "captioner")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system", "tool": "tool", "observation": "tool", "function": "tool"}  # fmt: skip
IMAGE_TAG = "<image>"


@dataclass
class Example:
    """One training conversation: chat messages and the images of its image parts, in order."""

    messages: list[dict[str, Any]]
    images: list[ImageLike] = field(default_factory=list)
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_parts = sum(1 for m in self.messages for p in message_parts(m) if p["type"] == "image")
        if n_parts != len(self.images):
            raise ValueError(
                f"example {self.id or '?'}: image parts and images do not match: "
                f"{n_parts} image parts in the messages, {len(self.images)} images"
            )

    def load_images(self) -> list[Image.Image]:
        """The images as RGB PIL images."""
        return [load_image(im) for im in self.images]

    def image_keys(self) -> list[str]:
        """A stable key per image: its resolved path, or a pixel hash for in-memory images."""
        return [
            str(Path(im).resolve()) if isinstance(im, str | Path) else image_key(load_image(im))
            for im in self.images
        ]


def system_prompt(tools: Sequence[str] = TOOLSET, prompts: str = "agent") -> str:
    """The agent's system prompt for these built-in tools (schemas from the registry; no weights load)."""
    from toolvlm.agent.prompting import system_prompt as render_prompt
    from toolvlm.tools import registry

    return render_prompt([registry.schema(name) for name in tools], prompts=prompts)


# -- JSONL --------------------------------------------------------------------------------------------------


def example_from_record(record: dict[str, Any], root: Path, system: str | None = None) -> Example:
    """An example from one JSONL record (ours, LLaVA's, or a session pointer); paths are relative to `root`."""
    if "session" in record:
        return example_from_session(root / record["session"], system=system)
    if "conversations" in record:
        return example_from_llava(record, root)
    if "messages" not in record:
        raise ValueError(
            f"a record needs 'messages', 'conversations' or 'session'; got keys {sorted(record)}"
        )
    images = [_resolve(root, p) for p in record.get("images", [])]
    return Example(record["messages"], images, str(record.get("id", "")), dict(record.get("meta", {})))


def example_from_llava(record: dict[str, Any], root: Path) -> Example:
    """An example from LLaVA's format: `image` (one or a list) and `conversations` with `<image>` tags."""
    image = record.get("image") or record.get("images") or []
    paths = [image] if isinstance(image, str) else list(image)
    messages = []
    for turn in record["conversations"]:
        role = LLAVA_ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown LLaVA speaker {turn.get('from')!r}; speakers: {sorted(LLAVA_ROLES)}")
        text = turn.get("value", turn.get("content", ""))
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(text.split(IMAGE_TAG)):
            if k:
                parts.append({"type": "image"})
                piece = piece.lstrip("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return Example(messages, [_resolve(root, p) for p in paths], str(record.get("id", "")))


def read_jsonl(path: str | Path, system: str | None = None) -> list[Example]:
    """The examples of a JSONL file; a malformed line raises with its line number."""
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(example_from_record(json.loads(line), path.parent, system))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise ValueError(f"{path}:{number}: {err}") from err
    return out


def write_jsonl(path: str | Path, examples: Iterable[Example], image_dir: str = "images") -> Path:
    """Write examples as JSONL; in-memory images are saved as PNGs under `image_dir` next to the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / image_dir).mkdir(exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for n, ex in enumerate(examples):
            paths = []
            for k, image in enumerate(ex.images):
                if isinstance(image, str | Path):
                    paths.append(_relative(Path(image), path.parent))
                    continue
                name = f"{image_dir}/{ex.id or n}_{k}.png"
                if isinstance(image, bytes):
                    image = load_image(image)
                image.save(path.parent / name)
                paths.append(name)
            record = {"id": ex.id, "images": paths, "messages": ex.messages, "meta": ex.meta}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _resolve(root: Path, image: str) -> Path:
    path = Path(image)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return path


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


# -- agent sessions -----------------------------------------------------------------------------------------


def example_from_session(
    folder: str | Path, system: str | None = None, supervise_mistakes: bool = False
) -> Example:
    """A saved agent session as a training example: its messages, its images by handle, the system prompt.

    Cancelled replies are never supervised; replies with malformed calls only with `supervise_mistakes`.
    """
    from toolvlm.agent.session import SessionStore
    from toolvlm.agent.trajectory import AssistantStep

    folder = Path(folder)
    if not (folder / "trajectory.jsonl").is_file():
        raise FileNotFoundError(f"not a saved agent session (no trajectory.jsonl): {folder}")
    store = SessionStore(folder, create=False)  # read only: no writer lock, a live session can be read
    trajectory, _memory = store.load()
    messages: list[dict[str, Any]] = [{"role": "system", "content": system or system_prompt()}]
    for step in trajectory:
        for message in step.to_messages():
            if isinstance(step, AssistantStep) and (
                step.cancelled or (step.errors and not supervise_mistakes)
            ):
                message = {**message, "supervise": False}
            messages.append(message)
    images = [store.image_path(h) for h in trajectory.image_handles()]
    return Example(messages, images, id=folder.name, meta={"source": "session", "folder": str(folder)})


def is_session(folder: Path) -> bool:
    """True for a saved agent session folder."""
    return (folder / "trajectory.jsonl").is_file()


def load_examples(sources: str | Path | Sequence[str | Path], system: str | None = None) -> list[Example]:
    """Examples from JSONL files, session folders, and folders of session folders."""
    if isinstance(sources, str | Path):
        sources = [sources]
    out: list[Example] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            out.extend(read_jsonl(path, system))
        elif path.is_dir() and is_session(path):
            out.append(example_from_session(path, system))
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_dir() and is_session(p))
            jsonls = sorted(path.glob("*.jsonl"))
            if not found and not jsonls:
                raise FileNotFoundError(f"no JSONL files or session folders in {path}")
            out.extend(ex for p in jsonls for ex in read_jsonl(p, system))
            out.extend(example_from_session(p, system) for p in found)
        else:
            raise FileNotFoundError(f"training data not found: {path}")
    logger.info("loaded %d examples from %s", len(out), ", ".join(map(str, sources)))
    return out


# -- rendering ----------------------------------------------------------------------------------------------


@dataclass
class RenderedExample:
    """An example rendered to ids and labels, with its images (paths or PIL, loaded on demand) and their keys."""

    input_ids: list[int]
    labels: list[int]
    images: list[ImageLike]
    image_keys: list[str]
    image_spans: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        """Tokens with a label."""
        return sum(1 for t in self.labels if t != -100)


class ConversationDataset(Dataset):
    """Examples rendered once through `VLM.render` (the function inference uses); too long ones are left out.

    Items keep their images unloaded (paths stay paths), so that a trainer with cached vision features never
    decodes an image twice.
    """

    def __init__(self, examples: Sequence[Example], vlm: Any, max_length: int | None = None):
        self.vlm = vlm
        kept: list[Example] = []
        self.items: list[RenderedExample] = []
        for example in examples:
            rendered = vlm.render(example.messages, example.load_images())
            if max_length is not None and len(rendered) > max_length:
                continue
            kept.append(example)
            self.items.append(
                RenderedExample(
                    rendered.input_ids,
                    rendered.labels,
                    list(example.images),
                    example.image_keys(),
                    rendered.image_spans,
                )  # fmt: skip
            )
        if len(kept) < len(examples):
            logger.warning(
                "left out %d of %d examples longer than max_length=%s tokens", len(examples) - len(kept),
                len(examples), max_length,
            )  # fmt: skip
        self.examples = kept
        self.lengths = [len(item) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> RenderedExample:
        return self.items[index]
