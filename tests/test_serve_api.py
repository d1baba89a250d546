"""`toolvlm serve` over real HTTP on loopback: the OpenAI-compatible endpoint through the official openai
client, the page's JSON/SSE API, the limits (4xx with messages), the bounded queue (429), one writer per session
(409), the per-turn deadline, failures reported and sessions left whole. Fake tools, rule-based controllers."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import FakeCounter, FakeGrounding, make_image
from PIL import Image

from toolvlm.agent.session import load_session
from toolvlm.agent.trajectory import EndStep, ToolStep, UserStep
from toolvlm.serve.app import create_app
from toolvlm.serve.background import BackgroundServer
from toolvlm.serve.config import ServeConfig
from toolvlm.serve.sessions import SharedModels
from toolvlm.serve.workflow import WorkflowController


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def user(text: str, *images: Image.Image) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class GatedController:
    """Replies 'ok' once `gate` is set (to hold a worker busy); thread-unsafe like a real model."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Event()

    def stream(self, messages, images=None, **options):
        self.started.set()
        assert self.gate.wait(20), "the test never opened the gate"
        yield "ok"


class SlowController:
    """Streams a long reply slowly (for the per-turn deadline)."""

    def stream(self, messages, images=None, **options):
        for _ in range(100):
            time.sleep(0.05)
            yield "word "


class FailingController:
    def stream(self, messages, images=None, **options):
        yield "half a reply "
        raise RuntimeError("controller crashed")


def serve(tmp_path, controller=None, **options):
    """A server over fake tools (the workflow controller by default) on a free loopback port."""
    config = ServeConfig(sessions=str(tmp_path / "sessions"), **options)
    models = SharedModels.wrap(controller or WorkflowController(), [FakeCounter(), FakeGrounding()])
    return BackgroundServer(create_app(config, models))


def client(srv: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="not-needed", max_retries=0, timeout=30)


def test_openai_client_answers_with_tool_steps_and_served_images(tmp_path):
    image = make_image(64, 48)
    with serve(tmp_path) as srv:
        api = client(srv)
        assert [m.id for m in api.models.list()] == ["toolvlm"]
        reply = api.chat.completions.create(
            model="toolvlm", messages=[user("Generate a bounding box around the tree.", image)]
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "stop"
        assert message.content.startswith("Done: found tree at [2, 2, 32, 24]")
        steps = message.model_extra["toolvlm_steps"]
        assert [s["tool"] for s in steps] == ["grounding"]
        assert steps[0]["artifact"] == {"boxes": [[2, 2, 32, 24]]}
        made = message.model_extra["toolvlm_images"]
        assert [m["handle"] for m in made] == ["img_1"] and made[0]["url"] in message.content
        served = Image.open(io.BytesIO(httpx.get(made[0]["url"]).content))
        assert served.size == image.size and served.getpixel((2, 10)) == (255, 0, 0)  # the box's left edge
        # the session continues by id: the counter runs on the image the first request brought
        session = reply.model_extra["toolvlm_session"]
        again = api.chat.completions.create(
            model="toolvlm",
            messages=[{"role": "user", "content": "How many people are there?"}],
            extra_body={"toolvlm_session": session},
        )
        assert again.choices[0].message.content == "Done: about 8 person"  # 64 px wide / 8
    trajectory, memory = load_session(tmp_path / "sessions" / session)
    assert [s.text for s in trajectory if isinstance(s, UserStep)] == [
        "Generate a bounding box around the tree.",
        "How many people are there?",
    ]
    assert memory.handles == ["img_0", "img_1"]


def test_openai_client_streams_chunks_until_done(tmp_path):
    with serve(tmp_path) as srv:
        stream = client(srv).chat.completions.create(
            model="toolvlm", messages=[user("Where is the tree?", make_image(80, 40))], stream=True
        )
        chunks = list(stream)  # the client stops at data: [DONE]; a missing one would hang or raise
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    steps = [s for c in chunks for s in (c.choices[0].delta.model_extra or {}).get("toolvlm_steps", [])]
    assert [s["tool"] for s in steps] == ["grounding"] and steps[0]["artifact"]["boxes"] == [[2, 2, 40, 20]]
    assert "Done: found tree at [2, 2, 40, 20]" in text and "![img_1](http://127.0.0.1:" in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].delta.model_extra["toolvlm_images"][0]["handle"] == "img_1"
    assert len({c.id for c in chunks}) == 1


