"""`toolvlm chat` driven by scripted input (the whole transcript) and `toolvlm ask --json` (the contract)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import BrokenTool, FakeCounter, FakeGrounding, drive, make_image

from toolvlm.agent.assistant import Assistant
from toolvlm.agent.cli_chat import ChatREPL
from toolvlm.agent.controllers import ScriptedController
from toolvlm.cli import main
from toolvlm.tools import registry
from toolvlm.tools.base import Tool, ToolOutput


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


TRANSCRIPT = """\
toolvlm chat - session folder: {S}
type /help for commands, Ctrl-D to leave
> /image {P}
attached {P} as img_0 (64x48); it goes with your next message
> /images
(pending) {P}
> box the tree
Looking.
  -> grounding(image="img_0", phrase="tree")
  <- grounding: found tree at [2, 2, 32, 24]
     img_1: {S}/images/img_1.png
The tree is boxed in img_1.

> /images
img_0  64x48  from user {S}/images/img_0.png
img_1  64x48  from grounding {S}/images/img_1.png
> count the people in img_9
not sent: there is no image img_9 in this conversation; images are: img_0, img_1
> count the people in it
  -> counter(image="img_9", phrase="person")
  !! counter: argument 'image': unknown image 'img_9'; pass an image handle; images are: img_0 (from user), img_1 (from grounding)
Which image?

> ^C

