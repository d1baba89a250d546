"""The OpenAI-compatible controller against a small chat-completions server on loopback."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.openai_controller import ControllerError, OpenAIController, to_openai_messages


class ChatServer:
    """Speaks POST /v1/chat/completions: streams scripted replies as server-sent events; records requests."""

    def __init__(self, replies: list[str], stream: bool = True, status: int = 200):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions" or status != 200:
                    self.send_response(status if status != 200 else 404)
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "model not loaded"}}')
                    return
                text = server.replies.pop(0)
                self.send_response(200)
                if not (stream and body.get("stream")):
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(json.dumps({"choices": [{"message": {"content": text}}]}).encode())
                    return
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i in range(0, len(text), 5):
                    chunk = {"choices": [{"index": 0, "delta": {"content": text[i : i + 5]}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def decode(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_agent_over_openai_endpoint(agent_tools, agent_image, tmp_path):
    call = '<tool_call>{"name": "grounding", "arguments": {"image": "img_0", "phrase": "tree"}}</tool_call>'
    with ChatServer([call, "The tree is boxed in img_1."]) as server:
        controller = OpenAIController(server.url, model="qwen2-vl", api_key="secret", timeout=10)
        bot = Assistant(controller, agent_tools, session=tmp_path / "s")
        events = list(bot.stream("box the tree", images=[agent_image]))
    tokens = "".join(e.text for e in events if e.kind == "token")
    assert tokens == "The tree is boxed in img_1."
    assert events[-1].kind == "answer" and events[-1].images == ["img_1"]
    first, second = server.requests
    assert server.headers[0]["Authorization"] == "Bearer secret"
    assert first["model"] == "qwen2-vl" and first["stream"] is True and first["temperature"] == 0.0
    assert first["stop"] == ["<tool_response>"]
    assert first["messages"][0]["role"] == "system" and "<tool_call>" in first["messages"][0]["content"]
    user = first["messages"][1]
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == [
        "text",
        "image_url",
        "text",
        "text",
    ]
    assert decode(user["content"][1]["image_url"]["url"]).size == agent_image.size
    # the second request carries the tool result, with the tool-made image, as a user message
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == call
    result = second["messages"][3]["content"]
    texts = "".join(p["text"] for p in result if p["type"] == "text")
    assert texts.startswith("<tool_response>\nfound tree") and texts.endswith("</tool_response>")
    made = [decode(p["image_url"]["url"]) for p in result if p["type"] == "image_url"]
    assert len(made) == 1 and made[0].tobytes() == bot.image("img_1").tobytes()


def test_non_streaming_server_and_errors():
    with ChatServer(["plain answer"], stream=False) as server:
        controller = OpenAIController(server.url, model="m")
        assert controller.generate([{"role": "user", "content": "hi"}]) == "plain answer"
    with ChatServer([], status=503) as server, pytest.raises(ControllerError, match="HTTP 503.*not loaded"):
        OpenAIController(server.url, model="m").generate([{"role": "user", "content": "hi"}])
    with pytest.raises(ControllerError, match="cannot reach"):
        OpenAIController("http://127.0.0.1:9/v1", model="m", timeout=2).generate(
            [{"role": "user", "content": "x"}]
        )


def test_message_conversion_checks_images(agent_image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ValueError, match="more image parts"):
        to_openai_messages(messages, [])
    with pytest.raises(ValueError, match="beyond the image parts"):
        to_openai_messages(messages, [agent_image, agent_image])
    with pytest.raises(ValueError, match="local controller"):
        OpenAIController("http://127.0.0.1:9", model="m").request_body(
            messages, [agent_image], logits_processor=[object()]
        )
