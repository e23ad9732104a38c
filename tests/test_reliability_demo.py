"""Many users: 20 concurrent chat requests against the served demo (127.0.0.1 only).

Each user is a thread with its own ``gradio_client.Client`` (its own session). Every request
must end, within a time bound, either answered (its own prompt and its own reply, none lost or
crossed) or with Gradio's clear "queue is full" error; the process's memory stays in a budget.
Numbers are printed (``-s`` shows them) and recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest

import mmllm
from demo.app import build_demo
from mmllm.chat import Limits, Settings, respond
from demo.fake import EchoModel

USERS = 20
TIMEOUT_S = 120.0  # for the whole load; a request still pending then counts as lost
RSS_GROWTH_BUDGET_MB = 300  # over the RSS before the page is launched (model already loaded)
MAX_NEW_TOKENS = 16


def _settings(seed: int) -> list:
    # max_new_tokens, temperature, top_p, seed, guidance, steps, frames, audio length (demo.app order)
    return [MAX_NEW_TOKENS, 1.0, 1.0, seed, 7.5, 1, 2, 1.0]


class _Rss:
    """Peak resident memory of this process, sampled every 20 ms in a thread."""

    def __init__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _load(url: str, n: int, before_release=None) -> dict:
    """``n`` users submit at once; returns each user's outcome ("answered", "busy" or "error: ...")."""
    from gradio_client import Client

    outcomes, jobs, lock = {}, {}, threading.Lock()
    barrier = threading.Barrier(n)
    deadline = time.monotonic() + TIMEOUT_S

    def user(i: int):
        try:
            client = Client(url, verbose=False, download_files=False)
            barrier.wait(timeout=60)
            job = client.submit({"text": f"User {i}: describe a red circle.", "files": []}, None, None,
                                *_settings(i), api_name="/on_submit")
            with lock:
                jobs[i] = job
            out = job.result(timeout=max(1.0, deadline - time.monotonic()))
            outcomes[i] = ("answered", out[0])
        except Exception as err:  # noqa: BLE001 - every failure is classified below
            text = f"{type(err).__name__}: {err}"
            outcomes[i] = ("busy", text) if "queue is full" in text.lower() else (f"error: {text}", None)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    if before_release is not None:
        before_release(jobs, lock)
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    return {"outcomes": outcomes, "seconds": time.monotonic() - t0, "alive": sum(t.is_alive() for t in threads)}


def _text(message) -> str:
    content = message["content"]
    return content[0]["text"] if isinstance(content, list) else content


def _own_exchange(i: int, chat: list) -> tuple[str, str | None]:
    """(user text, assistant text) of user i's page; the chat must hold only this user's turn."""
    assert _text(chat[0]) == f"User {i}: describe a red circle.", chat
    replies = [_text(m) for m in chat if m["role"] == "assistant"]
    assert len(chat) == 1 + len(replies) and len(replies) <= 1, chat
    return _text(chat[0]), (replies[0] if replies else "")


@pytest.fixture
def page(tmp_path):
    pages = []

    def launch(model, **kw):
        app = build_demo(model, workdir=tmp_path / f"demo-{len(pages)}", **kw)
        app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
        assert app.local_url.startswith("http://127.0.0.1:")
        pages.append(app)
        return app

    yield launch
    for app in pages:
        app.close()


