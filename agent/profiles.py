"""Profiles: YAML files naming the controller and each tool's backend, and how to find and check them.

    controller:            # backend "local" (a toolvlm.vlm model), "openai" (an OpenAI-compatible server),
                           # or "scripted" (replies: [...], for demos and tests)
      backend: local
      model: /path/to/checkpoint   # a folder, a hub id where there is network, or a toolvlm VLMSpec mapping
      device: cpu
      dtype: auto
      decode_kernels: exact  # or prepacked: oneDNN kernels for one-token steps on CPUs (faster, other rounding)
                           # "openai" takes base_url, model, api_key or api_key_env, timeout, extra_body,
                           # send_images (false: a text-only server), native_tools (its `tools`/`tool_calls`)
    tools:                 # tool name -> backend options, as toolvlm.tools.registry.build_tools takes them
      grounding: {backend: owlv2, model: /path/to/owlv2, device: cpu, dtype: float32}
    agent:                 # optional: AgentConfig options (max_steps, constrained, ...)
      max_steps: 6

Every key is checked against the typed format of agent/profile_schema.py before anything loads: an unknown
key or a wrong type raises ProfileError naming the file and the key path (`controller.timeout: expected a
number, got 'slow'`); values are read as `toolvlm.config` reads YAML (only true/false are booleans).
A profile is given by path, or by name: NAME.yaml is looked for in $TOOLVLM_PROFILES (a path list),
./profiles, ./examples/profiles and ~/.config/toolvlm/profiles. Without a profile, the default bundle
(toolvlm.bundle) gives one: its own profile.yaml, or one made from the trained parts it holds. This module
builds controllers; it leaves building tools to the tools registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolvlm import bundle as bundle_names
from toolvlm.config import load_yaml

CONTROLLER_BACKENDS = ("local", "openai", "scripted")  # agent/profile_schema.py: their options
BUNDLE_PROFILE = (
    bundle_names.PROFILE
)  # a profile shipped inside the bundle; relative model paths are bundle parts
BUNDLE_TOOLS = bundle_names.TOOL_PARTS  # tool -> part


class ProfileError(ValueError):
    """A profile that cannot be found or does not make sense; the text says what to change."""


@dataclass
class Profile:
    """A parsed profile: controller spec, tools spec, agent options, and where it came from."""

    controller: dict[str, Any]
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    domain: dict[str, Any] = field(
        default_factory=dict
    )  # out-of-domain check: {stats: FILE}, tools/domain.py

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Profile:
        """Parse a profile mapping, checked against the typed profile format (agent/profile_schema.py):
        unknown keys and wrong types raise ProfileError naming the source and each key."""
        from .profile_schema import profile_problems

        problems = profile_problems(data)
        if problems:
            raise _error(source, problems)
        tools = {str(k): dict(v or {}) for k, v in (data.get("tools") or {}).items()}
        agent, domain = data.get("agent") or {}, data.get("domain") or {}
        return cls(dict(data["controller"]), tools, dict(agent), source, dict(domain))


def _error(source: str, problems: list[str]) -> ProfileError:
    """One ProfileError, one line, naming the source and listing `problems` (each names its key)."""
    if len(problems) == 1:
        return ProfileError(f"profile {source}: {problems[0]}")
    return ProfileError(f"profile {source}: {len(problems)} problem(s): {'; '.join(problems)}")


def search_dirs() -> list[Path]:
    """Folders searched for a profile given by name."""
    env = [Path(p) for p in os.environ.get("TOOLVLM_PROFILES", "").split(os.pathsep) if p]
    return [
        *env,
        Path("profiles"),
        Path("examples/profiles"),
        Path("~/.config/toolvlm/profiles").expanduser(),
    ]


def find_profile(name_or_path: str | Path) -> Path:
    """The file of a profile given by path or name; raises ProfileError saying where it looked."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.suffix in (".yaml", ".yml"):
        raise ProfileError(f"profile file not found: {path}")
    for folder in search_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = folder / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d) for d in search_dirs())
    raise ProfileError(f"no profile named {str(name_or_path)!r} (looked for {name_or_path}.yaml in {looked})")


