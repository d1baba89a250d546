"""Hostile input against sessions and the `ask`/`chat` commands: torn and corrupt session folders, full disks,
concurrent writers, kill -9 and Ctrl-C mid-turn, bad handles, empty and huge questions, unreadable images and
outputs. Each case asserts a clean message naming the problem, the exit status, no traceback, and nothing lost
on disk. Scripted controllers and tiny fake tools keep it fast; a few cases run real subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import BrokenTool, FakeCounter, FakeGrounding, make_image
from conftest import drive as drive_repl
from PIL import Image

from toolvlm import cli as toolvlm_cli
from toolvlm.agent import session as session_module
from toolvlm.agent.assistant import Assistant
from toolvlm.agent.cli_chat import ChatREPL
from toolvlm.agent.controllers import ScriptedController
from toolvlm.agent.loop import UserInputError
from toolvlm.agent.session import (
    SessionError,
    SessionLockedError,
    SessionStore,
    SessionWriteError,
    load_session,
)
from toolvlm.agent.trajectory import EndStep, ToolStep, UserStep
from toolvlm.cli import main
from toolvlm.tools import registry

pytest_plugins = ["hostile_summary"]

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def lines_of(folder: Path) -> list[dict]:
    """Every line of a session's trajectory, each of which must be whole JSON ending in a newline."""
    raw = (folder / "trajectory.jsonl").read_text()
    assert raw == "" or raw.endswith("\n"), "the trajectory ends in a torn line"
    return [json.loads(line) for line in raw.splitlines()]


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


def drive(bot: Assistant, lines: list[str]) -> tuple[str, int]:
    """Run the REPL on scripted lines; everything it showed, and its exit status."""
    return drive_repl(lambda read, write: ChatREPL(bot, read, write), lines)


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "crowd.png"
    make_image().save(path)
    return path


@pytest.fixture
def fake_registry():
    """The fake tools in the real registry (for profiles), removed afterwards."""
    made = [
        registry.register(FakeGrounding(), "fake_grounding", replace=True),
        registry.register(FakeCounter(), "fake_counter", replace=True),
        registry.register(BrokenTool(), "fake_broken", replace=True),
    ]
    yield
    for name in made:
        registry.unregister(name)


@pytest.fixture
def profile(tmp_path, fake_registry):
    """A profile with a scripted controller and the fake tools: profile(replies) -> its path."""

    def make(replies: list[str], **agent) -> str:
        data = {
            "controller": {"backend": "scripted", "replies": replies},
            "tools": {"fake_grounding": {}, "fake_counter": {}, "fake_broken": {}},
        }
        if agent:
            data["agent"] = agent
        path = tmp_path / f"profile{len(list(tmp_path.glob('profile*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return make


