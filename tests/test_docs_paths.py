"""The README and docs/ cite real things: every repository path they name exists (a glob matches a file), and every
`toolvlm.x.y` they name imports."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OUTPUTS = {"runs", "build", "dist"}  # what commands write: named in docs, absent from a clone
FOLDERS = sorted(
    p.name
    for p in ROOT.iterdir()
    if p.is_dir() and p.name[0] not in "._" and p.name not in OUTPUTS and not p.name.endswith(".egg-info")
)
PATH = re.compile(r"(?<![\w/.-])((?:" + "|".join(FOLDERS) + r")/[\w./*-]*[\w*])")
DOTTED = re.compile(r"\btoolvlm(?:\.\w+)+")


def cited_paths(text: str) -> list[str]:
    """Repository paths a text names (under the project's top-level folders)."""
    return [m.group(1) for m in PATH.finditer(text)]


def resolves(dotted: str) -> bool:
    """Whether `toolvlm.a.b.c` is a module, or an attribute chain of the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_the_patterns_find_what_they_should():
    assert cited_paths("see `vlm/fast_decode.py`, bundle/metrics_*.json and runs/x") == [
        "vlm/fast_decode.py",
        "bundle/metrics_*.json",
    ]
    assert resolves("toolvlm.vlm.fast_decode.LlamaDecodeStep") and not resolves(
        "toolvlm.vlm.fast_decode.Nope"
    )
    assert not resolves("toolvlm.finetune.no_such_module")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_only_paths_and_modules_that_exist(doc):
    text = doc.read_text()
    missing = [p for p in cited_paths(text) if not any(ROOT.glob(p))]
    unresolved = [name for name in DOTTED.findall(text) if not resolves(name)]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"
    assert not unresolved, f"{doc.name} names modules or attributes that do not exist: {unresolved}"