def load_profile(source: str | Path | dict | Profile, check_models: bool = True) -> Profile:
    """A checked profile from a path, a name, a mapping or a Profile. A file's relative `model:` paths are taken
    from its own folder (a copied bundle's profile.yaml works wherever it lies, from any current folder); a
    mapping's from the current folder. Raises ProfileError naming the file and the key for malformed YAML, an
    unknown backend, tool or option, and (`check_models`) a missing model folder or a hub id the hub cannot
    give (offline); `check_models=False` reads a profile meant for another machine."""
    if isinstance(source, Profile):
        return source
    if isinstance(source, dict):
        return check(_resolve_models(Profile.from_dict(source), Path.cwd()), check_models)
    path = find_profile(source)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ProfileError(f"profile {path}: not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(f"profile {path}: cannot read it: {err}") from None
    return check(_resolve_models(Profile.from_dict(data, str(path)), path.parent), check_models)


def check(profile: Profile, check_models: bool = True) -> Profile:
    """`profile`, or ProfileError listing every problem `check_profile` sees (each with its file and key)."""
    problems = check_profile(profile, check_models)
    if problems:
        raise _error(profile.source, problems)
    return profile


def default_profile() -> Profile:
    """The profile of the default bundle (toolvlm.bundle): its `profile.yaml` if it ships one, else one made
    from the trained parts present; raises ProfileError while there is no trained controller."""
    from toolvlm import bundle

    folder = bundle.bundle_dir()
    shipped = folder / BUNDLE_PROFILE
    if shipped.is_file():
        return load_profile(shipped)
    if not bundle.has("controller"):
        raise ProfileError(
            f"the default bundle is not built in this version of toolvlm (no trained controller in {folder}), so "
            "there is no default profile: pass one (--profile PATH.yaml, or Assistant.from_profile(...)); "
            "examples are in examples/profiles/"
        )
    tools: dict[str, dict[str, Any]] = {}
    for tool, part in BUNDLE_TOOLS.items():
        if bundle.has(part):
            tools[tool] = {"backend": "inhouse", "model": str(bundle.part(part))}
    if "grounding" in tools:
        tools["counter"] = {}  # counts with the grounding tool's detector
    tools["draw_boxes"] = {}
    controller = {"backend": "local", "model": str(bundle.part("controller"))}
    return Profile(controller, tools, {}, source=f"default bundle ({folder})")


def _resolve_models(profile: Profile, folder: Path) -> Profile:
    """A profile whose relative `model:` paths are taken relative to `folder` (hub ids stay)."""
    from toolvlm.tools.hf import resolve_model

    def resolve(spec: dict[str, Any]) -> dict[str, Any]:
        return {**spec, "model": resolve_model(spec["model"], folder)} if "model" in spec else spec

    tools = {name: resolve(options) for name, options in profile.tools.items()}
    domain = profile.domain
    if isinstance(domain.get("stats"), str) and (folder / domain["stats"]).exists():
        domain = {**domain, "stats": str(folder / domain["stats"])}
    return Profile(resolve(profile.controller), tools, profile.agent, profile.source, domain)


def build_controller(spec: dict[str, Any]) -> Any:
    """A controller from the `controller:` mapping of a profile (checked against its backend's options)."""
    from .profile_schema import CONTROLLERS, controller_problems

    backend = spec.get("backend", "local")
    if backend not in CONTROLLERS:
        raise ProfileError(
            f"unknown controller backend {backend!r}; backends are: {', '.join(CONTROLLER_BACKENDS)}"
        )
    problems = controller_problems(spec)
    if problems:
        raise ProfileError("; ".join(problems))
    options = {k: v for k, v in spec.items() if k != "backend"}
    if backend == "local":
        from .controllers import LocalVLMController

        return LocalVLMController.load(
            options["model"],
            device=options.get("device", "cpu"),
            dtype=options.get("dtype", "auto"),
            decode_kernels=options.get("decode_kernels", "exact"),
        )
    if backend == "openai":
        from .openai_controller import OpenAIController

        return OpenAIController(**options)
    from .controllers import ScriptedController

    return ScriptedController(**options)


def tool_backends(name: str) -> list[str] | None:
    """The backend names a tool accepts (None when it takes no backend option)."""
    from toolvlm.tools import registry

    listed = registry.backends(name)
    return None if listed is None else list(listed)


def check_profile(profile: Profile, check_models: bool = True) -> list[str]:
    """Problems of a profile that can be seen without loading weights, each naming its key: unknown backends,
    tools or options, and (`check_models`) missing model folders and hub ids that cannot be reached."""
    from toolvlm.tools.hf import model_problem, spec_problems

    problems = []
    backend = profile.controller.get("backend", "local")
    if backend not in CONTROLLER_BACKENDS:
        problems.append(
            f"controller.backend: unknown controller backend {backend!r}; backends are: "
            f"{', '.join(CONTROLLER_BACKENDS)}"
        )
    elif backend == "local" and check_models:
        problem = model_problem(profile.controller.get("model"))
        if problem:
            problems.append(f"controller.model: {problem}")
    return problems + spec_problems(profile.tools, check_models=check_models)
