"""Benchmark: `toolvlm serve` under N concurrent clients on loopback (default 16 clients x 10 requests).

    python bench/serve_load.py [--clients 16] [--requests 10] [--workers 2] [--queue 16] [--stream-every 3]
                               [--profile P --controller profile|workflow]

It starts a server itself, in a subprocess (this script with --server), on a free port. By default the server
runs the rule-based WorkflowController with two light tools defined here (grounding draws a box, counter counts
dark pixels; both real `Tool`s whose images go to the session folders), so the figures measure the server:
HTTP, the queue, the per-session locks and the session writes. `--profile P` serves a real profile's tools
(and, with `--controller profile`, its controller; expect minutes per request on a CPU).

Each client holds one conversation through the OpenAI-compatible endpoint: its first request brings an image,
the others continue the session (`toolvlm_session`); every `--stream-every`-th request streams. After the run
every session folder is read back: a session is lost when its folder is missing or holds fewer turns than the
requests answered for it, corrupted when it does not load (torn lines, images missing or out of order) or a turn
is unfinished. Errors are counted by kind (HTTP status and error type); a 5xx is unexplained when its body
carries no error message. Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from toolvlm.tools.base import Tool, ToolOutput

QUESTIONS = ("Where is the tree?", "How many people are there?", "What do you see?", "Find the dog.")
IMAGE = {"type": "string", "format": "image", "description": "an image handle, e.g. img_0"}


class BoxTool(Tool):
    """Draws a box around the image's middle half (no model)."""

    name = "grounding"
    description = "Find an object; returns its box and the image with the box drawn."
    inputs = {
        "type": "object",
        "properties": {"image": IMAGE, "phrase": {"type": "string"}},
        "required": ["image", "phrase"],
    }

    def forward(self, image: Image.Image, phrase: str) -> ToolOutput:
        box = [image.width // 4, image.height // 4, 3 * image.width // 4, 3 * image.height // 4]
        drawn = image.copy()
        ImageDraw.Draw(drawn).rectangle(box, outline=(255, 0, 0), width=3)
        return ToolOutput(content=f"{phrase} at {box}", images=[drawn], artifact={"boxes": [box]})


class DarkPixelCounter(Tool):
    """Counts dark pixels per 100 (no model)."""

    name = "counter"
    description = "Count objects matching a phrase."
    inputs = {
        "type": "object",
        "properties": {"image": IMAGE, "phrase": {"type": "string"}},
        "required": ["image", "phrase"],
    }

    def forward(self, image: Image.Image, phrase: str) -> ToolOutput:
        n = sum(image.convert("L").histogram()[:80]) // 100
        return ToolOutput(content=f"about {n} {phrase}", artifact={"count": n, "phrase": phrase})


def picture(seed: int) -> Image.Image:
    """A 256x192 picture with a few dark blobs, different per client."""
    image = Image.new("RGB", (256, 192), (90, 170, 90))
    draw = ImageDraw.Draw(image)
    for i in range(3 + seed % 5):
        x, y = (37 * (i + seed)) % 230, (53 * (i + 2 * seed)) % 170
        draw.ellipse([x, y, x + 20, y + 20], fill=(20, 20, 30))
    return image


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# -- the server (subprocess) --------------------------------------------------------------------------------


def run_server(args: argparse.Namespace) -> None:
    """Serve until killed; prints READY when listening."""
    import uvicorn

    from toolvlm.serve.app import create_app
    from toolvlm.serve.config import ServeConfig
    from toolvlm.serve.sessions import SharedModels
    from toolvlm.serve.workflow import WorkflowController

    config = ServeConfig(
        port=args.port,
        sessions=args.sessions,
        profile=args.profile,
        controller=args.controller,
        workers=args.workers,
        queue=args.queue,
        turn_timeout_s=args.turn_timeout,
    )
    if args.profile is None and args.controller == "workflow":
        models = SharedModels.wrap(WorkflowController(), [BoxTool(), DarkPixelCounter()])
    else:
        models = SharedModels.load(config)
    app = create_app(config, models)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=lambda: (_wait_started(server), print("READY", flush=True)), daemon=True).start()
    server.run()


def _wait_started(server) -> None:
    while not server.started:
        time.sleep(0.02)


def start_server(args: argparse.Namespace, sessions: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--server", "--port", str(port), "--sessions", str(sessions)]
    command += ["--workers", str(args.workers), "--queue", str(args.queue), "--controller", args.controller]
    command += ["--turn-timeout", str(args.turn_timeout)] + (
        ["--profile", args.profile] if args.profile else []
    )
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"the server did not start (it printed {line!r}; exit code {proc.poll()})")
    return proc


# -- the clients ---------------------------------------------------------------------------------------------