def full_disk_after(monkeypatch, n_writes_ok: int) -> list[int]:
    """Make step writes fail with ENOSPC after `n_writes_ok` good ones, each failure writing half its line."""
    real = session_module._write_all
    done = [0]

    def write(fd: int, data: bytes) -> None:
        if done[0] >= n_writes_ok and len(data) > 1:
            os.write(fd, data[: len(data) // 2])  # a real full disk tears the line mid-write
            raise OSError(errno.ENOSPC, "No space left on device")
        done[0] += 1
        real(fd, data)

    monkeypatch.setattr(session_module, "_write_all", write)
    return done


# -- torn, corrupt and incomplete session folders ----------------------------------------------------------


def test_hostile_torn_line_resumed_twice_keeps_every_step(tmp_path, agent_tools, agent_image):
    folder = tmp_path / "s"
    bot = Assistant(ScriptedController(["one"]), agent_tools, session=folder)
    bot.chat("first", images=[agent_image])
    with (folder / "trajectory.jsonl").open("a") as f:
        f.write('{"kind": "user", "text": "tor')  # a crash mid-write
    for round_ in range(2):  # the second resume used to fail on the fragment the first one appended onto
        again = Assistant(ScriptedController([f"reply {round_}"]), agent_tools, session=folder)
        assert again.chat(f"turn {round_}").text == f"reply {round_}"
        del again
    steps = lines_of(folder)
    assert [s.get("text") for s in steps] == ["first", "one", "turn 0", "reply 0", "turn 1", "reply 1"]
    trajectory, memory = load_session(folder)
    assert len(trajectory) == 6 and memory.handles == ["img_0"]


def test_hostile_whole_last_line_without_newline_is_kept(tmp_path):
    folder = tmp_path / "s"
    store = SessionStore(folder)
    store.append(UserStep("hi"))
    path = folder / "trajectory.jsonl"
    path.write_text(path.read_text() + json.dumps({"kind": "assistant", "text": "hello"}))  # newline lost
    assert [s.text for s in store.load()[0]] == ["hi", "hello"]
    store.append(UserStep("again"))
    assert [s["text"] for s in lines_of(folder)] == ["hi", "hello", "again"]


def test_hostile_full_disk_ends_the_turn_and_never_tears(tmp_path, agent_tools, agent_image, monkeypatch):
    folder = tmp_path / "s"
    controller = ScriptedController([call("grounding", image="img_0", phrase="tree"), "Boxed."])
    bot = Assistant(controller, agent_tools, session=folder)
    full_disk_after(monkeypatch, 2)  # the user step and the reply are written, then the disk is full
    with pytest.raises(SessionWriteError, match="disk is full") as caught:
        bot.chat("box the tree", images=[agent_image])
    assert str(folder / "trajectory.jsonl") in str(caught.value)
    assert [s["kind"] for s in lines_of(folder)] == ["user", "assistant"]  # whole lines only
    assert [s.kind for s in bot.trajectory] == ["user", "assistant"]  # memory and disk agree
    monkeypatch.undo()
    for _ in range(2):  # space again: resumed twice, every complete step kept
        again = Assistant(ScriptedController(["Boxed."]), agent_tools, session=folder)
        again.resume()
        del again
    kinds = [s["kind"] for s in lines_of(folder)]
    assert kinds == ["user", "assistant", "tool", "assistant"]
    assert lines_of(folder)[2]["content"].startswith("found tree")


def test_hostile_full_disk_keeps_handles_in_step_with_the_saved_steps(
    tmp_path, agent_tools, agent_image, monkeypatch
):
    folder = tmp_path / "s"
    controller = ScriptedController([call("grounding", image="img_0", phrase="tree"), "Hi."])
    bot = Assistant(controller, agent_tools, session=folder)
    full_disk_after(monkeypatch, 2)  # the tool's image is written, the step naming it is not
    with pytest.raises(SessionWriteError):
        bot.chat("box the tree", images=[agent_image])
    assert bot.handles == ["img_0"]  # the unsaved step's image is forgotten
    monkeypatch.undo()
    bot.chat("and this one?", images=[make_image(20, 10)])
    trajectory, memory = load_session(folder)  # no "images out of order"
    assert memory.handles == ["img_0", "img_1"] and memory.get("img_1").size == (20, 10)
    assert [s.kind for s in trajectory] == ["user", "assistant", "user", "assistant"]


def test_hostile_full_disk_on_an_image_leaves_no_half_file(tmp_path, agent_tools, agent_image, monkeypatch):
    folder = tmp_path / "s"
    bot = Assistant(ScriptedController(["hi"]), agent_tools, session=folder)

    def no_space(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(SessionWriteError, match="img_0.png: the disk is full"):
        bot.chat("look", images=[agent_image])
    assert list((folder / "images").iterdir()) == [] and len(bot.handles) == 0 and len(bot.trajectory) == 0


def test_hostile_corrupt_middle_line_names_the_file_and_line(tmp_path):
    folder = tmp_path / "s"
    store = SessionStore(folder)
    for text in ("a", "b", "c"):
        store.append(UserStep(text))
    path = folder / "trajectory.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "garbage {"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SessionError, match=rf"{path}:2: not a trajectory step.*new session folder"):
        load_session(folder)


def test_hostile_unknown_step_kind_names_the_line(tmp_path):
    folder = tmp_path / "s"
    SessionStore(folder).append(UserStep("a"))
    with (folder / "trajectory.jsonl").open("a") as f:
        f.write('{"kind": "wizard"}\n{"kind": "user", "text": "b"}\n')
    with pytest.raises(SessionError, match=r"trajectory.jsonl:2: .*unknown step kind 'wizard'"):
        load_session(folder)


def test_hostile_chat_on_a_corrupt_session_exits_2(tmp_path, capsys, profile):
    folder = tmp_path / "s"
    SessionStore(folder).append(UserStep("a"))
    with (folder / "trajectory.jsonl").open("a") as f:
        f.write("not json\n\n")
    code = main(["chat", "--session", str(folder), "--profile", profile(["unused"])])
    err = capsys.readouterr().err
    assert code == 2 and "trajectory.jsonl:2" in err
    no_traceback(err)


def test_hostile_garbage_sources_json_is_rebuilt_and_named(tmp_path, agent_tools, agent_image, caplog):
    folder = tmp_path / "s"
    bot = Assistant(
        ScriptedController([call("grounding", image="img_0", phrase="x"), "ok"]), agent_tools, session=folder
    )
    bot.chat("box", images=[agent_image])
    del bot
    sources = folder / "images" / "sources.json"
    sources.write_text("\x00\x01 not json")
    again = Assistant(ScriptedController([]), agent_tools, session=folder)
    assert str(sources) in caplog.text
    assert [r.source for r in again.agent.memory.records] == ["user", "grounding"]


def test_hostile_deleted_image_is_a_clear_error(tmp_path, capsys, agent_image, profile):
    folder = tmp_path / "s"
    bot = Assistant(ScriptedController(["hi"]), [], session=folder)
    bot.chat("look", images=[agent_image])
    del bot
    (folder / "images" / "img_0.png").unlink()
    with pytest.raises(SessionError, match=r"image img_0 is missing .*img_0.png"):
        load_session(folder)
    code = main(["chat", "--session", str(folder), "--profile", profile(["unused"])])
    err = capsys.readouterr().err
    assert code == 2 and "img_0.png" in err
    no_traceback(err)


def test_hostile_unreadable_session_image_is_a_clear_error(tmp_path, agent_image):
    folder = tmp_path / "s"
    bot = Assistant(ScriptedController(["hi"]), [], session=folder)
    bot.chat("look", images=[agent_image])
    del bot
    (folder / "images" / "img_0.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(SessionError, match=r"image img_0 cannot be read"):
        load_session(folder)


# -- one writer per session folder -------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from toolvlm.agent.session import SessionStore
from toolvlm.agent.trajectory import UserStep
store = SessionStore({folder!r})
store.append(UserStep("held"))
Path({ready!r}).write_text("locked")
time.sleep(60)
"""


def hold_lock(tmp_path: Path, folder: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    script = HOLDER.format(folder=str(folder), ready=str(ready))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    for _ in range(300):
        if ready.exists() or holder.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), "the holder never took the lock"
    return holder


def test_hostile_concurrent_writer_is_refused_until_the_first_dies(tmp_path, capsys, profile):
    folder = tmp_path / "s"
    holder = hold_lock(tmp_path, folder)
    try:
        with pytest.raises(
            SessionLockedError, match=rf"in use by another toolvlm process \(pid {holder.pid}\)"
        ):
            SessionStore(folder)
        code = main(["chat", "--session", str(folder), "--profile", profile(["unused"])])
        err = capsys.readouterr().err
        assert code == 2 and "in use by another toolvlm process" in err
        no_traceback(err)
        assert len(load_session(folder)[0]) == 1  # reading is never locked out
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops its lock
        holder.wait(timeout=30)
    store = SessionStore(folder)
    store.append(UserStep("mine now"))
    assert [s["text"] for s in lines_of(folder)] == ["held", "mine now"]


def test_hostile_ask_on_a_locked_session_runs_nothing(tmp_path, capsys, picture, profile):
    folder = tmp_path / "s"
    holder = hold_lock(tmp_path, folder)
    try:
        code = main(["ask", str(picture), "what?", "--out", str(folder), "--profile", profile(["never"])])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    err = capsys.readouterr().err
    assert code == 2 and "in use" in err and [s["text"] for s in lines_of(folder)] == ["held"]
    no_traceback(err)


def test_hostile_stores_of_one_process_share_the_lock(tmp_path):
    first = SessionStore(tmp_path / "s")
    second = SessionStore(tmp_path / "s")  # one process: an Assistant rebuilt on its own folder
    first.append(UserStep("a"))
    second.append(UserStep("b"))
    first.close()
    second.close()
    assert [s["text"] for s in lines_of(tmp_path / "s")] == ["a", "b"]


# -- kill -9 and Ctrl-C mid-turn (real processes) ------------------------------------------------------------

SLOW_ASK = """
import json, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import FakeGrounding
from toolvlm.tools import registry
from toolvlm.tools.base import ToolOutput

class Slow(FakeGrounding):
    def forward(self, image, phrase):
        Path({ready!r}).write_text("running")
        time.sleep(60)
        return ToolOutput(content="never")

registry.register(FakeGrounding(), "fake_grounding")
registry.register(Slow(), "fake_slow")
from toolvlm.cli import main
sys.exit(main({argv!r}))
"""


def run_slow_ask(
    tmp_path: Path, picture: Path, sig: int, command: str = "ask", lines: str = ""
) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `toolvlm ask` (or `chat`, fed `lines`) in a real process and send it `sig` inside a slow tool."""
    folder, ready = tmp_path / "out", tmp_path / "ready"
    replies = [
        call("fake_grounding", image="img_0", phrase="tree") + call("fake_slow", image="img_1", phrase="x")
    ]
    prof = tmp_path / "slow.yaml"
    prof.write_text(
        yaml.safe_dump(
            {
                "controller": {"backend": "scripted", "replies": replies},
                "tools": {"fake_grounding": {}, "fake_slow": {}},
            }
        )
    )
    argv = ["ask", str(picture), "box it", "--json", "--out", str(folder), "--profile", str(prof)]
    if command == "chat":
        argv = ["chat", "--image", str(picture), "--session", str(folder), "--profile", str(prof)]
    script = SLOW_ASK.format(tests=str(TESTS), ready=str(ready), argv=argv)
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write(lines)  # the REPL reads them one by one; the pipe keeps them after it is closed
    proc.stdin.close()
    proc.stdin = None
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), folder


def test_hostile_ctrl_c_mid_turn_in_chat_cancels_only_the_turn(tmp_path, picture):
    done, folder = run_slow_ask(tmp_path, picture, signal.SIGINT, "chat", "box it\n/trace\n")
    assert done.returncode == 0, done.stderr
    no_traceback(done.stderr + done.stdout)
    assert "[cancelled]" in done.stdout and "end (cancelled): cancelled by the user" in done.stdout
    assert [s["kind"] for s in lines_of(folder)] == ["user", "assistant", "tool", "end"]


def test_hostile_ctrl_c_mid_turn_cancels_cleanly(tmp_path, picture):
    done, folder = run_slow_ask(tmp_path, picture, signal.SIGINT)
    assert done.returncode == 130, done.stderr
    no_traceback(done.stderr)
    assert "cancelled; every step before it is saved in" in done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["finish"] == "cancelled" and [s["tool"] for s in data["steps"]] == ["fake_grounding"]
    assert all(Path(p).is_file() for p in data["steps"][0]["images"])
    steps = lines_of(folder)
    assert [s["kind"] for s in steps] == ["user", "assistant", "tool", "end"]
    assert steps[-1]["finish"] == "cancelled"
    trajectory, memory = load_session(folder)
    assert memory.handles == ["img_0", "img_1"] and trajectory.turn_finished()


def test_hostile_kill_9_mid_turn_loses_nothing_and_resumes_twice(tmp_path, picture, agent_tools):
    done, folder = run_slow_ask(tmp_path, picture, signal.SIGKILL)
    assert done.returncode == -9
    before = lines_of(folder)
    assert [s["kind"] for s in before] == ["user", "assistant", "tool"]
    tools = {"fake_grounding": FakeGrounding(), "fake_slow": FakeGrounding()}
    for _ in range(2):
        bot = Assistant(ScriptedController(["Done."]), tools, session=folder)
        bot.resume()
        assert bot.handles[:2] == ["img_0", "img_1"]
        del bot
    after = lines_of(folder)
    assert after[: len(before)] == before
    assert [s["kind"] for s in after[len(before) :]] == ["tool", "assistant"]


# -- image handles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("handle", ["img_999", "img_00", "img_0\n", " img_0", "IMG_0", "img_-1", "img_1"])
def test_hostile_bad_handle_is_an_observation_not_img_0(handle, agent_tools, agent_image):
    controller = ScriptedController([call("counter", image=handle, phrase="person"), "Which image?"])
    bot = Assistant(controller, agent_tools)
    reply = bot.chat("count the people", images=[agent_image])
    result = next(s for s in reply.steps if isinstance(s, ToolStep))
    assert (
        result.error
        and f"unknown image {handle!r}" in result.content
        and "img_0 (from user)" in result.content
    )
    assert agent_tools["counter"].seen == []  # never ran, on img_0 or anything else
    assert reply.text == "Which image?"


def test_hostile_user_names_a_missing_image(agent_tools, agent_image):
    controller = ScriptedController(["never"])
    bot = Assistant(controller, agent_tools)
    with pytest.raises(
        UserInputError, match="there is no image img_7 in this conversation; images are: img_0"
    ):
        bot.chat("count the people in img_7", images=[agent_image])
    assert controller.calls == [] and len(bot.trajectory) == 0 and bot.handles == []


def test_hostile_ask_naming_a_missing_image_exits_2(tmp_path, capsys, picture, profile):
    out = tmp_path / "out"
    code = main(["ask", str(picture), "what is in img_3?", "--out", str(out), "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and "no image img_3" in err and not (out / "trajectory.jsonl").exists()


def test_hostile_the_image_is_the_latest_one_attached(agent_tools):
    first, second = make_image(64, 48), make_image(96, 40)
    controller = ScriptedController(
        ["A field.", call("counter", image="img_0", phrase="person"), "About 12 people."]
    )
    bot = Assistant(controller, agent_tools)
    bot.chat("describe the image", images=[first])
    reply = bot.chat("count the people in the image", images=[second])
    counter = agent_tools["counter"]
    assert counter.seen == [bot.image("img_1")]  # the latest image, not img_0
    result = next(s for s in reply.steps if isinstance(s, ToolStep))
    assert result.arguments["image"] == "img_1" and result.content == "about 12 person"


def test_hostile_a_named_handle_is_kept(agent_tools):
    controller = ScriptedController(["ok", call("counter", image="img_0", phrase="person"), "8."])
    bot = Assistant(controller, agent_tools)
    bot.chat("hi", images=[make_image(64, 48)])
    bot.chat("count the people in img_0 again", images=[make_image(96, 40)])
    assert agent_tools["counter"].seen == [bot.image("img_0")]


def test_hostile_tool_made_images_are_not_moved(agent_tools):
    controller = ScriptedController(
        [
            call("grounding", image="img_0", phrase="tree"),
            "Boxed.",
            call("counter", image="img_1", phrase="person"),
            "8.",
        ]
    )
    bot = Assistant(controller, agent_tools)
    bot.chat("box the tree", images=[make_image()])
    bot.chat("count the people in the boxed picture")
    assert agent_tools["counter"].seen == [bot.image("img_1")]


# -- questions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["", "   \n\t"])
def test_hostile_empty_question_runs_nothing(question, tmp_path, capsys, picture, profile):
    out = tmp_path / "out"
    code = main(["ask", str(picture), question, "--json", "--out", str(out), "--profile", profile(["x"])])
    captured = capsys.readouterr()
    assert code == 2 and "the question is empty" in captured.err and captured.out == ""
    assert not (out / "trajectory.jsonl").exists()


def test_hostile_huge_question_is_refused_fast(tmp_path, capsys, picture, profile):
    out = tmp_path / "out"
    start = time.monotonic()
    code = main(["ask", str(picture), "why " * 25_000, "--out", str(out), "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and "100,000 characters long; the limit is 8,000" in err
    assert time.monotonic() - start < 10 and not (out / "trajectory.jsonl").exists()


def test_hostile_question_cap_follows_the_profile(tmp_path, capsys, picture, profile):
    code = main(
        [
            "ask",
            str(picture),
            "x" * 50,
            "--out",
            str(tmp_path / "o"),
            "--profile",
            profile(["x"], max_question_chars=20),
        ]
    )
    assert code == 2 and "the limit is 20" in capsys.readouterr().err


def test_hostile_empty_question_in_the_api(agent_tools, agent_image):
    controller = ScriptedController(["never"])
    bot = Assistant(controller, agent_tools)
    with pytest.raises(UserInputError, match="the question is empty"):
        bot.chat("", images=[agent_image])
    assert controller.calls == [] and bot.handles == []


# -- image files -------------------------------------------------------------------------------------------


def bad_image(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A hostile image argument and the words its message must contain."""
    if kind == "zero_bytes":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
        return path, "empty (0 bytes)"
    if kind == "folder":
        path = tmp_path / "a_folder.png"
        path.mkdir()
        return path, "is a folder"
    if kind == "text":
        path = tmp_path / "notes.png"
        path.write_text("not an image at all")
        return path, "cannot read"
    if kind == "truncated":
        path = tmp_path / "cut.png"
        make_image(200, 200).save(path)
        path.write_bytes(path.read_bytes()[:80])
        return path, str(path)
    path = tmp_path / "missing.png"
    return path, "not found"


@pytest.mark.parametrize("kind", ["zero_bytes", "folder", "text", "truncated", "missing"])
def test_hostile_ask_on_a_bad_image_file(kind, tmp_path, capsys, profile):
    path, words = bad_image(tmp_path, kind)
    out = tmp_path / "out"
    code = main(["ask", str(path), "what is this?", "--out", str(out), "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and words in err and str(path.name) in err, err
    no_traceback(err)
    assert not (out / "trajectory.jsonl").exists()


@pytest.mark.parametrize("kind", ["zero_bytes", "folder", "text", "missing"])
def test_hostile_repl_image_command_reports_and_goes_on(kind, tmp_path):
    path, words = bad_image(tmp_path, kind)
    bot = Assistant(ScriptedController(["Hello."]), [], session=tmp_path / "s")
    transcript, code = drive(bot, [f"/image {path}", "hi"])
    assert code == 0 and "cannot attach: " in transcript and words in transcript
    assert "Hello." in transcript and bot.trajectory.steps[0].images == []


def test_hostile_repl_image_decompression_bomb(tmp_path, picture, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x48 image stands in for a 20000x20000 one
    bot = Assistant(ScriptedController(["Hello."]), [], session=tmp_path / "s")
    transcript, code = drive(bot, [f"/image {picture}", "hi"])
    assert code == 0 and "cannot attach:" in transcript and "too large" in transcript
    assert "Hello." in transcript


# -- output folders ----------------------------------------------------------------------------------------


def test_hostile_out_is_an_existing_file(tmp_path, capsys, picture, profile):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    code = main(["ask", str(picture), "what?", "--out", str(target), "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and f"{target} is a file, not a folder" in err and target.read_text() == "keep me"


def test_hostile_out_below_a_file(tmp_path, capsys, picture, profile):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    code = main(["ask", str(picture), "what?", "--out", str(target / "sub"), "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err


def test_hostile_out_unwritable(capsys, picture, profile):
    code = main(["ask", str(picture), "what?", "--out", "/proc/nope/session", "--profile", profile(["x"])])
    err = capsys.readouterr().err
    assert code == 2 and "/proc/nope/session" in err
    no_traceback(err)


def test_hostile_chat_session_is_a_file(tmp_path, capsys, profile):
    target = tmp_path / "file"
    target.write_text("x")
    code = main(["chat", "--session", str(target), "--profile", profile(["x"])])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err


# -- the REPL goes on after every failing command or turn --------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "/proc/nope.json", "/proc/nope/deeper/t.json"])
def test_hostile_repl_save_failures(where, tmp_path):
    target = str(tmp_path) if where == "folder" else where
    bot = Assistant(ScriptedController(["Hello."]), [], session=tmp_path / "s")
    transcript, code = drive(bot, [f"/save {target}", "hi", f"/save {tmp_path / 'ok.json'}"])
    assert code == 0 and "cannot save" in transcript and target in transcript
    assert "Hello." in transcript and json.loads((tmp_path / "ok.json").read_text())["steps"]


def test_hostile_repl_tool_bug_stops_only_the_turn(tmp_path, agent_tools):
    controller = ScriptedController([call("broken", x=1), "Hello."])
    bot = Assistant(controller, agent_tools, session=tmp_path / "s")
    transcript, code = drive(bot, ["break it", "hi"])
    assert code == 0 and "[stopped by an error: RuntimeError: bug in broken tool (x=1)" in transcript
    assert "Hello." in transcript
    no_traceback(transcript)


def test_hostile_repl_full_disk_stops_only_the_turn(tmp_path, agent_tools, monkeypatch):
    bot = Assistant(ScriptedController(["Hello.", "Again."]), agent_tools, session=tmp_path / "s")
    full_disk_after(monkeypatch, 1)
    transcript, code = drive(bot, ["hi", "/trace"])
    assert code == 0 and "[stopped: cannot save the step" in transcript and "disk is full" in transcript
    assert [s["kind"] for s in lines_of(tmp_path / "s")] == ["user"]


def test_hostile_repl_failing_reset_reports(tmp_path, monkeypatch):
    bot = Assistant(ScriptedController(["Hello."]), [], session=tmp_path / "s")

    def broken_archive():
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(bot.agent.session, "archive", broken_archive)
    transcript, code = drive(bot, ["/reset", "hi"])
    assert (
        code == 0 and "/reset failed: [Errno 13] Permission denied" in transcript and "Hello." in transcript
    )


def test_hostile_refused_question_keeps_attached_images(tmp_path, picture):
    bot = Assistant(ScriptedController(["A field."]), [], session=tmp_path / "s")
    transcript, code = drive(bot, [f"/image {picture}", "what is in img_5?", "what is it?"])
    assert "not sent: there is no image img_5 in this conversation; images are: img_0" in transcript
    assert bot.trajectory.steps[0].images == ["img_0"] and "A field." in transcript


# -- ask --json: finish and exit status --------------------------------------------------------------------


def ask_json(capsys, picture: Path, out: Path, prof: str, *extra: str) -> tuple[int, dict, str]:
    code = main(["ask", str(picture), "box the tree", "--json", "--out", str(out), "--profile", prof, *extra])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    return code, json.loads(lines[0]), captured.err


def test_hostile_ask_step_limit_reports_finish(tmp_path, capsys, picture, profile):
    replies = [call("fake_counter", image="img_0", phrase="tree")] * 3
    code, data, _ = ask_json(capsys, picture, tmp_path / "o", profile(replies), "--max-steps", "2")
    assert code == 1 and data["finish"] == "step_limit" and "stopped after 2 replies" in data["answer"]
    assert [s["tool"] for s in data["steps"]] == ["fake_counter", "fake_counter"]


def test_hostile_ask_retries_reports_finish(tmp_path, capsys, picture, profile):
    replies = [call("nope", x=1)] * 4
    code, data, _ = ask_json(capsys, picture, tmp_path / "o", profile(replies))
    assert code == 1 and data["finish"] == "retries"
    assert all("unknown tool 'nope'" in s["content"] for s in data["steps"])


def test_hostile_ask_tool_bug_reports_error(tmp_path, capsys, picture, profile):
    replies = [call("fake_grounding", image="img_0", phrase="tree") + call("fake_broken", x=2)]
    out = tmp_path / "o"
    code, data, err = ask_json(capsys, picture, out, profile(replies))
    assert code == 3 and data["finish"] == "error" and "bug in broken tool (x=2)" in data["error"]
    assert [s["tool"] for s in data["steps"]] == ["fake_grounding"] and Path(data["images"][0]).is_file()
    assert f"every step before it is saved in {out}" in err
    no_traceback(err)
    assert [s["kind"] for s in lines_of(out)] == ["user", "assistant", "tool"]


def test_hostile_ask_full_disk_reports_error(tmp_path, capsys, picture, profile, monkeypatch):
    full_disk_after(monkeypatch, 2)
    out = tmp_path / "o"
    code, data, err = ask_json(
        capsys, picture, out, profile([call("fake_counter", image="img_0", phrase="p")])
    )
    assert code == 3 and data["finish"] == "error" and "disk is full" in data["error"]
    assert [s["kind"] for s in lines_of(out)] == ["user", "assistant"]
    no_traceback(err)


def test_hostile_ask_answer_exit_0_with_finish(tmp_path, capsys, picture, profile):
    code, data, _ = ask_json(capsys, picture, tmp_path / "o", profile(["A tree."]))
    assert code == 0 and data == {"answer": "A tree.", "steps": [], "images": [], "finish": "answer"}


# -- the top-level command line ----------------------------------------------------------------------------


def test_hostile_unknown_option_exits_2_without_raising(capsys):
    assert main(["ask", "--bogus-option"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "required" in err


def test_hostile_ask_without_a_question(tmp_path, capsys, picture):
    assert main(["ask", str(picture)]) == 2
    assert "give at least one image and a question" in capsys.readouterr().err


def test_hostile_missing_profile_file(tmp_path, capsys, picture):
    code = main(
        ["ask", str(picture), "what?", "--profile", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml" in err
    no_traceback(err)


def test_hostile_unexpected_error_is_one_line(capsys, monkeypatch):
    from toolvlm.agent import cli_ask

    def boom(args, command):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli_ask, "run", boom)
    assert main(["ask", "a.png", "q"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "toolvlm ask: error: RuntimeError: something inside broke (-vv shows the traceback)"


def test_hostile_offline_hub_id_says_how_to_use_a_folder():
    line = toolvlm_cli.error_line(FileNotFoundError("model folder not found: llava-hf/llava-1.5-7b-hf"))
    assert "hub id, which cannot be reached offline" in line and "--local-dir" in line
    assert "model: to that folder" in line
    assert toolvlm_cli.error_line(FileNotFoundError("model folder not found: ./x")).endswith("./x")


def test_hostile_missing_session_image_via_api_keeps_files(tmp_path, agent_image):
    folder = tmp_path / "s"
    bot = Assistant(ScriptedController(["hi", "hi"]), [], session=folder)
    bot.chat("one", images=[agent_image])
    bot.chat("two", images=[make_image(10, 10)])
    del bot
    (folder / "images" / "img_1.png").unlink()
    before = (folder / "trajectory.jsonl").read_bytes()
    with pytest.raises(SessionError, match="img_1 is missing"):
        Assistant(ScriptedController([]), [], session=folder)
    assert (folder / "trajectory.jsonl").read_bytes() == before  # nothing rewritten or lost


def test_hostile_end_step_after_cancel_in_api(tmp_path, agent_tools):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
        yield ""

    controller = ScriptedController([])
    controller.stream = interrupted
    bot = Assistant(controller, agent_tools, session=tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        bot.chat("hi")
    steps = lines_of(tmp_path / "s")
    assert [s["kind"] for s in steps] == ["user", "assistant"] and steps[1]["cancelled"]
    assert isinstance(load_session(tmp_path / "s")[0].steps[0], UserStep)
    assert not any(isinstance(s, EndStep) for s in bot.trajectory)
