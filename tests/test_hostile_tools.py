"""Hostile input to the tools half: images, tool arguments, profiles and outputs a new user (or an attacker) gives.

Every case runs in-process (`toolvlm.cli.main` with capsys, the Python API, the tools directly) and asserts a
clean message naming the problem, exit status 2 for usage errors, no traceback, nothing written or lost where
it should not be. Models: none, or the tiny random ones of fixtures_tools; the real bundle/ only for its profile.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from toolvlm.agent.profiles import ProfileError, load_profile
from toolvlm.cli import main
from toolvlm.tools import MissingWeightsError, ToolInputError, hf, imaging
from toolvlm.tools.base import validate_arguments
from toolvlm.tools.draw import DrawBoxesTool

pytest_plugins = ["fixtures_tools"]  # tiny_models, scene_path

BOX = "boxes=[[2, 2, 30, 20]]"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run the command line in-process: (exit status, stdout, stderr); never a traceback."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` pixels with one tiny IDAT: opening it reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """A fresh current folder (so default outputs land in the test's own folder)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def photo(here) -> Path:
    path = here / "photo.png"
    Image.new("RGB", (40, 30), (20, 120, 40)).save(path)
    return path


# ---------------------------------------------------------------- images: missing, empty, corrupt, huge


def test_hostile_zero_byte_image(here, capsys):
    (here / "empty.png").write_bytes(b"")
    code, out, err = run(capsys, "tool", "draw_boxes", "empty.png", BOX)
    assert code == 2 and "empty (0 bytes)" in err and "empty.png" in err
    assert not (here / "toolvlm_out").exists()


def test_hostile_truncated_image(here, capsys, photo):
    whole = photo.read_bytes()
    (here / "cut.png").write_bytes(whole[: len(whole) // 2])
    code, _, err = run(capsys, "tool", "draw_boxes", "cut.png", BOX)
    assert code == 2 and "corrupt or truncated image file" in err and "cut.png" in err


def test_hostile_corrupt_image_text_file(here, capsys):
    (here / "notes.png").write_text("this is not a picture")
    code, _, err = run(capsys, "tool", "draw_boxes", "notes.png", BOX)
    assert code == 2 and "not an image" in err and "notes.png" in err


def test_hostile_folder_as_image(here, capsys):
    (here / "pictures").mkdir()
    code, _, err = run(capsys, "tool", "draw_boxes", "pictures", BOX)
    assert code == 2 and "got a folder" in err and "pictures" in err


def test_hostile_missing_image(here, capsys):
    code, _, err = run(capsys, "tool", "draw_boxes", "nowhere.png", BOX)
    assert code == 2 and "image file not found" in err and "nowhere.png" in err


def test_hostile_huge_image_is_refused_before_decoding(here, capsys):
    (here / "huge.png").write_bytes(png_header(12_000, 12_000))  # 144 megapixels, 432 MB of RGB
    start = time.perf_counter()
    code, _, err = run(capsys, "tool", "draw_boxes", "huge.png", BOX)
    assert code == 2 and "12000x12000 pixels" in err and "above the limit" in err and "huge.png" in err
    assert time.perf_counter() - start < 10  # refused from the header, not decoded


def test_hostile_decompression_bomb_is_a_clear_error(here):
    (here / "bomb.png").write_bytes(png_header(60_000, 60_000))
    with pytest.raises(imaging.ImageLoadError, match="bomb.png is too large to open safely.*exceeds limit"):
        imaging.load_image(here / "bomb.png", max_pixels=10**12)  # past our cap: Pillow's own guard


def test_hostile_huge_in_memory_image_becomes_an_observation(monkeypatch):
    monkeypatch.setattr(imaging, "MAX_PIXELS", 100)
    output = DrawBoxesTool()(image=Image.new("RGB", (20, 20)), boxes=[[1, 1, 5, 5]])
    assert output.error and "20x20 pixels" in output.content and "above the limit" in output.content


def test_hostile_bytes_images():
    with pytest.raises(imaging.ImageLoadError, match="empty"):
        imaging.load_image(b"")
    with pytest.raises(imaging.ImageLoadError, match="not an image.*<bytes>"):
        imaging.load_image(b"GIF89a but not really")
    with pytest.raises(imaging.ImageLoadError, match="got int"):
        imaging.load_image(42)  # type: ignore[arg-type]


def test_hostile_missing_image_as_a_tool_argument_is_an_observation(here):
    output = DrawBoxesTool()(image="gone.png", boxes=[[1, 1, 5, 5]])
    assert (
        output.error
        and output.content.startswith("draw_boxes: image file not found")
        and "gone.png" in output.content
    )


# ---------------------------------------------------------------- images: odd modes, transparency, rotation


@pytest.mark.parametrize(
    "mode, suffix",
    [("P", ".png"), ("LA", ".png"), ("I;16", ".png"), ("CMYK", ".jpg"), ("1", ".png"), ("F", ".tif")],
)
def test_hostile_odd_modes_load_as_rgb(tmp_path, mode, suffix):
    source = Image.new("RGB", (8, 6), (200, 40, 40)).convert(mode if mode not in ("I;16", "F") else "L")
    if mode in ("I;16", "F"):
        source = source.convert("I" if mode == "I;16" else "F")
        source = source.point(lambda v: v * 200) if mode == "I;16" else source
        if mode == "I;16":
            source = source.convert("I;16")
    path = tmp_path / f"odd{suffix}"
    source.save(path)
    with Image.open(path) as stored:
        assert stored.mode != "RGB"  # the file really holds the odd mode
    loaded = imaging.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 6)


def test_hostile_transparency_goes_on_white_everywhere(tmp_path):
    from toolvlm.vlm import images as vlm_images

    see_through = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    see_through.putpixel((0, 0), (255, 0, 0, 255))
    paletted = see_through.convert("P")  # palette with a transparent index
    paletted.save(tmp_path / "p.png", transparency=paletted.getpixel((1, 1)))
    for source in (see_through, tmp_path / "p.png", see_through.convert("LA")):
        for load in (imaging.load_image, vlm_images.load_image):
            picture = load(source)
            assert picture.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, one rule
    assert imaging.load_image(see_through).getpixel((0, 0)) == (255, 0, 0)


def test_hostile_exif_rotated_photo_is_upright(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view", as phones write it
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    picture = imaging.load_image(tmp_path / "phone.jpg")
    assert picture.size == (20, 40)  # portrait, as the phone showed it
    red, green, blue = picture.getpixel((10, 2))  # the stored left edge is now the top
    assert red > 200 and blue < 60


def test_hostile_one_loader_one_error():
    from toolvlm.vlm import base_lm
    from toolvlm.vlm import images as vlm_images

    assert vlm_images.load_image is imaging.load_image
    assert vlm_images.ImageLoadError is imaging.ImageLoadError
    assert issubclass(imaging.ImageLoadError, ToolInputError)  # a tool's bad image is an observation
    assert base_lm.MissingWeightsError is MissingWeightsError
    with (
        pytest.raises(MissingWeightsError, match="cannot load 'owlv2' weights") as caught,
        hf.loading("grounding", "owlv2", "/x"),
    ):
        raise OSError("disk gone")
    with (
        pytest.raises(MissingWeightsError, match="^grounding: no weights$"),
        hf.loading("grounding", "owlv2", "/x"),
    ):
        raise MissingWeightsError("grounding: no weights")  # not wrapped twice
    assert isinstance(caught.value, FileNotFoundError)


# ---------------------------------------------------------------- tool arguments: malformed and hostile


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("boxes", "expected key=value"),
        ("=3", "expected key=value"),
        ("boxes=[[1, 2, 3", "'boxes': '[[1, 2, 3' is not valid JSON"),
        ('labels={"a": ', "'labels'"),
        ("my-arg=3", "is not an argument name"),
        ("colour=red", "unknown argument(s) ['colour']"),
        ("boxes=[[NaN, 1, 5, 5]]", "must be a finite number"),
        ("boxes=[[1e999, 1, 5, 5]]", "must be a finite number"),
        ("boxes=nonsense", "argument 'boxes'"),
        ("labels=" + json.dumps(["x" * 20_000]), "20000 characters long"),
        ("boxes=" + "[" * 100_000, "argument 'boxes'"),
    ],
    ids=[
        "no-equals",
        "no-key",
        "bad-json",
        "bad-json-object",
        "bad-name",
        "unknown",
        "nan",
        "infinite",
        "wrong-type",
        "huge-text",
        "deep-json",
    ],
)
def test_hostile_tool_arguments_exit_2(here, capsys, photo, argument, expected):
    code, out, err = run(
        capsys, "tool", "draw_boxes", str(photo), *([BOX] if argument.startswith("l") else []), argument
    )
    assert code == 2 and expected in err and out == ""
    assert not (here / "toolvlm_out").exists()  # nothing ran, nothing written


def test_hostile_argument_given_twice(here, capsys, photo):
    code, _, err = run(capsys, "tool", "draw_boxes", str(photo), BOX, BOX)
    assert code == 2 and "'boxes' is given twice" in err
    code, _, err = run(capsys, "tool", "draw_boxes", str(photo), BOX, f"image={photo}")
    assert code == 2 and "the image is given twice" in err


def test_hostile_arguments_through_the_python_api():
    schema = DrawBoxesTool.inputs
    with pytest.raises(ToolInputError, match="must be a JSON object, got list"):
        validate_arguments(schema, ["img_0"])
    with pytest.raises(ToolInputError, match=r"missing required argument\(s\) \['boxes'\]"):
        validate_arguments(schema, {"image": Image.new("RGB", (4, 4))})

    def handles(key, value):  # how the agent loop resolves image handles
        raise ToolInputError(f"argument {key!r}: unknown image {value!r}")

    with pytest.raises(ToolInputError, match="unknown image 'img_9'"):
        validate_arguments(schema, {"image": "img_9", "boxes": [[1, 1, 2, 2]]}, image=handles)
    checked = validate_arguments(schema, {"image": Image.new("RGB", (4, 4)), "boxes": "[[1, 1, 3, 3]]"})
    assert checked["boxes"] == [[1, 1, 3, 3]]  # lenient: JSON text becomes the list
    output = DrawBoxesTool()(image=Image.new("RGB", (4, 4)), boxes=[[1, 1, 3, 3]], colour="red")
    assert (
        output.error
        and "unknown argument(s) ['colour']" in output.content
        and "image (image handle, required)" in output.content
    )


@pytest.mark.parametrize(
    "phrase, expected",
    [
        ("", "the phrase is empty"),
        (" ; ;", "the phrase is empty"),
        ("\x00\x01", "has no letters"),
        ("; ".join(f"thing {i}" for i in range(40)), "40 phrases separated by ';'; at most 16"),
        ("person " * 200, "argument 'phrase' is 1400 characters long; at most 500"),
    ],
    ids=["empty", "separators", "control", "many", "long"],
)
@pytest.mark.parametrize("name", ["counter", "grounding"])
def test_hostile_phrases_are_refused_before_weights_load(here, capsys, scene_path, name, phrase, expected):
    code, out, err = run(capsys, "tool", name, str(scene_path), f"phrase={phrase}")  # the default bundle's
    assert code == 2 and expected in err and out == ""
    assert not (here / "toolvlm_out").exists()


# ---------------------------------------------------------------- outputs


def test_hostile_out_is_an_existing_file(here, capsys, photo):
    (here / "taken").write_text("keep me")
    code, out, err = run(capsys, "tool", "draw_boxes", str(photo), BOX, "--out", "taken")
    assert code == 2 and "--out 'taken' is a file" in err and out == ""
    assert (here / "taken").read_text() == "keep me"


def test_hostile_out_below_a_file(here, capsys, photo):
    (here / "file").write_text("x")
    code, _, err = run(capsys, "tool", "draw_boxes", str(photo), BOX, "--out", "file/sub/dir")
    assert code == 2 and "is a file, so the folder cannot be made" in err


def test_hostile_out_unwritable_folder(here, capsys, photo, monkeypatch):
    import os

    (here / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).name == "locked" else real(p, mode))
    code, _, err = run(capsys, "tool", "draw_boxes", str(photo), BOX, "--out", "locked")
    assert code == 2 and "not writable" in err


