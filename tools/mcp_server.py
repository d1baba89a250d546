"""`toolvlm mcp`: the tool registry served as a Model Context Protocol server (the official `mcp` SDK).

Every tool of a profile's `tools:` mapping (without a profile: every registered tool with its default options,
so the built-ins run on the default bundle's weights) is listed with its name, description and JSON input
schema. A call returns:

- a `TextContent` with the tool's short text (what a model reads),
- one `ImageContent` (PNG, base64) per image the tool made (e.g. the image with the boxes drawn),
- `structuredContent` = `ToolOutput.to_dict(paths)`: `{"content", "artifact", "images", "error"}`, where
  `artifact` is the tool's typed data (boxes, scores, count, ...) and `images` are the paths of the PNG files
  the made images were also written to (under `--out`, a fresh temporary folder by default), so a client on
  the same machine can pass a made image on to the next tool by path.

Image arguments (`{"type": "string", "format": "image"}` in the schemas) take a path to an image file on the
server's machine, a data URL (`data:image/png;base64,...`), or bare base64 of an image file. A tool's own
input errors, an image argument that does not decode, an unknown tool and missing weights come back as results
with `isError: true` and a text saying what to change; bugs raise (the client gets a JSON-RPC error).

Transports: stdio (default; what desktop MCP clients spawn) and streamable HTTP (`--transport http`, loopback
by default, at `http://HOST:PORT/mcp`). Tools run one at a time, in a worker thread, so the event loop keeps
answering while a model computes. This module imports neither the agent nor the VLM.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from toolvlm.tools import registry
from toolvlm.tools.base import MissingWeightsError, Tool, ToolOutput, image_parameters

logger = logging.getLogger(__name__)

SERVER_NAME = "toolvlm-tools"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_IMAGE_BYTES = 32 * 2**20  # a decoded image argument larger than this is refused with a message
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(?P<data>.*)", re.DOTALL)
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


class ImageArgumentError(ValueError):
    """An image argument that is neither an image file, a data URL nor base64 of an image."""


def default_spec() -> dict[str, dict[str, Any]]:
    """Every registered tool with its default options (built-ins: in-house backends, the bundle's weights)."""
    return {name: {} for name in registry.names()}


def load_tools_spec(profile: str | None) -> dict[str, dict[str, Any]]:
    """The `tools:` spec of a YAML profile file (relative `model:` paths taken beside it), or the default."""
    if profile is None:
        return default_spec()
    from toolvlm.tools.cli import load_profile  # reads the file and resolves `model:` paths beside it

    spec = load_profile(profile)
    if not spec:
        raise ValueError(f"profile {profile!r} lists no tools under 'tools:'")
    return spec


def decode_image(value: str) -> Image.Image | str:
    """A data URL or bare base64 string -> a PIL image; anything else (a file path) is returned as it is."""
    match = _DATA_URL.fullmatch(value.strip())
    if match:
        data = match["data"]
    elif len(value) >= 64 and _BASE64.fullmatch(value) and not Path(value).exists():
        data = value
    else:
        return value  # a path: the tool loads it and says so when it is not an image file
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise ImageArgumentError(
            f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MiB; send a smaller one"
        )
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
        with Image.open(io.BytesIO(raw)) as opened:
            opened.load()
            return opened.copy()
    except (binascii.Error, ValueError) as err:
        raise ImageArgumentError(f"not valid base64 ({err})") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ImageArgumentError(f"the base64 data is not an image file PIL can read ({err})") from None


def png_base64(image: Image.Image) -> str:
    """The image as base64 of a PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Image.Image):
        return f"<image {value.width}x{value.height}>"
    return repr(value)


class ToolHost:
    """The tools behind the server: decodes image arguments, runs calls one at a time, writes made images."""

    def __init__(self, tools: dict[str, Tool], out_dir: str | Path | None = None) -> None:
        self.tools = dict(tools)
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="toolvlm_mcp_"))
        self._lock = threading.Lock()
        self._made = 0

    def schemas(self) -> list[dict[str, Any]]:
        """The function-calling schema of each tool, in the spec's order."""
        return [{**tool.schema(), "name": name} for name, tool in self.tools.items()]

    def call(self, name: str, arguments: dict[str, Any] | None) -> tuple[ToolOutput, list[str]]:
        """Run one tool; returns its output and the paths its images were written to."""
        if name not in self.tools:
            return ToolOutput(f"unknown tool {name!r}; tools are: {', '.join(self.tools)}", error=True), []
        tool = self.tools[name]
        arguments = dict(arguments or {})
        hint = "pass a file path, a data URL (data:image/png;base64,...) or base64 of an image file"
        for key in image_parameters(tool.inputs):
            value = arguments.get(key)
            if not isinstance(value, str):
                continue
            try:
                arguments[key] = decode_image(value)
            except ImageArgumentError as err:
                return ToolOutput(f"{name}: argument {key!r}: {err}; {hint}", error=True), []
            if isinstance(arguments[key], str):  # a path
                path = Path(value).expanduser()
                if not path.is_file():
                    message = f"{name}: argument {key!r}: no image file {value!r} on the server; {hint}"
                    return ToolOutput(message, error=True), []
                arguments[key] = str(path)
        with self._lock:
            try:
                output = tool(**arguments)
            except MissingWeightsError as err:
                return ToolOutput(f"{name}: {err}", error=True), []
            paths = [str(self._write(name, image)) for image in output.images]
        return output, paths

    def _write(self, name: str, image: Image.Image) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        while (path := self.out_dir / f"{name}_{self._made}.png").exists():
            self._made += 1
        self._made += 1
        image.save(path)
        return path


def result_payload(output: ToolOutput, paths: list[str]) -> dict[str, Any]:
    """The MCP tool result fields: content blocks, structured content, error flag (plain JSON)."""
    structured = json.loads(json.dumps(output.to_dict(paths), default=_jsonable))
    content: list[dict[str, Any]] = [{"type": "text", "text": output.content}]
    content += [
        {"type": "image", "data": png_base64(image), "mimeType": "image/png"} for image in output.images
    ]
    return {"content": content, "structuredContent": structured, "isError": output.error}


def build_server(host: ToolHost) -> Any:
    """An `mcp` low-level Server listing and calling the host's tools."""
    import anyio
    import mcp_types as types
    from mcp.server.lowlevel import Server

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(
            tools=[
                types.Tool(name=s["name"], description=s["description"], input_schema=s["parameters"])
                for s in host.schemas()
            ]
        )

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        output, paths = await anyio.to_thread.run_sync(host.call, params.name, params.arguments)
        return types.CallToolResult.model_validate(result_payload(output, paths))

    return Server(
        SERVER_NAME,
        instructions=(
            "Vision tools (grounding, counting, captioning, generation). Image arguments take a file path, "
            "a data URL or base64 of an image file; made images come back as PNG image content, and their "
            "file paths are in structuredContent.images."
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def serve_stdio(host: ToolHost) -> None:
    """Serve over stdin/stdout until the client closes the connection."""
    from mcp.server.stdio import stdio_server

    server = build_server(host)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


def serve_http(host: ToolHost, address: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve over streamable HTTP at http://ADDRESS:PORT/mcp until interrupted."""
    import uvicorn

    app = build_server(host).streamable_http_app(host=address)
    logger.info("MCP tools at http://%s:%d/mcp", address, port)
    uvicorn.run(app, host=address, port=port, log_level="warning")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the arguments of `toolvlm mcp` to a subparser."""
    parser.add_argument(
        "--profile",
        default=None,
        help="a YAML profile file whose 'tools:' mapping configures the tools (default: every tool, in-house)",
    )
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="default stdio")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"HTTP address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--out", default=None, help="folder for the PNG files of made images (default: a new temporary one)"
    )


def run(args: argparse.Namespace, command: str) -> int:
    """Build the tools and serve them until the client or a signal ends it; returns the exit status."""
    import anyio

    try:
        tools = registry.build_tools(load_tools_spec(args.profile))
    except (ValueError, KeyError) as err:
        print(f"toolvlm mcp: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    host = ToolHost(tools, args.out)
    if args.transport == "http":
        serve_http(host, args.host, args.port)
    else:
        anyio.run(serve_stdio, host)
    return 0
