"""The package layout's import rules, read from the source with `ast` (nothing is imported).

Layers, bottom up: the runtime (bundle, prompts, tools, vlm, agent, serve) never imports the world, training or
evaluation; the world (scenes, sampling, drawing, text, oracle) uses only the runtime; training (finetune) uses the
runtime and the world; evaluation uses all of those. Only the command line and the demo (toolvlm/) sit above
everything; toolvlm/config.py (the validated YAML layer) is a base every layer may use. The shifted eval set stays unseen: only the controller evaluation may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "bundle",
    "prompts",
    "tools",
    "vlm",
    "agent",
    "serve",
    "world",
    "finetune",
    "evaluation",
    "toolvlm",
)
RUNTIME = {"bundle", "prompts", "tools", "vlm", "agent", "serve"}
# package -> the toolvlm packages it may import (itself always; `recipes` is toolvlm/recipes.py, the config layer)
ALLOWED: dict[str, set[str]] = {
    "bundle": set(),
    "prompts": set(),
    "tools": {"bundle"},
    "vlm": {"bundle", "tools"},
    "agent": {"bundle", "prompts", "tools", "vlm"},
    "serve": {"bundle", "prompts", "tools", "vlm", "agent"},
    "world": {"tools", "vlm"},
    "finetune": RUNTIME | {"world", "recipes"},
    "evaluation": RUNTIME | {"world", "finetune", "recipes"},
}
SHIFTED = {"shift_scenes", "shift_phrasings"}
SHIFT_USERS = {"evaluation/controller.py", "evaluation/shift_phrasings.py", "evaluation/shift_scenes.py"}


def imported(path: Path) -> set[str]:
    """Every `toolvlm.*` module a file imports (`from toolvlm import x` gives `toolvlm.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("toolvlm.")}


def package_of(module: str) -> str:
    """The layer a `toolvlm.x.y` module belongs to (`recipes`, `cli`, `demo` for toolvlm/'s own modules)."""
    return module.split(".")[1]


def sources(package: str) -> list[Path]:
    """The package's Python files."""
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package):
    """No upward import, e.g. tools -> agent, vlm -> finetune, world -> evaluation, finetune -> evaluation."""
    files = sources(package)
    assert files, f"no sources under {package}/"
    wrong = []
    for path in files:
        for module in imported(path):
            layer = package_of(module)
            known = layer in PACKAGES + ("recipes", "cli", "demo", "train_cli")
            if known and layer != package and layer not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_only_the_controller_evaluation_reads_the_shifted_set():
    """Training, calibration and the world never import the shifted composer or phrasings (never tuned on)."""
    users = []
    for package in PACKAGES:
        for path in sources(package):
            rel = str(path.relative_to(ROOT))
            if rel not in SHIFT_USERS and any(m.split(".")[-1] in SHIFTED for m in imported(path)):
                users.append(rel)
    assert not users, users


def test_the_rules_catch_an_upward_import(tmp_path):
    """The reader sees `from toolvlm.finetune import x` and plain `import toolvlm.evaluation.y` alike."""
    path = tmp_path / "m.py"
    path.write_text("from toolvlm.finetune import trainer\nimport toolvlm.evaluation.controller as c\n")
    layers = {package_of(m) for m in imported(path)}
    assert {"finetune", "evaluation"} <= layers
    assert not layers <= ALLOWED["tools"]


def test_every_package_folder_is_in_the_distribution():
    """pyproject maps each layer's folder into the `toolvlm` package, so an installed copy has every layer."""
    text = (ROOT / "pyproject.toml").read_text()
    for package in PACKAGES:
        if package != "toolvlm":
            assert f'"toolvlm.{package}" = "{package}"' in text, package


def test_every_bundle_file_is_in_the_package_data():
    """A regular (not editable) install ships every bundle file, the model code plain libraries load included."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["toolvlm.bundle"]
    bundle = ROOT / "bundle"
    files = [p for p in bundle.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    shipped = {p for pattern in patterns for p in bundle.glob(pattern)} | {bundle / "__init__.py"}
    assert (bundle / "controller" / "modeling_toolvlm_llava.py") in shipped
    assert not [str(p.relative_to(bundle)) for p in files if p not in shipped]
    folders = {
        p.parent for p in files if p.parent != bundle
    }  # data folders listed, so setuptools keeps quiet
    listed = {bundle.joinpath(*name.split(".")[2:]) for name in setuptools["packages"]}
    assert not sorted(str(f.relative_to(ROOT)) for f in folders - listed)