> /trace
[0] user: box the tree [img_0]
[1] assistant: Looking. <tool_call>{{"name": "grounding", "arguments": {{"image": "img_0", "phrase": "tree"}}}}</tool_call>
[2] tool grounding {{"image": "img_0", "phrase": "tree"}} -> ok: found tree at [2, 2, 32, 24] [img_1]
[3] assistant: The tree is boxed in img_1.
[4] user: count the people in it
[5] assistant: <tool_call>{{"name": "counter", "arguments": {{"image": "img_9", "phrase": "person"}}}}</tool_call>
[6] tool counter {{"image": "img_9", "phrase": "person"}} -> error: counter: argument 'image': unknown image 'img_9'; pass an image handle; images are: img_0 (from user), img_1 (from grounding)
[7] assistant: Which image?
> /bogus
unknown command /bogus; commands are: /image, /images, /trace, /save, /reset, /help, /quit
> /save
saved 8 steps to {S}/trajectory.json
> /help
/image PATH      attach an image to your next message
/images          list the images of the session with their handles and files
/trace           show every step of the conversation
/save [PATH]     write the conversation as one JSON file (the session folder is always up to date)
/reset           start a new conversation (the old one moves to the session's archive/)
/help            this list
/quit            leave (Ctrl-D too)
> /reset
new conversation; images start again at img_0
> hi
Hello!

>
"""


def test_chat_repl_transcript(tmp_path):
    picture = tmp_path / "crowd.png"
    make_image().save(picture)
    session = tmp_path / "s"
    controller = ScriptedController(
        [
            "Looking. " + call("grounding", image="img_0", phrase="tree"),
            "The tree is boxed in img_1.",
            call("counter", image="img_9", phrase="person"),
            "Which image?",
            "Hello!",
        ]
    )
    bot = Assistant(controller, [FakeCounter(), FakeGrounding()], session=session)
    lines = [f"/image {picture}", "/images", "box the tree", "/images", "count the people in img_9"]
    lines += ["count the people in it", "^C"]
    lines += ["/trace", "/bogus", "/save", "/help", "/reset", "hi"]
    transcript, code = drive(lambda read, write: ChatREPL(bot, read, write), lines)
    assert code == 0
    # compared line by line without trailing spaces (the prompt is "> ", streamed text may end in a space)
    expected = TRANSCRIPT.format(S=session, P=picture)
    assert [line.rstrip() for line in transcript.splitlines()] == expected.splitlines()
    assert json.loads((session / "trajectory.json").read_text())["steps"][0]["text"] == "box the tree"
    # the conversation after /reset is in the folder; the earlier one in its archive
    assert (session / "archive" / "0" / "images" / "img_1.png").is_file()


def test_chat_ctrl_c_during_generation_keeps_the_session(tmp_path):
    def interrupted(*_args, **_kwargs):
        yield "Thinking about"
        raise KeyboardInterrupt

    controller = ScriptedController(["Hi there."])
    bot = Assistant(controller, [], session=tmp_path / "s")
    real_stream = controller.stream
    streams = iter([interrupted, real_stream])
    controller.stream = lambda *a, **k: next(streams)(*a, **k)
    transcript, code = drive(lambda read, write: ChatREPL(bot, read, write), ["long question", "hello"])
    assert "Thinking about\n[cancelled]\n> hello\nHi there.\n" in transcript
    assert code == 0
    assert [s.kind for s in bot.trajectory] == ["user", "assistant", "user", "assistant"]
    assert bot.trajectory.steps[1].cancelled


@pytest.fixture
def fake_tools_registered():
    """Register the fake tools in the real registry for the CLI (removed afterwards)."""
    made = [
        registry.register(FakeGrounding(), "fake_grounding"),
        registry.register(FakeCounter(), "fake_counter"),
    ]
    yield
    for name in made:
        registry.unregister(name)


def test_ask_json_follows_the_contract(tmp_path, capsys, fake_tools_registered):
    picture = tmp_path / "crowd.png"
    make_image().save(picture)
    profile = {
        "controller": {
            "backend": "scripted",
            "replies": [
                call("fake_grounding", image="img_0", phrase="tree")
                + call("fake_counter", image="img_0", phrase="person"),
                "One tree (boxed in img_1) and about 8 people.",
            ],
        },
        "tools": {"fake_grounding": {}, "fake_counter": {}},
    }
    profile_path = tmp_path / "profile.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    out = tmp_path / "out"
    code = main(
        [
            "ask",
            str(picture),
            "Box the tree and count the people",
            "--json",
            "--session",  # the flag `toolvlm chat` names a session folder with (--out is its old name)
            str(out),
            "--profile",
            str(profile_path),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    data = json.loads(printed[0])
    assert set(data) == {"answer", "steps", "images", "finish"} and data["finish"] == "answer"
    assert data["answer"] == "One tree (boxed in img_1) and about 8 people."
    assert [s["tool"] for s in data["steps"]] == ["fake_grounding", "fake_counter"]
    for step in data["steps"]:
        assert set(step) == {"tool", "arguments", "content", "artifact", "images"}
        assert isinstance(step["arguments"], dict) and isinstance(step["artifact"], dict)
        assert all(Path(p).is_file() for p in step["images"])
    assert data["steps"][0]["artifact"] == {"boxes": [[2, 2, 32, 24]]}
    assert data["steps"][1]["content"] == "about 8 person"
    assert data["images"] == [str(out / "images" / "img_1.png")] and Path(data["images"][0]).is_file()


def test_ask_without_profile_or_bundle_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOOLVLM_BUNDLE", str(tmp_path / "empty_bundle"))
    picture = tmp_path / "p.png"
    make_image().save(picture)
    code = main(["ask", str(picture), "what is this?", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "default bundle is not built" in capsys.readouterr().err


class FixedTool(Tool):
    """The broken tool with its bug fixed: the call a crash interrupted now succeeds."""

    name = "broken"
    description = "Works now."
    inputs = BrokenTool.inputs

    def forward(self, x: int) -> ToolOutput:
        return ToolOutput(content=f"fixed {x}")


def test_chat_resumes_an_interrupted_turn(tmp_path):
    session = tmp_path / "s"
    first = Assistant(ScriptedController([call("broken", x=1)]), [BrokenTool()], session=session)
    with pytest.raises(RuntimeError, match="bug in broken tool"):
        first.chat("break it")
    bot = Assistant(ScriptedController(["All good now."]), [FixedTool()], session=session)
    transcript, code = drive(lambda read, write: ChatREPL(bot, read, write), [])
    assert code == 0
    assert "resumed 2 steps and 0 images\n" in transcript
    assert (
        "finishing the interrupted turn\n  -> broken(x=1)\n  <- broken: fixed 1\nAll good now.\n"
        in transcript
    )


def test_chat_banner_says_what_the_models_know_when_the_profile_checks_the_domain(tmp_path):
    from toolvlm.agent.assistant import DOMAIN_NOTE

    class AlwaysInDomain:
        def check(self, image):
            return type("Verdict", (), {"in_domain": True})()

    plain = Assistant(ScriptedController(["Hi."]), [FakeCounter()], session=tmp_path / "a")
    checked = Assistant(
        ScriptedController(["Hi."]), [FakeCounter()], session=tmp_path / "b", domain=AlwaysInDomain()
    )
    shown = {}
    for name, bot in (("plain", plain), ("checked", checked)):
        transcript, code = drive(lambda read, write, bot=bot: ChatREPL(bot, read, write), ["hello"])
        assert code == 0
        shown[name] = transcript
    assert DOMAIN_NOTE in shown["checked"] and "--profile" in DOMAIN_NOTE
    assert DOMAIN_NOTE not in shown["plain"]


def test_version_flag(capsys):
    from toolvlm import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"toolvlm {__version__}"
