"""The FastAPI application: the web page, its JSON/SSE API, session images, and the OpenAI-compatible routes.

Routes of the page (all JSON errors are `{"error": {"message", "type", "code"}}`):

    GET  /                                    the chat page (static/index.html, app.js, style.css)
    GET  /api/limits                          the limits the server enforces
    GET  /api/sessions                        sessions, newest first
    POST /api/sessions                        a new session -> {"id"}
    GET  /api/sessions/{id}                   its turns (to redraw and resume it)
    POST /api/sessions/{id}/turns             multipart: question, images -> SSE of events (wire.py)
    GET  /sessions/{id}/images/{handle}.png   an image of a session
    GET  /healthz                             turns running and waiting

The OpenAI-compatible routes are in openai_api.py. This module knows HTTP; the turns run in runner.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .config import ServeConfig
from .inputs import ServeError, check_image_count, check_question, decode_image
from .runner import TurnHandle, TurnRequest, TurnRunner
from .sessions import SessionManager, SharedModels
from .wire import sse

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class BodyLimit:
    """ASGI middleware: a 413 for a body over `limit` bytes (declared length, or counted as it arrives)."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            error = _too_large(int(declared), self.limit)
            await JSONResponse(error.to_json(), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _too_large(seen, self.limit)
            return message

        await self.app(scope, counted, send)


def _too_large(size: int, limit: int) -> ServeError:
    return ServeError(
        413, "body_too_large", f"the request body is {size} bytes or more; the limit is {limit} bytes"
    )


def stream_events(handle: TurnHandle) -> Iterator[bytes]:
    """The turn's events as server-sent events (iterated on a worker thread by Starlette)."""
    for event in handle.events():
        yield sse(event)


def create_app(config: ServeConfig, models: SharedModels | None = None) -> FastAPI:
    """The application; `models` default to loading `config`'s profile (once, here)."""
    models = models if models is not None else SharedModels.load(config)
    manager = SessionManager(models, config.sessions, config.cached_sessions)
    runner = TurnRunner(manager, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # each streamed or waited-for turn holds one thread of Starlette's pool while it runs
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, 4 * (config.workers + config.queue))
        yield
        runner.shutdown()

    app = FastAPI(title="toolvlm", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.config, app.state.models, app.state.sessions, app.state.runner = config, models, manager, runner
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.to_json(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()[:5])
        return JSONResponse(ServeError(400, "invalid_request", problems).to_json(), status_code=400)

    static = resources.files("toolvlm.serve") / "static"

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, **runner.stats()}

    @app.get("/api/limits")
    def limits() -> dict[str, Any]:
        return config.limits()

    @app.get("/api/sessions")
    def list_sessions() -> dict[str, Any]:
        return {"sessions": manager.list()}

    @app.post("/api/sessions")
    def new_session() -> dict[str, Any]:
        return {"id": manager.create()}

    @app.get("/api/sessions/{session_id}")
    def get_session(session_id: str) -> dict[str, Any]:
        return {"id": session_id, "turns": manager.history(session_id)}

    @app.get("/sessions/{session_id}/images/{handle}.png")
    def session_image(session_id: str, handle: str) -> FileResponse:
        return FileResponse(manager.image_path(session_id, handle), media_type="image/png")

    @app.post("/api/sessions/{session_id}/turns")
    async def turn(session_id: str, request: Request) -> StreamingResponse:
        form = await request.form(max_files=config.max_images + 1, max_fields=16)
        question = form.get("question")
        check_question(question if isinstance(question, str) else "", config)
        uploads = [f for f in form.getlist("images") if not isinstance(f, str)]
        check_image_count(len(uploads), config)
        images = []
        for upload in uploads:
            data = await upload.read(config.max_image_bytes + 1)
            images.append(await run_in_threadpool(decode_image, data, config, upload.filename or "image"))
        handle = runner.start(TurnRequest(session_id, question, images))
        return StreamingResponse(stream_events(handle), media_type="text/event-stream", headers=SSE_HEADERS)

    from .openai_api import add_openai_routes

    add_openai_routes(app)
    return app