def test_hostile_existing_outputs_are_never_overwritten(here, capsys, photo):
    (here / "out").mkdir()
    (here / "out" / "draw_boxes_0.png").write_bytes(b"precious")
    for _ in range(2):
        code, out, _ = run(capsys, "tool", "draw_boxes", str(photo), BOX, "--out", "out")
        assert code == 0
    assert (here / "out" / "draw_boxes_0.png").read_bytes() == b"precious"
    assert sorted(p.name for p in (here / "out").iterdir()) == [f"draw_boxes_{i}.png" for i in range(3)]


# ---------------------------------------------------------------- profiles of `toolvlm tool`


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tools: [1, 2\n", "not valid YAML"),
        ("tools: [grounding, counter]\n", "tools: expected a mapping of tool name -> backend options"),
        ("- just\n- a list\n", "expected a mapping with 'tools:'"),
        ("tools: {counter: 3}\n", "tools.counter: expected a mapping of options"),
        (
            "tools: {counter: {backend: yolo}}\n",
            "tools.counter.backend: unknown backend 'yolo'; backends are:",
        ),
        ("tools: {counter: {backend: owlvit, model: gone}}\n", "tools.counter.model: model folder"),
        (
            "tools: {counter: {thresh: 0.3}}\n",
            "tools.counter.thresh: unknown key (did you mean 'threshold'?)",
        ),
        ("tools: {oracle: {}}\n", "unknown tool 'oracle'"),
    ],
    ids=["yaml", "list-tools", "list", "options", "backend", "folder", "option", "tool"],
)
def test_hostile_tool_profiles_exit_2(here, capsys, photo, text, expected):
    (here / "bad.yaml").write_text(text)
    code, out, err = run(capsys, "tool", "counter", str(photo), "phrase=person", "--profile", "bad.yaml")
    assert code == 2 and expected in err and out == ""
    assert "bad.yaml" in err or "unknown tool" in err


