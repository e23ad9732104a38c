"""``mmllm`` command line: one-shot generate (text and JSON), one-line errors with exit 2,
and the terminal chat driven through a pseudo-terminal with pexpect."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mmllm
from demo.examples import write_example_media
from mmllm import cli

pexpect = pytest.importorskip("pexpect")

REPO = Path(__file__).resolve().parents[1]
# A chat whose model is demo.fake.EchoModel: it answers at once and returns toy media.
ECHO_CHAT = ("import sys, mmllm, demo.fake; mmllm.load = lambda name=None, **kw: demo.fake.EchoModel(); "
             "from mmllm.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_example_media(tmp_path_factory.mktemp("examples"), size=32)


@pytest.fixture(scope="module")
def tiny():
    return mmllm.load("tiny")


@pytest.fixture
def use_tiny(tiny, monkeypatch):
    monkeypatch.setattr(mmllm, "load", lambda name=None, **kw: tiny)


def test_generate_json(use_tiny, media, capsys):
    code = cli.main(["generate", "--model", "tiny", "--image", str(media["image"]), "--prompt", "Describe this.",
                     "--json", "--max-new-tokens", "5"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "media"} and out["media"] == []
    expected = mmllm.load("tiny").generate("Describe this.", image=str(media["image"]), max_new_tokens=5).text
    assert out["text"] == expected


def test_generate_saves_media_and_lists_paths(monkeypatch, tmp_path, capsys):
    from demo.fake import EchoModel

    monkeypatch.setattr(mmllm, "load", lambda name=None, **kw: EchoModel())
    code = cli.main(["generate", "--prompt", "Draw a red circle.", "--json", "--out", str(tmp_path)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == "You said: Draw a red circle."
    assert len(out["media"]) == 1 and out["media"][0].endswith(".png") and Path(out["media"][0]).is_file()
    code = cli.main(["generate", "--prompt", "Play a sound.", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "You said: Play a sound." and lines[1].startswith("[audio] ") and lines[1].endswith(".wav")


@pytest.mark.slow
def test_generate_through_the_console_script(media):
    """The installed entry point, in a fresh process, with the real tiny model."""
    proc = subprocess.run([sys.executable, "-m", "mmllm.cli", "generate", "--model", "tiny", "--image",
                           str(media["image"]), "--prompt", "What colour is it?", "--json", "--max-new-tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"text", "media"}
    assert "Loading model 'tiny'" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--image", "/no/such.png"], "image file '/no/such.png' does not exist"),
    (["--prompt", " "], "--prompt is empty"),
    (["--audio", "NOTES"], "cannot decode audio"),
    (["--video", "BROKEN"], "cannot decode video"),
])
def test_bad_input_exits_2_with_one_line(args, message, use_tiny, tmp_path, capsys):
    notes, broken = tmp_path / "notes.wav", tmp_path / "broken.mp4"
    notes.write_text("not audio")
    broken.write_bytes(b"not a video")
    args = [{"NOTES": str(notes), "BROKEN": str(broken)}.get(a, a) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", "hi"]
    assert cli.main(["generate", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmllm: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_unknown_model_exits_2(capsys):
    assert cli.main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmllm: error: 'no-such-model' is neither a directory") and "tiny" in err


def test_bad_input_in_a_fresh_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "mmllm.cli", "generate", "--image", "/no/such.png", "--prompt",
                           "hi"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mmllm: error: image file '/no/such.png' does not exist; check the path"


def test_presets(capsys):
    assert cli.main(["presets"]) == 0
    names = capsys.readouterr().out.split()
    assert "tiny" in names and "smollm2" in names


def _spawn(args, cwd, code=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    argv = ["-c", code, *args] if code else ["-m", "mmllm.cli", *args]
    return pexpect.spawn(sys.executable, argv, cwd=str(cwd), env=env, encoding="utf-8", timeout=120)


@pytest.mark.slow
def test_chat_with_image_in_a_terminal(media, tmp_path):
    child = _spawn(["chat", "--model", "tiny", "--max-new-tokens", "4", "--out", str(tmp_path)], REPO)
    try:
        child.expect("Loading model 'tiny'")
        child.expect("you> ")
        child.sendline("/image /no/such.png")
        child.expect("error: image file '/no/such.png' does not exist")
        child.expect("you> ")
        child.sendline(f"/image {media['image']}")
        child.expect("attached image")
        child.expect("you> ")
        child.sendline("Describe this image.")
        child.expect("bot> ")
        child.expect("you> ")
        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_saves_generated_media(tmp_path):
    """Uses demo.fake.EchoModel in place of a model with an output side."""
    out = tmp_path / "out"
    child = _spawn(["chat", "--out", str(out)], REPO, code=ECHO_CHAT)
    try:
        child.expect("you> ")
        child.sendline("Draw a red circle and play a sound.")
        child.expect("bot> You said: Draw a red circle and play a sound.")
        child.expect(r"\[image saved\] (\S+)\r?\n")
        image = child.match.group(1)
        child.expect(r"\[audio saved\] (\S+)\r?\n")
        audio = child.match.group(1)
        child.expect("you> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert Path(image).parent == out and image.endswith(".png") and Path(image).is_file()
    assert audio.endswith(".wav") and Path(audio).stat().st_size > 1000
    assert re.fullmatch(r"[0-9a-f]{8}-image-0\.png", Path(image).name)