def test_twenty_users_on_the_tiny_model_are_all_answered(page, tmp_path):
    """The tiny preset, 2 requests generated at a time, 20 waiting places: every user gets a reply,
    their own (the prompt shown back is theirs), and none is lost."""
    model = mmllm.load("tiny")
    model.generate("warm up", max_new_tokens=2)
    with _Rss() as rss:
        app = page(model, model_name="tiny", concurrency=2, max_queue=USERS)
        run = _load(app.local_url, USERS)
    outcomes = run["outcomes"]
    kinds = [outcomes.get(i, ("lost", None))[0] for i in range(USERS)]
    print(f"\ntiny, concurrency 2, max_queue {USERS}: {kinds.count('answered')}/{USERS} answered in "
          f"{run['seconds']:.1f} s; RSS {rss.start / 2**20:.0f} MB -> peak {rss.peak / 2**20:.0f} MB "
          f"(+{rss.growth_mb:.0f} MB)")
    assert run["alive"] == 0 and kinds == ["answered"] * USERS, outcomes
    # Each reply is the one the model gives that user's request on its own.
    same = 0
    for i in range(USERS):
        _, reply = _own_exchange(i, outcomes[i][1])
        steps = list(respond(model, f"User {i}: describe a red circle.", [],
                             Settings(MAX_NEW_TOKENS, 1.0, 1.0, i, 7.5, 1, 2, 1.0), Limits(), tmp_path))
        same += reply == steps[-1][1][-1].reply
    print(f"replies equal to the same request served alone: {same}/{USERS}")
    assert rss.growth_mb < RSS_GROWTH_BUDGET_MB, f"RSS grew {rss.growth_mb:.0f} MB"


def test_twenty_users_past_the_queue_get_a_clear_busy_answer(page):
    """2 at a time and 6 waiting places: exactly 8 users are answered (each with their own reply),
    the other 12 are told the queue is full; none hangs or is lost. The model is held until every
    request has been queued or turned away, so the split does not depend on timing."""
    release = threading.Event()

    class Held(EchoModel):
        def generate(self, *args, **kwargs):
            release.wait(TIMEOUT_S)
            return super().generate(*args, **kwargs)

    concurrency, max_queue = 2, 6
    app = page(Held(), concurrency=concurrency, max_queue=max_queue)

    def hold_until_all_queued(jobs, lock):
        end = time.monotonic() + 60
        while time.monotonic() < end:  # every job queued, running or turned away
            with lock:
                codes = [j.status().code.name for j in jobs.values()]
            if len(codes) == USERS and not {"STARTING", "JOINING_QUEUE"} & set(codes):
                break
            time.sleep(0.05)
        release.set()

    with _Rss() as rss:
        run = _load(app.local_url, USERS, before_release=hold_until_all_queued)
    release.set()
    outcomes = run["outcomes"]
    kinds = [outcomes.get(i, ("lost", None))[0] for i in range(USERS)]
    print(f"\necho, concurrency {concurrency}, max_queue {max_queue}: {kinds.count('answered')} answered, "
          f"{kinds.count('busy')} told the queue is full, in {run['seconds']:.1f} s; RSS +{rss.growth_mb:.0f} MB")
    assert run["alive"] == 0, "a request hung"
    assert sorted(set(kinds)) == ["answered", "busy"], outcomes
    assert kinds.count("answered") == concurrency + max_queue and kinds.count("busy") == USERS - concurrency - max_queue
    for i in range(USERS):
        if kinds[i] == "answered":
            prompt, reply = _own_exchange(i, outcomes[i][1])
            assert reply == f"You said: {prompt}"
        else:
            assert "queue is full" in outcomes[i][1].lower()
    assert rss.growth_mb < RSS_GROWTH_BUDGET_MB, f"RSS grew {rss.growth_mb:.0f} MB"


def test_seeded_replies_reproduce_when_requests_run_one_at_a_time(page, tmp_path):
    """With concurrency 1, six simultaneous users each get exactly the reply their seed gives when the
    request is served alone. (With concurrency > 1 they do not: ``generate`` seeds the process-wide
    torch RNG and concurrent requests draw from it in turn; see docs/RELIABILITY.md, "Many users".)"""
    model = mmllm.load("tiny")
    app = page(model, model_name="tiny", concurrency=1, max_queue=USERS)
    run = _load(app.local_url, 6)
    for i in range(6):
        assert run["outcomes"][i][0] == "answered", run["outcomes"][i]
        _, reply = _own_exchange(i, run["outcomes"][i][1])
        alone = list(respond(model, f"User {i}: describe a red circle.", [],
                             Settings(MAX_NEW_TOKENS, 1.0, 1.0, i, 7.5, 1, 2, 1.0), Limits(), tmp_path))
        assert reply == alone[-1][1][-1].reply and reply, i