def test_hostile_profile_is_a_folder(here, capsys, photo):
    (here / "profiles").mkdir()
    code, _, err = run(capsys, "tool", "counter", str(photo), "phrase=person", "--profile", "profiles")
    assert code == 2 and "'profiles' is a folder" in err


def test_hostile_profile_relative_models_from_its_own_folder(
    here, capsys, tiny_models, scene_path, monkeypatch
):
    (here / "conf").mkdir()
    (here / "conf" / "owl").symlink_to(tiny_models("owlvit"))
    profile = {"tools": {"grounding": {"backend": "owlvit", "model": "owl", "threshold": 0.0}}}
    (here / "conf" / "p.yaml").write_text(yaml.safe_dump(profile))
    (here / "elsewhere").mkdir()
    (here / "elsewhere" / "owl").mkdir()  # a decoy of the same name beside the current folder
    monkeypatch.chdir(here / "elsewhere")
    code, out, err = run(
        capsys, "tool", "counter", str(scene_path), "phrase=person", "--profile", "../conf/p.yaml"
    )
    assert code == 0 and "instance(s) of 'person'" in out, err


def test_hostile_readme_generator_works_without_a_profile(here):
    from toolvlm import bundle
    from toolvlm.tools.cli import _tools_for

    if not (bundle.bundle_dir() / "profile.yaml").is_file():
        pytest.skip("no default bundle profile in this checkout")
    tools = _tools_for("generator", None)  # what `toolvlm tool generator crowd.png 'changes=...'` builds
    assert set(tools) == {"generator", "grounding"}
    assert tools["generator"].grounding is tools["grounding"]  # a similar image finds the reference's objects
    assert set(_tools_for("counter", None)) == {"counter", "grounding"}


