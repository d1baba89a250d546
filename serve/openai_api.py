"""The assistant as an OpenAI-compatible endpoint: `POST /v1/chat/completions` and `GET /v1/models`.

Requests are OpenAI chat completions: `messages` whose content is a string or parts (`text`, `image_url` with a
`data:image/...;base64,` URL or a URL of an image this server serves, `/sessions/ID/images/img_N.png`; nothing
is fetched from the network), and `stream`. Each request is one turn of a server-side session:

- without `toolvlm_session` (extra body field) a new session is made; the messages before the last user message
  are replayed into it as earlier turns (user text and images, assistant text; system messages are ignored:
  the agent has its own system prompt);
- with `toolvlm_session: ID` the turn continues that session and only the last user message is used.

Extra fields in the answers (documented in README):

- top level: `toolvlm_session` (the session id, to continue it);
- on the message (and on stream deltas): `toolvlm_steps`, the tool steps
  `[{"tool", "arguments", "content", "artifact", "error", "images": [{"handle", "url"}]}]`, and, at the end,
  `toolvlm_images` (images made in the turn) and `toolvlm_finish` ("answer", "step_limit", "retries");
- images made in the turn are also appended to the content as Markdown `![img_1](URL)` lines, for clients
  that only show text.

Streaming sends `chat.completion.chunk` events (the visible text of every reply of the turn as it is
generated, a tool step as soon as it ran) and ends with `data: [DONE]`; a turn that fails mid-stream sends an
`{"error": ...}` event before `[DONE]`, which the openai client raises. This module knows the OpenAI wire format.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from toolvlm.agent.trajectory import AssistantStep, UserStep

from .config import ServeConfig
from .inputs import ServeError, check_image_count, check_question, decode_data_url, decode_image
from .runner import TurnHandle, TurnRequest
from .sessions import SessionManager, record

SERVER_IMAGE = re.compile(
    r"^(?:https?://[^/]+)?/sessions/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/images/(img_\d+)\.png$"
)
FINISH = {"answer": "stop"}  # others (step_limit, retries, cancelled) -> "length"


def _image(url: str, config: ServeConfig, manager: SessionManager) -> Image.Image:
    if url.startswith("data:"):
        return decode_data_url(url, config)
    match = SERVER_IMAGE.match(url)
    if match is None:
        raise ServeError(
            400,
            "bad_image_url",
            "image_url must be a data: URL or an image URL of this server (/sessions/ID/images/img_N.png); "
            f"the server fetches nothing from the network, got {url[:80]!r}",
        )
    path = manager.image_path(match.group(1), match.group(2))
    return decode_image(path.read_bytes(), config, match.group(2))


def parse_message(
    message: Any, config: ServeConfig, manager: SessionManager
) -> tuple[str, str, list[Image.Image]]:
    """(role, text, images) of one OpenAI message, images decoded and checked against the limits."""
    if not isinstance(message, dict) or "role" not in message:
        raise ServeError(400, "invalid_request", "each message must be an object with a 'role'")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message["role"], content or "", []
    if not isinstance(content, list):
        raise ServeError(400, "invalid_request", "message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise ServeError(400, "invalid_request", "an image_url part needs {'url': ...}")
            images.append(url)
        else:
            raise ServeError(
                400, "invalid_request", f"unsupported content part type {kind!r}; use text, image_url"
            )
    check_image_count(len(images), config)
    return message["role"], "\n".join(texts), [_image(u, config, manager) for u in images]


def add_openai_routes(app: FastAPI) -> None:
    """Add /v1/models and /v1/chat/completions to `app` (made by app.create_app)."""
    config: ServeConfig = app.state.config
    manager: SessionManager = app.state.sessions
    runner = app.state.runner
    model_name = app.state.models.name

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "toolvlm"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
        except ValueError:
            raise ServeError(
                400, "invalid_request", "the body must be JSON (an OpenAI chat completion)"
            ) from None
        if not isinstance(body, dict):
            raise ServeError(400, "invalid_request", "the body must be a JSON object")
        model = body.get("model", model_name)
        if model != model_name:
            raise ServeError(
                404, "model_not_found", f"model {model!r} is not served here; models: {model_name}"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError(400, "invalid_request", "'messages' must be a non-empty list")
        parsed = await run_in_threadpool(lambda: [parse_message(m, config, manager) for m in messages])
        last_user = max((i for i, (role, _, _) in enumerate(parsed) if role == "user"), default=None)
        if last_user is None:
            raise ServeError(400, "invalid_request", "there is no user message to answer")
        _, text, images = parsed[last_user]
        check_question(text, config)
        session_id = body.get("toolvlm_session")
        created = session_id is None
        if created:
            session_id = manager.create()
            await run_in_threadpool(_replay, manager, session_id, parsed[:last_user])
        elif not isinstance(session_id, str) or not manager.exists(session_id):
            raise ServeError(404, "session_not_found", f"no session {session_id!r}")
        base = str(request.base_url).rstrip("/")
        try:
            handle = runner.start(TurnRequest(session_id, text, images, base))
        except ServeError:
            if created:  # refused (e.g. 429): leave no folder behind for a conversation that never started
                manager.discard(session_id)
            raise
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": reply_id, "created": created, "model": model_name, "toolvlm_session": session_id}
        if body.get("stream"):
            return StreamingResponse(
                _chunks(handle, head), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        answer, _ = await run_in_threadpool(handle.result)
        message = {
            "role": "assistant",
            "content": answer["text"] + _markdown(answer["images"]),
            "toolvlm_steps": answer["steps"],
            "toolvlm_images": answer["images"],
            "toolvlm_finish": answer["finish"],
        }
        choice = {"index": 0, "message": message, "finish_reason": FINISH.get(answer["finish"], "length")}
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})


def _replay(
    manager: SessionManager, session_id: str, history: list[tuple[str, str, list[Image.Image]]]
) -> None:
    """Write earlier user and assistant messages into a new session as its past turns."""
    if not history:
        return
    lock = manager.acquire(session_id)
    try:
        bot = manager.assistant(session_id)
        for role, text, images in history:
            if role == "user":
                handles = [bot.agent.add_image(im, "user") for im in images]
                record(bot, UserStep(text=text, images=handles))
            elif role == "assistant" and bot.trajectory.steps:
                record(bot, AssistantStep(text=text))
    finally:
        lock.release()


def _markdown(images: list[dict[str, str]]) -> str:
    return "".join(f"\n\n![{im['handle']}]({im['url']})" for im in images)


def _chunks(handle: TurnHandle, head: dict[str, Any]) -> Iterator[bytes]:
    """The turn's events as chat.completion.chunk SSE events, then [DONE]."""
    from .wire import sse

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    for event in handle.events():
        kind = event["type"]
        if kind == "token":
            yield chunk({"content": event["text"]})
        elif kind == "tool_result":
            yield chunk({"toolvlm_steps": [event["step"]]})
        elif kind == "answer":
            if event["images"]:
                yield chunk({"content": _markdown(event["images"])})
            final = {"toolvlm_images": event["images"], "toolvlm_finish": event["finish"]}
            yield chunk(final, FINISH.get(event["finish"], "length"))
        elif kind == "error":
            yield sse(
                {"error": {"message": event["message"], "type": event["kind"], "code": event["status"]}}
            )
    yield sse("[DONE]")
