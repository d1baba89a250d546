"""Sessions: every step on disk as it happens; a process killed mid-turn resumes with nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_image

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.controllers import ScriptedController
from toolvlm.agent.session import SessionStore, load_session
from toolvlm.agent.trajectory import AssistantStep, ToolStep, Trajectory, UserStep, step_to_dict

TESTS = Path(__file__).parent

KILLED_RUN = """
import json, os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import FakeCounter, FakeGrounding, make_image
from toolvlm.agent.assistant import Assistant
from toolvlm.agent.controllers import ScriptedController

class Killer(FakeCounter):
    def forward(self, image, phrase):
        os.kill(os.getpid(), signal.SIGKILL)  # the process dies mid-turn, as on a crash or kill -9

def call(name, **arguments):
    return "<tool_call>" + json.dumps({{"name": name, "arguments": arguments}}) + "</tool_call>"

controller = ScriptedController([
    "Sure. " + call("grounding", image="img_0", phrase="tree"),
    "Done.",
    call("grounding", image="img_1", phrase="person") + call("counter", image="img_2", phrase="person"),
])
bot = Assistant(controller, [FakeGrounding(), Killer()], session={session!r})
bot.chat("box the tree", images=[make_image()])
bot.chat("now box and count the people in img_1")
print("not reached")
"""


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_session_killed_mid_turn_resumes_with_every_step(tmp_path, agent_tools):
    session = tmp_path / "session"
    script = KILLED_RUN.format(tests=str(TESTS), session=str(session))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -9, done.stderr
    assert "not reached" not in done.stdout

    lines = (session / "trajectory.jsonl").read_text().splitlines()
    before = [json.loads(line) for line in lines]
    assert [s["kind"] for s in before] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
        "assistant",
        "tool",
    ]
    assert sorted(p.name for p in (session / "images").glob("*.png")) == [
        "img_0.png",
        "img_1.png",
        "img_2.png",
    ]

    controller = ScriptedController(["About 8 people in img_2."])
    bot = Assistant(controller, agent_tools, session=session)
    assert [step_to_dict(s) for s in bot.trajectory] == before  # every earlier step intact
    assert bot.handles == ["img_0", "img_1", "img_2"]
    assert bot.image("img_1").size == (64, 48)
    assert [c.name for c in bot.trajectory.pending_calls()] == ["counter"]

    reply = bot.resume()
    assert reply is not None and reply.text == "About 8 people in img_2."
    after = [json.loads(line) for line in (session / "trajectory.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before
    assert [s["kind"] for s in after[len(before) :]] == ["tool", "assistant"]
    assert after[len(before)]["content"] == "about 8 person"
    # the resumed controller saw the whole conversation, all three images included
    assert len(controller.calls[0].images) == 3
    assert bot.resume() is None


def test_trajectory_round_trip_and_messages(tmp_path, agent_tools, agent_image):
    controller = ScriptedController([call("grounding", image="img_0", phrase="tree"), "Here."])
    bot = Assistant(controller, agent_tools, session=tmp_path / "s")
    bot.chat("box it", images=[agent_image])
    data = bot.trajectory.to_dict()
    again = Trajectory.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert again.to_messages("sys") == bot.trajectory.to_messages("sys")
    messages = again.to_messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert again.image_handles() == ["img_0", "img_1"]
    assert isinstance(again.steps[0], UserStep) and isinstance(again.steps[2], ToolStep)
    assert isinstance(again.steps[1], AssistantStep) and again.steps[1].calls[0].name == "grounding"
    assert ToolStep.from_dict(again.steps[2].to_dict()) == again.steps[2]
    messages, images = again.to_example(bot.agent.memory, system="sys")
    assert messages == again.to_messages("sys") and images == [bot.image("img_0"), bot.image("img_1")]
    with pytest.raises(ValueError, match="not a UserStep"):
        UserStep.from_dict(again.steps[2].to_dict())
    with pytest.raises(FileNotFoundError, match="not a toolvlm session"):
        load_session(tmp_path / "nothing")


def test_torn_last_line_is_dropped(tmp_path, agent_image):
    store = SessionStore(tmp_path / "s")
    store.save_image("img_0", agent_image, "user")
    store.append(UserStep("hi", ["img_0"]))
    with store.steps_path.open("a") as f:
        f.write('{"kind": "assistant", "text": "hal')  # a crash mid-write
    trajectory, memory = SessionStore(tmp_path / "s").load()
    assert len(trajectory) == 1 and memory.handles == ["img_0"]


def test_reset_archives_the_conversation(tmp_path, agent_tools, agent_image):
    controller = ScriptedController(["one", "two"])
    bot = Assistant(controller, agent_tools, session=tmp_path / "s")
    bot.chat("first", images=[agent_image])
    bot.reset()
    bot.chat("second", images=[make_image(16, 16)])
    assert bot.handles == ["img_0"]
    assert (tmp_path / "s" / "archive" / "0" / "images" / "img_0.png").is_file()
    trajectory, memory = load_session(tmp_path / "s")
    assert [s.text for s in trajectory if isinstance(s, UserStep)] == ["second"]
    assert memory.get("img_0").size == (16, 16)