# ---------------------------------------------------------------- profiles of the assistant (`ask`, `chat`)


def test_hostile_ask_with_a_malformed_profile(here, capsys, photo):
    (here / "bad.yaml").write_text("controller: {backend: local\n")
    code, out, err = run(capsys, "ask", str(photo), "what is this?", "--profile", "bad.yaml", "--out", "s")
    assert code == 2 and "bad.yaml" in err and "not valid YAML" in err and out == ""


def test_hostile_ask_with_a_missing_model_folder(here, capsys, photo):
    (here / "conf").mkdir()
    (here / "conf" / "p.yaml").write_text("controller: {backend: local, model: ./weights/controller}\n")
    code, _, err = run(capsys, "ask", str(photo), "what is this?", "--profile", "conf/p.yaml", "--out", "s")
    assert code == 2 and "conf/p.yaml" in err and "controller.model: model folder" in err
    assert f"'{here / 'conf' / 'weights' / 'controller'}' not found" in err  # from the profile's folder
    (here / "conf" / "q.yaml").write_text("controller: {backend: local, model: weights/controller}\n")
    code, _, err = run(capsys, "ask", str(photo), "what is this?", "--profile", "conf/q.yaml", "--out", "s")
    assert code == 2 and "controller.model: no folder 'weights/controller' beside the profile" in err