def test_openai_history_is_replayed_into_a_new_session(tmp_path):
    messages = [
        {"role": "system", "content": "You are helpful."},
        user("What do you see?", make_image(96, 32)),
        {"role": "assistant", "content": "A green field."},
        {"role": "user", "content": "Count the people."},
    ]
    with serve(tmp_path) as srv:
        reply = client(srv).chat.completions.create(model="toolvlm", messages=messages)
    assert reply.choices[0].message.content == "Done: about 12 person"  # counted on the replayed image
    trajectory, memory = load_session(tmp_path / "sessions" / reply.model_extra["toolvlm_session"])
    assert [type(s).__name__ for s in trajectory][:3] == ["UserStep", "AssistantStep", "UserStep"]
    assert memory.get("img_0").size == (96, 32)


def test_limits_answer_4xx_with_messages(tmp_path):
    with serve(tmp_path, max_question_chars=50, max_image_pixels=64 * 64, max_body_bytes=200_000) as srv:
        api = client(srv)
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(model="toolvlm", messages=[user("x" * 51, make_image())])
        assert err.value.status_code == 413 and "51 characters; the limit is 50" in str(err.value)
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(model="toolvlm", messages=[user("count", make_image(65, 64))])
        assert err.value.status_code == 413 and "65x64 = 4160 pixels; the limit is 4096" in str(err.value)
        noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # ~12 KB as PNG
        big = [{"type": "image_url", "image_url": {"url": data_url(noise)}}] * 20
        with pytest.raises(openai.APIStatusError) as err:
            api.chat.completions.create(model="toolvlm", messages=[{"role": "user", "content": big}])
        assert err.value.status_code == 413 and "the limit is 200000 bytes" in str(err.value)
        with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
            api.chat.completions.create(model="gpt-4o", messages=[user("hi")])
        remote = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
        with pytest.raises(openai.BadRequestError, match="fetches nothing from the network"):
            api.chat.completions.create(model="toolvlm", messages=[{"role": "user", "content": remote}])
        bad = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
        with pytest.raises(openai.BadRequestError, match="not an image the server can read"):
            api.chat.completions.create(model="toolvlm", messages=[{"role": "user", "content": bad}])
        # the page's upload route has the same limits
        sid = httpx.post(srv.url + "/api/sessions").json()["id"]
        files = [("images", ("big.png", png(make_image(100, 100)), "image/png"))]
        r = httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "count"}, files=files)
        assert r.status_code == 413 and r.json()["error"]["type"] == "image_too_large"
        r = httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "  "})
        assert r.status_code == 400 and r.json()["error"]["type"] == "empty_question"
        r = httpx.post(f"{srv.url}/api/sessions/nope/turns", data={"question": "hi"})
        assert r.status_code == 404 and "no session 'nope'" in r.json()["error"]["message"]


def test_full_queue_answers_429_and_a_busy_session_409(tmp_path):
    gated = GatedController()
    with serve(tmp_path, gated, workers=1, queue=0) as srv:
        api = client(srv)
        sid = httpx.post(srv.url + "/api/sessions").json()["id"]
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                api.chat.completions.create,
                model="toolvlm",
                messages=[user("hold")],
                extra_body={"toolvlm_session": sid},
            )
            assert gated.started.wait(10)
            r = httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "again"})
            assert r.status_code == 409 and "answering another turn" in r.json()["error"]["message"]
            with pytest.raises(openai.RateLimitError, match="the server is busy") as err:
                api.chat.completions.create(model="toolvlm", messages=[user("another session")])
            assert err.value.response.headers["retry-after"] == "5"
            gated.gate.set()
            assert first.result(timeout=20).choices[0].message.content == "ok"
        assert api.chat.completions.create(model="toolvlm", messages=[user("now")]).choices[0].message.content


def test_a_turn_past_its_deadline_is_cancelled_and_the_session_stays_whole(tmp_path):
    with serve(tmp_path, SlowController(), turn_timeout_s=0.5) as srv:
        sid = httpx.post(srv.url + "/api/sessions").json()["id"]
        r = httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "talk"}, timeout=30)
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and events[-1]["kind"] == "timeout"
        assert "ran past 0.5 s" in events[-1]["message"]
        with pytest.raises(openai.APIStatusError) as err:
            client(srv).chat.completions.create(
                model="toolvlm", messages=[user("talk")], extra_body={"toolvlm_session": sid}
            )
        assert err.value.status_code == 504
    trajectory, _ = load_session(tmp_path / "sessions" / sid)
    assert trajectory.turn_finished() and sum(isinstance(s, UserStep) for s in trajectory) == 2
    assert trajectory.steps[-1].cancelled  # the reply cut short is kept, marked cancelled


