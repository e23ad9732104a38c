"""The served demo in a real browser (Playwright driving Debian's headless Chromium).

Needs ``pip install playwright`` (the dev extra) and Debian's Chromium. Running as root with
apt-get available, the test installs Chromium itself; it is skipped, with the reason, only where
Chromium cannot be installed (set ``MMLLM_NO_APT=1`` to forbid the install).
Screenshots go to ``artifacts/`` (set ``MMLLM_DEMO_SCREENSHOT`` to also write one for the docs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from demo.app import build_demo
from demo.fake import EchoModel

sync_api = pytest.importorskip("playwright.sync_api")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow]


def _find_chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get when missing and allowed."""
    found = _find_chromium()
    if found:
        return found
    if os.environ.get("MMLLM_NO_APT") or not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("needs Chromium: run `apt-get install chromium` as root (apt-get unavailable or not root here)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, timeout=300, capture_output=True, check=False)
        done = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env,
                              timeout=600, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.skip("Chromium could not be installed: apt-get timed out")
    found = _find_chromium()
    if not found:
        pytest.skip(f"Chromium could not be installed: apt-get said {done.stderr.strip()[-300:]!r}")
    return found


@pytest.fixture
def page_url(tmp_path):
    page = build_demo(EchoModel(), model_name="echo", workdir=tmp_path)
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(tmp_path)])
    yield page.local_url
    page.close()


@contextmanager
def _chat_page(url: str, chromium: str, timeout: int):
    """(tab, message box, chat) of the demo at ``url`` in a fresh headless Chromium."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 1100})
            tab.goto(url)
            box = tab.locator("#message textarea")
            box.wait_for(timeout=timeout)
            yield tab, box, tab.locator("#chat")
        finally:
            browser.close()


def test_chat_in_the_browser(page_url, chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    with _chat_page(page_url, chromium, timeout=30_000) as (tab, box, chat):
        # A clickable example fills the box with its text and image; Enter sends it.
        tab.get_by_text("Describe this image.").first.click()
        tab.wait_for_function("document.querySelector('#message textarea').value === 'Describe this image.'")
        box.press("Enter")
        sync_api.expect(chat).to_contain_text("You said: Describe this image. (with image)", timeout=30_000)
        sync_api.expect(chat.locator("img")).to_have_count(1, timeout=30_000)

        # Generated media appear inline: an image, an audio player and a video.
        box.fill("Draw a red circle, play a sound and make it move left.")
        box.press("Enter")
        sync_api.expect(chat).to_contain_text("You said: Draw a red circle", timeout=30_000)
        sync_api.expect(chat.locator("img")).to_have_count(2, timeout=30_000)
        sync_api.expect(chat.locator("audio")).to_have_count(1, timeout=30_000)
        sync_api.expect(chat.locator("video, img[src*='.gif']")).to_have_count(1, timeout=30_000)
        tab.screenshot(path=str(ARTIFACTS / "demo-chat.png"), full_page=True)
        if os.environ.get("MMLLM_DEMO_SCREENSHOT"):
            tab.screenshot(path=os.environ["MMLLM_DEMO_SCREENSHOT"])

        # An empty message gets a message in the chat, not an error page.
        box.fill("")
        box.press("Enter")
        sync_api.expect(chat).to_contain_text("the message is empty", timeout=30_000)

        # Undo removes the last exchange; Clear empties the conversation.
        tab.locator("#undo").click()
        sync_api.expect(chat).not_to_contain_text("the message is empty", timeout=30_000)
        tab.locator("#clear").click()
        sync_api.expect(chat).not_to_contain_text("You said", timeout=30_000)
        tab.screenshot(path=str(ARTIFACTS / "demo-cleared.png"))


# --------------------------------------------------------------------------- the toy default, for real


@pytest.fixture(scope="module")
def toy_url(tmp_path_factory):
    """The demo serving the trained toy default (built first when missing: ~100 min on 2 CPU
    cores), greedy so the answers are reproducible."""
    import mmllm
    from mmllm.chat import Settings
    from mmllm.toy.mmllm_build import build_default, is_built

    if not is_built():
        build_default(progress=False)
    model = mmllm.load("toy")
    workdir = tmp_path_factory.mktemp("toy_demo")
    page = build_demo(model, model_name="toy", workdir=workdir, sampling=Settings(max_new_tokens=48, temperature=0.0))
    page.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, allowed_paths=[str(workdir)])
    yield page.local_url
    page.close()


@pytest.mark.toy_default
def test_toy_model_in_the_browser(toy_url, chromium, tmp_path):
    """The issue's three checks against the real toy model: describe an uploaded toy image
    (its colour and shape named), draw on request (an image appears), reject a non-image file."""
    import re

    from PIL import Image

    from mmllm.toy import world

    spec = world.ImageSpec(colour="red", shape="circle", size="large", position="center", count=1)
    picture = tmp_path / "toy_red_circle.png"
    Image.fromarray(world.render_image(spec)).save(picture)
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    ARTIFACTS.mkdir(exist_ok=True)
    with _chat_page(toy_url, chromium, timeout=60_000) as (tab, box, chat):
        bot = chat.locator(".bot")

        # 1. Upload a toy image and ask what it shows: the answer names its colour and shape.
        tab.locator("#message input[type=file]").set_input_files(str(picture))
        box.fill("What is in this picture?")
        box.press("Enter")
        sync_api.expect(chat.locator("img")).to_have_count(1, timeout=60_000)
        sync_api.expect(bot.last).to_contain_text(re.compile(r"\bred\b", re.I), timeout=120_000)
        sync_api.expect(bot.last).to_contain_text(re.compile(r"\bcircle", re.I), timeout=120_000)
        tab.screenshot(path=str(ARTIFACTS / "toy-describe.png"), full_page=True)

        # 2. Ask for a drawing: a generated image appears in the conversation.
        box.fill("Draw a blue square.")
        box.press("Enter")
        sync_api.expect(chat.locator("img")).to_have_count(2, timeout=180_000)
        tab.screenshot(path=str(ARTIFACTS / "toy-draw.png"), full_page=True)
        if os.environ.get("MMLLM_DEMO_SCREENSHOT"):
            tab.screenshot(path=os.environ["MMLLM_DEMO_SCREENSHOT"])

        # 3. A file that is not an image (nor audio, nor video) gets a clear message.
        tab.locator("#message input[type=file]").set_input_files(str(notes))
        box.fill("And this?")
        box.press("Enter")
        sync_api.expect(tab.locator("body")).to_contain_text(re.compile(r"not .*(supported|accepted)|unsupported|"
                                                                        r"invalid file", re.I), timeout=60_000)
        tab.screenshot(path=str(ARTIFACTS / "toy-bad-file.png"), full_page=True)
