"""The profile format as typed models: what each key of a profile may hold, checked before anything loads.

    description: str                      # optional, shown nowhere but kept with the profile
    controller: {backend: local | openai | scripted, ...that backend's options (the models below)}
    tools: {TOOL: {backend: ..., ...that tool's own options} | null}   # toolvlm.tools.options
    agent: {...AgentConfig options}       # max_steps, constrained, prompts, ...
    domain: {stats: FILE, device: cpu}    # the out-of-domain check (toolvlm.tools.domain)

Every mapping refuses unknown keys and every value is type-checked strictly (`toolvlm.config`), so a problem
reads `controller.timeout: expected a number, got 'slow'`. Names that depend on what is installed (which
controller backends, tools and tool backends exist) and whether model folders exist are checked after this, by
`toolvlm.agent.profiles.check_profile`; a controller of an unknown backend is therefore not checked here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from toolvlm.config import STRICT, model_for, validate


class LocalController(BaseModel):
    """A toolvlm.vlm model in this process."""

    model_config = STRICT
    backend: Literal["local"] = "local"
    model: str | dict[str, Any]  # a folder, a hub id where there is network, or a toolvlm VLMSpec mapping
    device: str = "cpu"
    dtype: str = "auto"
    decode_kernels: Literal["exact", "prepacked"] = "exact"  # toolvlm.vlm.fast_decode.KERNELS


class OpenAIController(BaseModel):
    """A model served elsewhere through the OpenAI chat API (toolvlm.agent.openai_controller)."""

    model_config = STRICT
    backend: Literal["openai"]
    base_url: str
    model: str
    api_key: str | None = None
    api_key_env: str | None = None  # the environment variable holding the key
    timeout: float = 120.0  # seconds without data before the request fails
    extra_body: dict[str, Any] | None = None  # sent with every request
    send_images: bool = True  # false: a text-only server; images go as their handles
    native_tools: bool = False  # the server takes `tools` and returns `tool_calls`


class ScriptedController(BaseModel):
    """Replies given in advance, in order (demos and tests)."""

    model_config = STRICT
    backend: Literal["scripted"]
    replies: list[str]
    supports_tool_template: bool = False
    chunk_size: int = 4


class Domain(BaseModel):
    """The out-of-domain check: statistics fitted by bench/domain_check.py --fit."""

    model_config = STRICT
    stats: str | None = None  # a stats file, relative to the profile's folder or absolute
    device: str = "cpu"


def agent_options() -> type[BaseModel]:
    """The model of the `agent:` mapping: AgentConfig's fields and types."""
    from .loop import AgentConfig

    return model_for(AgentConfig)


class ProfileFile(BaseModel):
    """The top level of a profile; `controller` and `tools` are checked per backend and per tool after it."""

    model_config = STRICT
    description: str | None = None
    controller: dict[str, Any]
    tools: dict[str, Any] | None = None
    agent: dict[str, Any] | None = None
    domain: Domain | None = None


CONTROLLERS: dict[str, type[BaseModel]] = {
    "local": LocalController,
    "openai": OpenAIController,
    "scripted": ScriptedController,
}


def controller_problems(spec: dict[str, Any], where: str = "controller") -> list[str]:
    """Problems of a `controller:` mapping whose backend is known (one line per key); [] for another backend,
    which `check_profile` names."""
    backend = spec.get("backend", "local")
    model = CONTROLLERS.get(backend) if isinstance(backend, str) else None
    return [] if model is None else validate(model, spec, prefix=where)[1]


def profile_problems(data: Any) -> list[str]:
    """Every shape and type problem of a profile mapping, one line per key ([] for a well-formed profile)."""
    from toolvlm.tools.options import option_problems

    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        return [f"expected a mapping with 'controller:' and 'tools:', got {got}"]
    found = validate(ProfileFile, data)[1]  # the top level, and each section's own shape
    if isinstance(data.get("controller"), dict):
        found += controller_problems(data["controller"])
    if isinstance(data.get("tools"), dict):
        found += option_problems(data["tools"])
    if isinstance(data.get("agent"), dict):
        found += validate(agent_options(), data["agent"], prefix="agent")[1]
    return found
