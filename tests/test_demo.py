"""The web demo: page construction, the chat handler (streaming, history with media, bad
input, inline media) and one round trip through a served page. Hermetic: the ``tiny``
preset or ``demo.fake.EchoModel``; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import mmllm
from demo.app import build_demo
from mmllm.chat import Limits, Settings, Turn, model_history, respond, retry, undo
from demo.examples import write_example_media
from demo.fake import EchoModel


@pytest.fixture(scope="module")
def tiny():
    return mmllm.load("tiny")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_example_media(tmp_path_factory.mktemp("examples"), size=32)


def run(model, message, turns=(), limits=None, out_dir=None, settings=None):
    """All yields of one ``respond`` call -> (list of message lists, final turns)."""
    out_dir = out_dir or tempfile.mkdtemp(prefix="mmllm-demo-test-")  # never the working tree
    steps = list(respond(model, message, list(turns), settings or Settings(max_new_tokens=6, temperature=0.0),
                         limits or Limits(), out_dir))
    return [m for m, _ in steps], steps[-1][1]


def test_build_demo_for_tiny_and_echo(tiny, tmp_path):
    page = build_demo(tiny, model_name="tiny", workdir=tmp_path)
    assert isinstance(page, gr.Blocks)
    names = sorted(p.stem for p in (tmp_path / "examples").iterdir())
    assert names == ["beep", "moving-right", "red-circle"]
    types = {type(b).__name__ for b in page.blocks.values()}
    assert {"Chatbot", "MultimodalTextbox", "Slider", "Button", "Image", "Video"} <= types
    assert page._queue.max_size == 16
    build_demo(EchoModel(), workdir=tmp_path / "echo")


def test_respond_streams_text_for_text_and_image(tiny, media):
    prompt, image = "Describe this image.", str(media["image"])
    steps, turns = run(tiny, {"text": prompt, "files": [image]})
    assert len(steps) >= 3, "the reply should arrive in pieces"
    replies = [m[-1]["content"] for m in steps]
    assert all(b.startswith(a) or a == "…" for a, b in zip(replies[:-2], replies[1:-1]))  # growing text
    final = steps[-1]
    assert final[0] == {"role": "user", "content": prompt}
    assert final[1] == {"role": "user", "content": {"path": image}}
    assert turns[-1].done and turns[-1].error is None
    expected = tiny.generate(prompt, image=image, max_new_tokens=6, temperature=0.0).text
    assert turns[-1].reply == expected


def test_earlier_media_stay_in_context(media):
    model = EchoModel()
    _, turns = run(model, {"text": "Describe this image.", "files": [str(media["image"])]})
    _, turns = run(model, {"text": "What sound is this?", "files": [str(media["audio"])]}, turns)
    _, turns = run(model, "And what colour was the image?", turns)
    history = model.calls[-1]["history"]
    assert history[0] == {"role": "user", "content": "<image>\nDescribe this image.", "image": [str(media["image"])]}
    assert history[1]["role"] == "assistant" and history[1]["content"].startswith("You said: Describe")
    assert history[2]["audio"] == [str(media["audio"])] and history[2]["content"].startswith("<audio>\n")
    assert model.calls[-1]["image"] is None and len(history) == 4


def test_history_works_with_the_real_model(tiny, media):
    _, turns = run(tiny, {"text": "Describe this image.", "files": [str(media["image"])]})
    _, turns = run(tiny, {"text": "And this?", "files": [str(media["video"])]}, turns)
    assert [t.error for t in turns] == [None, None]
    assert model_history(tiny, turns)[2]["video"] == [str(media["video"])]


def _corrupt_png(tmp_path) -> str:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG not really")
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("empty", "the message is empty"),
    ("only_file", "add some text"),
    ("unsupported", "unsupported file type '.txt'"),
    ("too_large", "the upload limit is 0.0001 MB"),
    ("corrupt", "broken.png: not a readable image file"),
    ("outside", "must be uploaded through the page"),
    ("missing", "file not found"),
])
def test_bad_input_gives_a_message_not_an_exception(case, expected, media, tmp_path):
    model = EchoModel()
    text, files, limits = "Describe this.", [], Limits()
    if case == "empty":
        text = "  "
    elif case == "only_file":
        text, files = "", [str(media["image"])]
    elif case == "unsupported":
        (tmp_path / "notes.txt").write_text("hello")
        files = [str(tmp_path / "notes.txt")]
    elif case == "too_large":
        files, limits = [str(media["image"])], Limits(max_upload_mb=0.0001)
    elif case == "corrupt":
        files = [_corrupt_png(tmp_path)]
    elif case == "outside":
        files, limits = [str(media["image"])], Limits(roots=(str(tmp_path),))
    elif case == "missing":
        files = [str(tmp_path / "gone.png")]
    steps, turns = run(model, {"text": text, "files": files}, limits=limits)
    last = steps[-1][-1]
    assert last["role"] == "assistant" and last["content"].startswith("⚠️") and expected in last["content"]
    assert model.calls == [], "nothing reaches the model"
    # The failed turn stays visible but out of the model's context.
    run(model, "Hello", turns)
    assert model.calls[-1]["history"] == []


def test_media_the_model_cannot_read(media):
    model = EchoModel()
    model.input_modalities = ("image",)
    steps, _ = run(model, {"text": "What sound is this?", "files": [str(media["audio"])]})
    assert "this model cannot read audio; it reads image" in steps[-1][-1]["content"]


def test_generated_media_render_inline(tmp_path):
    model = EchoModel()
    steps, turns = run(model, "Draw a red circle, play a sound and make it move left.", out_dir=tmp_path)
    outputs = turns[-1].outputs
    assert [m for m, _ in outputs] == ["image", "audio", "video"]
    assert all(Path(p).is_file() and Path(p).parent == tmp_path for _, p in outputs)
    assert np.asarray(Image.open(outputs[0][1]))[32, 32].tolist() != [0, 0, 0]  # the circle is drawn
    files = [m["content"]["path"] for m in steps[-1] if isinstance(m["content"], dict)]
    assert files == [p for _, p in outputs]
    # Gradio's chatbot turns them into file messages it shows as an image, an audio player and a video.
    shown = gr.Chatbot().postprocess(steps[-1]).model_dump()
    mimes = [c["file"]["mime_type"] for msg in shown for c in msg["content"] if c["type"] == "file"]
    assert mimes[0] == "image/png" and mimes[1].startswith("audio/") and mimes[2] in ("video/mp4", "image/gif")


def test_decoder_settings_only_for_models_with_outputs():
    settings = Settings(guidance_scale=3.0, num_inference_steps=7, num_frames=5, audio_length_in_s=2.0, seed=4)
    assert set(settings.generate_kwargs(())) == {"max_new_tokens", "temperature", "top_p", "seed"}
    assert settings.generate_kwargs(("image",))["num_inference_steps"] == 7
    assert "num_frames" not in settings.generate_kwargs(("image",))
    model = EchoModel()
    run(model, "Draw a red circle.", settings=settings)
    call = model.calls[-1]
    assert (call["guidance_scale"], call["num_frames"], call["audio_length_in_s"], call["seed"]) == (3.0, 5, 2.0, 4)


def test_decoder_settings_default_to_each_decoders_own():
    from types import SimpleNamespace

    from demo.app import _settings_reader
    from mmllm.chat import FALLBACK_DECODER_SETTINGS, decoder_settings

    # Unset decoder settings are not passed: every decoder keeps its configured value.
    assert "guidance_scale" not in Settings().generate_kwargs(("image", "video"))
    model = SimpleNamespace(output_modalities=("image", "video"), decoders={
        "image": SimpleNamespace(options={"guidance_scale": 3.0, "num_inference_steps": 20}),
        "video": SimpleNamespace(options={"guidance_scale": 9.0, "num_frames": 4})})
    shown = decoder_settings(model)
    assert shown == {**FALLBACK_DECODER_SETTINGS, "guidance_scale": 3.0, "num_inference_steps": 20, "num_frames": 4}
    assert decoder_settings(EchoModel()) == FALLBACK_DECODER_SETTINGS  # no decoders: the fallbacks
    read = _settings_reader(shown)
    untouched = read(64, 0.0, 1.0, -1, 3.0, 20, 4, 5.0)
    assert untouched.generate_kwargs(("image", "video", "audio")) == {
        "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": None}
    moved = read(64, 0.0, 1.0, 7, 5.0, 20, 8, 5.0)
    kwargs = moved.generate_kwargs(("image", "video"))
    assert (kwargs["guidance_scale"], kwargs["num_frames"], kwargs["seed"]) == (5.0, 8, 7)
    assert "num_inference_steps" not in kwargs


def test_retry_and_undo(media, tmp_path):
    model = EchoModel()
    _, turns = run(model, {"text": "Describe this image.", "files": [str(media["image"])]})
    _, turns = run(model, "Draw a red circle.", turns)
    steps = list(retry(model, turns, Settings(), tmp_path))
    retried = steps[-1][1]
    assert len(retried) == 2 and len(model.calls) == 3
    assert model.calls[-1]["prompt"] == "Draw a red circle." and len(model.calls[-1]["history"]) == 2
    turns, message = undo(retried)
    assert [t.text for t in turns] == ["Describe this image."]
    assert message == {"text": "Draw a red circle.", "files": []}
    turns, message = undo(turns)
    assert turns == [] and message["files"] == [str(media["image"])]
    assert undo([]) == ([], {"text": "", "files": []})


def test_generation_failure_is_reported_in_chat():
    class Broken(EchoModel):
        def generate(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    steps, turns = run(Broken(), "Hello")
    assert "generation failed: RuntimeError: out of memory" in steps[-1][-1]["content"]
    assert isinstance(turns[-1], Turn) and turns[-1].error


def test_served_page_round_trip(media, tmp_path):
    """Launch the page and talk to it over HTTP with gradio_client."""
    from gradio_client import Client, handle_file

    page = build_demo(EchoModel(), workdir=tmp_path)
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                max_file_size="1mb", allowed_paths=[str(tmp_path)])
    try:
        client = Client(page.local_url, verbose=False, download_files=False)
        settings = [16, 0.0, 1.0, 0, 7.5, 5, 4, 1.0]
        out = client.predict({"text": "Describe this image.", "files": [handle_file(str(media["image"]))]},
                             None, None, *settings, api_name="/on_submit")
        chat, box = out[0], out[1]
        assert chat[-1]["content"][0]["text"] == "You said: Describe this image. (with image)"
        assert chat[1]["content"][0]["type"] == "file"
        assert box is None or not box.get("text")
        out = client.predict({"text": "", "files": []}, None, None, *settings, api_name="/on_submit")
        assert "the message is empty" in out[0][-1]["content"][0]["text"]
    finally:
        page.close()


def test_full_queue_turns_requests_away(tmp_path):
    """One request runs, one waits (max_queue=1); the third is told the queue is full."""
    import threading

    from gradio_client import Client

    release = threading.Event()

    class Slow(EchoModel):
        def generate(self, *args, **kwargs):
            release.wait(30)
            return super().generate(*args, **kwargs)

    page = build_demo(Slow(), workdir=tmp_path, concurrency=1, max_queue=1)
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        client = Client(page.local_url, verbose=False, download_files=False)
        settings = [16, 0.0, 1.0, 0, 7.5, 5, 4, 1.0]

        def submit(text):
            return client.submit({"text": text, "files": []}, None, None, *settings, api_name="/on_submit")

        first = submit("one")
        _wait_for(lambda: first.status().code.name in ("PROCESSING", "ITERATING"))
        second = submit("two")
        _wait_for(lambda: second.status().code.name == "IN_QUEUE")
        third = submit("three")
        with pytest.raises(Exception, match="(?i)queue is full"):
            third.result(timeout=30)
        release.set()
        assert first.result(timeout=30)[0][-1]["content"][0]["text"] == "You said: one"
        assert second.result(timeout=30)[0][-1]["content"][0]["text"] == "You said: two"
    finally:
        release.set()
        page.close()


def _wait_for(condition, timeout=20.0):
    import time

    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_a_demo_without_workdir_removes_its_temp_dir_at_exit(tmp_path):
    """Gradio keeps a built page alive, so the page's own temp dir goes when the process ends."""
    import subprocess
    import sys

    code = ("import glob, os, tempfile; from demo.app import build_demo; from demo.fake import EchoModel; "
            "page = build_demo(EchoModel()); "
            "print(*glob.glob(os.path.join(tempfile.gettempdir(), 'mmllm-demo-*', 'examples', 'red-circle.*')))")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    example = Path(done.stdout.strip())
    assert example.parent.parent.parent == tmp_path  # the page wrote its examples there
    assert not example.exists() and not list(tmp_path.glob("mmllm-demo-*"))


