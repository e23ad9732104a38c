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


def test_chat_in_the_browser(page_url, chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1100, "height": 1100})
            tab.goto(page_url)
            box = tab.locator("#message textarea")
            box.wait_for(timeout=30_000)
            chat = tab.locator("#chat")

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
        finally:
            browser.close()