class Results:
    """Latencies, answered requests per session, and errors by kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.unexplained_5xx = 0
        self.answered: Counter[str] = Counter()  # session id -> requests answered

    def ok(self, seconds: float, session: str) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.answered[session] += 1

    def error(self, kind: str, status: int, explained: bool) -> None:
        with self.lock:
            self.errors[kind] += 1
            if status >= 500 and not explained:
                self.unexplained_5xx += 1


def client(index: int, base: str, args: argparse.Namespace, results: Results) -> None:
    """One conversation of `args.requests` requests."""
    import httpx

    session = None
    with httpx.Client(base_url=base, timeout=args.turn_timeout + 60) as http:
        for r in range(args.requests):
            question = QUESTIONS[(index + r) % len(QUESTIONS)]
            content: list[dict] = [{"type": "text", "text": question}]
            if session is None:
                content.insert(0, {"type": "image_url", "image_url": {"url": data_url(picture(index))}})
            body: dict = {"model": "toolvlm", "messages": [{"role": "user", "content": content}]}
            if session is not None:
                body["toolvlm_session"] = session
            stream = args.stream_every > 0 and r % args.stream_every == args.stream_every - 1
            body["stream"] = stream
            start = time.perf_counter()
            try:
                sid, failure = _request(http, body, stream)
            except httpx.HTTPError as err:
                results.error(f"transport {type(err).__name__}", 599, False)
                continue
            if failure is not None:
                results.error(*failure)
                continue
            session = session or sid
            results.ok(time.perf_counter() - start, sid)


def _request(http, body: dict, stream: bool) -> tuple[str | None, tuple[str, int, bool] | None]:
    """(session id, None) for an answer, or (None, (kind, status, explained)) for an error."""
    if not stream:
        response = http.post("/v1/chat/completions", json=body)
        data = _json(response.text)
        if response.status_code != 200:
            error = (data or {}).get("error") or {}
            return None, (
                f"{response.status_code} {error.get('type', '?')}",
                response.status_code,
                bool(error),
            )
        if not data["choices"][0]["message"]["content"]:
            return None, ("200 empty answer", 200, False)
        return data["toolvlm_session"], None
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = (_json(response.read().decode()) or {}).get("error") or {}
            return None, (
                f"{response.status_code} {error.get('type', '?')}",
                response.status_code,
                bool(error),
            )
        sid, done, finished = None, False, False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return None, (f"stream {chunk['error'].get('type')}", chunk["error"].get("code", 500), True)
            sid = chunk.get("toolvlm_session", sid)
            finished = finished or chunk["choices"][0]["finish_reason"] is not None
        if not (done and finished):
            return None, ("stream ended without [DONE] or a finish", 200, False)
        return sid, None


def _json(text: str) -> dict | None:
    try:
        return json.loads(text)
    except ValueError:
        return None


def check_sessions(root: Path, answered: Counter[str]) -> tuple[int, int]:
    """(lost, corrupted) sessions among those that answered requests."""
    from toolvlm.agent.session import load_session
    from toolvlm.agent.trajectory import UserStep

    lost = corrupted = 0
    for sid, n in answered.items():
        folder = root / sid
        if not folder.is_dir():
            lost += 1
            continue
        try:
            trajectory, memory = load_session(folder)
        except (ValueError, FileNotFoundError, OSError):
            corrupted += 1
            continue
        turns = sum(isinstance(s, UserStep) for s in trajectory)
        if turns < n:
            lost += 1
        elif not trajectory.turn_finished() or len(memory) == 0:
            corrupted += 1
    return lost, corrupted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--stream-every", type=int, default=3, help="every n-th request streams (0: none)")
    parser.add_argument("--profile", default=None, help="serve a real profile's tools (see --controller)")
    parser.add_argument("--controller", choices=("workflow", "profile"), default="workflow")
    parser.add_argument("--turn-timeout", type=float, default=300.0)
    parser.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        run_server(args)
        return
    from toolvlm.serve.background import free_port

    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        sessions = Path(tmp) / "sessions"
        port = free_port()
        proc = start_server(args, sessions, port)
        results = Results()
        try:
            start = time.perf_counter()
            threads = [
                threading.Thread(target=client, args=(i, f"http://127.0.0.1:{port}", args, results))
                for i in range(args.clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        lost, corrupted = check_sessions(sessions, results.answered)
        folders = sum(1 for p in sessions.iterdir() if p.is_dir()) if sessions.is_dir() else 0
    lat = sorted(results.latencies)
    figures = {
        "clients": args.clients,
        "requests": args.clients * args.requests,
        "ok": len(lat),
        "errors": dict(results.errors),
        "unexplained_5xx": results.unexplained_5xx,
        "p50_s": round(statistics.median(lat), 4) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4) if lat else None,
        "throughput_rps": round(len(lat) / wall, 2),
        "wall_s": round(wall, 2),
        "sessions": len(results.answered),
        "session_folders": folders,
        "lost_sessions": lost,
        "corrupted_sessions": corrupted,
        "server": {
            "controller": args.controller,
            "profile": args.profile or "fast tools",
            "workers": args.workers,
            "queue": args.queue,
        },
        "cpu_count": os.cpu_count(),
    }
    print(
        f"{figures['ok']}/{figures['requests']} answered in {wall:.1f} s ({figures['throughput_rps']} req/s); "
        f"p50 {figures['p50_s']} s, p95 {figures['p95_s']} s; errors {dict(results.errors) or 'none'}; "
        f"sessions lost {lost}, corrupted {corrupted}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