def test_small_generated_pictures_get_an_enlarged_copy_to_view_and_keep_their_pixels(tmp_path):
    """With previews (the CLI), a 32 x 32 picture or clip is saved with its own pixels plus a
    nearest-neighbour copy at least 256 pixels a side; larger outputs get none. The demo page
    shows its pictures enlarged by a style rule instead, the files unchanged."""
    import numpy as np
    from PIL import Image

    from mmllm.chat import preview_path, save_outputs, shown_path
    from mmllm.generation import GenerateResult
    from pipelines import ImageOutput, VideoOutput

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = np.zeros((300, 400, 3), np.uint8)
    clip = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    result = GenerateResult(text="", images=[ImageOutput(Image.fromarray(pixels)), ImageOutput(Image.fromarray(big))],
                            videos=[VideoOutput(clip, fps=4)])
    (_, small), (_, large), (_, video) = save_outputs(result, tmp_path / "cli", previews=True)
    assert np.array_equal(np.asarray(Image.open(small)), pixels)
    enlarged = np.asarray(Image.open(preview_path(small)))
    assert enlarged.shape == (256, 256, 3) and np.array_equal(enlarged[::8, ::8], pixels)
    assert shown_path(small) == str(preview_path(small)) and shown_path(large) == large
    assert any(p.name.startswith(preview_path(video).stem) for p in (tmp_path / "cli").iterdir())
    save_outputs(result, tmp_path / "demo")
    assert not any(".preview" in p.name for p in (tmp_path / "demo").iterdir())
    page = build_demo(EchoModel(), model_name="echo", workdir=tmp_path / "page")
    assert "image-rendering: pixelated" in str(page.config)