def test_hostile_ask_with_an_unknown_backend(here, capsys, photo):
    (here / "p.yaml").write_text(
        "controller: {backend: scripted, replies: [hi]}\ntools: {grounding: {backend: yolo9000}}\n"
    )
    code, _, err = run(capsys, "ask", str(photo), "what is this?", "--profile", "p.yaml", "--out", "s")
    assert code == 2 and "p.yaml" in err and "tools.grounding.backend: unknown backend 'yolo9000'" in err
    (here / "q.yaml").write_text("controller: {backend: telepathic}\n")
    code, _, err = run(capsys, "ask", str(photo), "what is this?", "--profile", "q.yaml", "--out", "s")
    assert code == 2 and "controller.backend: unknown controller backend 'telepathic'" in err


def test_hostile_offline_hub_id_says_how_to_point_at_a_folder(here, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (here / "p.yaml").write_text("controller: {backend: local, model: someone/some-vlm}\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(here / "p.yaml")
    text = str(caught.value)
    assert "p.yaml" in text and "controller.model" in text and "cannot be reached offline" in text
    assert "point 'model:' at a local checkpoint folder" in text


def test_hostile_yaml_cannot_run_code(here):
    (here / "evil.yaml").write_text('controller: !!python/object/apply:os.system ["touch pwned"]\n')
    with pytest.raises(ProfileError, match="evil.yaml: not valid YAML"):
        load_profile(here / "evil.yaml")
    assert not (here / "pwned").exists()


def test_hostile_profile_shapes(here):
    (here / "list.yaml").write_text("- controller\n")
    with pytest.raises(ProfileError, match="list.yaml: expected a mapping"):
        load_profile(here / "list.yaml")
    (here / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProfileError, match="bin.yaml"):
        load_profile(here / "bin.yaml")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(here / "absent.yaml")


# ---------------------------------------------------------------- security and noise


def test_hostile_crafted_optimizer_checkpoint_runs_no_code(tmp_path):
    from toolvlm.finetune.train_checkpoint import load_training_state as _load_training_state
    from toolvlm.finetune.train_checkpoint import rng_state as _rng_state
    from toolvlm.finetune.train_checkpoint import set_rng_state as _set_rng_state

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    with open(tmp_path / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Exploit()}, f, protocol=2)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        _load_training_state(tmp_path / "optimizer.pt")
    assert not (tmp_path / "pwned").exists()
    state = _rng_state()
    torch.save({"rng": state}, tmp_path / "ok.pt")
    expected = torch.rand(3)
    _set_rng_state(_load_training_state(tmp_path / "ok.pt")["rng"])  # plain tensors: weights_only loads it
    assert torch.equal(torch.rand(3), expected)


def test_hostile_no_bitsandbytes_outside_qlora():
    code = (
        "import sys\n"
        "from toolvlm.tools import hf\n"
        "with hf.without_bitsandbytes():\n"
        "    import peft\n"
        "    from diffusers import UNet2DModel\n"
        "assert 'bitsandbytes' not in sys.modules, 'imported'\n"
        "from transformers.utils.import_utils import is_bitsandbytes_available\n"
        "assert is_bitsandbytes_available(), 'QLoRA would be off for good'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bitsandbytes" not in done.stderr and "gemm_4bit" not in done.stderr