def test_a_failing_turn_is_reported_and_closed(tmp_path):
    with serve(tmp_path, FailingController()) as srv:
        api = client(srv)
        with pytest.raises(
            openai.InternalServerError, match="the turn failed: RuntimeError: controller crashed"
        ):
            api.chat.completions.create(model="toolvlm", messages=[user("hi")])
        with pytest.raises(openai.APIError, match="controller crashed"):
            list(api.chat.completions.create(model="toolvlm", messages=[user("hi")], stream=True))
        sessions = httpx.get(srv.url + "/api/sessions").json()["sessions"]
    assert len(sessions) == 2
    for s in sessions:
        trajectory, _ = load_session(tmp_path / "sessions" / s["id"])
        assert isinstance(trajectory.steps[-1], EndStep) and trajectory.steps[-1].finish == "error"


def test_page_api_streams_events_and_lists_resumable_sessions(tmp_path):
    with serve(tmp_path, workers=2) as srv:
        assert "<title>toolvlm</title>" in httpx.get(srv.url + "/").text
        assert "sseEvents" in httpx.get(srv.url + "/static/app.js").text
        sid = httpx.post(srv.url + "/api/sessions").json()["id"]
        files = [("images", ("a.png", png(make_image(72, 40)), "image/png"))]
        r = httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "box the tree"}, files=files)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
        kinds = [e["type"] for e in events if e["type"] != "token"]
        assert kinds == ["turn", "tool_call", "tool_result", "answer"]
        assert events[0]["images"] == [{"handle": "img_0", "url": f"/sessions/{sid}/images/img_0.png"}]
        assert events[-1]["images"][0]["handle"] == "img_1"
        httpx.post(f"{srv.url}/api/sessions/{sid}/turns", data={"question": "how many people?"})
        listed = httpx.get(srv.url + "/api/sessions").json()["sessions"]
        assert listed == [
            {
                "id": sid,
                "created": listed[0]["created"],
                "title": "box the tree",
                "turns": 2,
                "images": 2,
                "busy": False,
            }
        ]
        turns = httpx.get(f"{srv.url}/api/sessions/{sid}").json()["turns"]
        assert [t["question"] for t in turns] == ["box the tree", "how many people?"]
        assert turns[1]["steps"][0]["artifact"] == {"count": 9, "phrase": "person"}
        assert turns[1]["answer"] == {"text": "Done: about 9 person", "finish": "answer"}
        assert httpx.get(f"{srv.url}/sessions/{sid}/images/img_7.png").status_code == 404
        assert httpx.get(f"{srv.url}/sessions/..%2Fx/images/img_0.png").status_code in (400, 404)


def test_concurrent_clients_keep_every_session_whole(tmp_path):
    with serve(tmp_path, workers=3, queue=32) as srv:
        api = client(srv)

        def conversation(i: int) -> str:
            first = api.chat.completions.create(
                model="toolvlm", messages=[user("box the tree", make_image(40 + 8 * i, 40))]
            )
            sid = first.model_extra["toolvlm_session"]
            for question in ("how many people?", "where is the dog?"):
                api.chat.completions.create(
                    model="toolvlm",
                    messages=[{"role": "user", "content": question}],
                    extra_body={"toolvlm_session": sid},
                )
            return sid

        with ThreadPoolExecutor(8) as pool:
            sids = list(pool.map(conversation, range(8)))
    for i, sid in enumerate(sids):
        trajectory, memory = load_session(tmp_path / "sessions" / sid)
        tools = [s.name for s in trajectory if isinstance(s, ToolStep)]
        assert tools == ["grounding", "counter", "grounding"] and trajectory.turn_finished()
        assert memory.handles == ["img_0", "img_1", "img_2"] and memory.get("img_0").width == 40 + 8 * i


def test_serve_command_line_options_and_a_bad_profile(capsys):
    from toolvlm.cli import build_parser, main
    from toolvlm.serve.cli import config_from_args

    args = build_parser(["serve"]).parse_args(
        [
            "serve",
            "--port",
            "9123",
            "--workers",
            "3",
            "--queue",
            "0",
            "--max-image-mb",
            "1.5",
            "--turn-timeout",
            "7",
        ]
    )
    config = config_from_args(args)
    assert (config.host, config.port, config.workers, config.queue) == ("127.0.0.1", 9123, 3, 0)
    assert config.max_image_bytes == 1_572_864 and config.turn_timeout_s == 7.0
    assert main(["serve", "--profile", "/nonexistent/profile.yaml"]) == 2
    assert "toolvlm serve:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        ServeConfig.from_dict({"workers": 0})


def test_load_benchmark_reports_whole_sessions():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    out = subprocess.run(
        [sys.executable, str(script), "--clients", "3", "--requests", "3", "--stream-every", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["ok"] == 9 and figures["errors"] == {} and figures["unexplained_5xx"] == 0
    assert figures["sessions"] == figures["session_folders"] == 3
    assert figures["lost_sessions"] == 0 and figures["corrupted_sessions"] == 0
    assert 0 < figures["p50_s"] <= figures["p95_s"]
