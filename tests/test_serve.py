"""``mmllm serve``: a real uvicorn server on loopback with the tiny preset, driven by the
official ``openai`` client (and raw HTTP where the client cannot say it)."""

import base64
import concurrent.futures as cf
import io
import json
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from benchmarks.serve_load import LocalServer, run_load  # noqa: E402
from mmllm.serve import ServeSettings, create_app  # noqa: E402
from mmllm.serve.protocol import StopFilter, cut_at_stop  # noqa: E402

KEY = "test-key"
FAST = {"num_inference_steps": 1, "height": 32, "width": 32}  # tiny decoders, one step


def png_data_url(seed: int = 0, size: int = 16) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("served-media")


@pytest.fixture(scope="module")
def server(tiny, media_dir):
    settings = ServeSettings(model_name="tiny", api_key=KEY, max_body_bytes=256 * 1024, max_tokens=64,
                             allowed_local_media_path=str(media_dir), batch_wait_s=0.02)
    app = create_app(tiny, settings)
    with LocalServer(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, path: str, body: bytes | dict, key: str | None = KEY):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=data, headers={**headers, "Content-Type": "application/json"},
                      timeout=300)


def test_models_auth_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    anonymous = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.models.list()
    assert err.value.status_code == 401 and "API key" in err.value.body["message"]
    import httpx

    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    assert 'mmllm_requests_total{endpoint="/v1/models",status="401"} 1.0' in text
    assert "mmllm_queue_depth" in text and "mmllm_request_duration_seconds_bucket" in text


def gif_data_url(frames: int = 3, size: int = 16) -> str:
    from PIL import Image

    images = [Image.new("RGB", (size, size), (40 * i, 100, 200)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(seconds: float = 0.25, rate: int = 8000) -> str:
    import wave

    pcm = (np.sin(np.arange(int(seconds * rate)) * 0.3) * 20000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


def test_chat_with_image_audio_and_video_counts_usage(client, media_dir, tiny):
    from PIL import Image

    Image.new("RGB", (20, 12), (200, 30, 40)).save(media_dir / "red.png")
    messages = user("What are these?", png_data_url(), f"file://{media_dir / 'red.png'}")
    messages[0]["content"][:0] = [{"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
                                  {"type": "video_url", "video_url": {"url": gif_data_url()}}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=1)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    positions = {m: spec.num_tokens for m, spec in tiny.processor.modalities.items()}
    assert reply.usage.prompt_tokens > 2 * positions["image"] + positions["audio"] + positions["video"]
    assert 0 <= reply.usage.completion_tokens <= 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_matches_the_plain_answer(client):
    ask = dict(model="tiny", messages=user("Tell me a story."), max_tokens=6, temperature=1.0, seed=7)
    plain = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_chat_returns_generated_image_and_audio(client, tiny):
    from PIL import Image

    need = sum(len(tiny.signal_groups[m]) for m in ("image", "audio"))
    reply = client.chat.completions.create(
        model="tiny", messages=user("Draw a cat and let me hear it."), max_tokens=need + 2, seed=3,
        extra_body={"mmllm": {"output_modalities": ["image", "audio"], **FAST, "audio_length_in_s": 0.5,
                               "max_media": 1}})
    message = reply.choices[0].message
    media = message.model_extra["mmllm_media"]
    assert [m["type"] for m in media] == ["image"] and media[0]["mime_type"] == "image/png"
    assert Image.open(io.BytesIO(base64.b64decode(media[0]["data"]))).size == (32, 32)
    assert message.audio.format == "wav" and message.audio.transcript == message.content
    assert base64.b64decode(message.audio.data)[:4] == b"RIFF"


def test_images_generate(client, server):
    from PIL import Image

    out = client.images.generate(model="tiny", prompt="a red square", n=2, size="32x32",
                                 extra_body={"mmllm": {"num_inference_steps": 1}})
    assert len(out.data) == 2 and out.created > 0
    assert Image.open(io.BytesIO(base64.b64decode(out.data[0].b64_json))).size == (32, 32)
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(model="tiny", prompt="a red square", response_format="url")
    assert "b64_json" in err.value.body["message"]


@pytest.mark.parametrize("case, fix", [
    ("remote", "--allow-remote-media"),
    ("bad_data_url", "data URL"),
    ("not_base64", "base64"),
    ("outside_dir", "outside the allowed media folder"),
    ("unknown_model", "use 'tiny'"),
    ("too_many_tokens", "limit of 64"),
    ("over_context", "context"),
    ("bad_type", "max_tokens"),
    ("tool_role", "tool calls are not supported"),
])
def test_bad_requests_are_400_with_the_fix(client, case, fix):
    ask = dict(model="tiny", messages=user("Hi"), max_tokens=2)
    if case == "remote":
        ask["messages"] = user("Hi", "https://example.com/cat.png")
    elif case == "bad_data_url":
        ask["messages"] = user("Hi", "data:image/png,notbase64")
    elif case == "not_base64":
        ask["messages"] = user("Hi", "data:image/png;base64,@@@@")
    elif case == "outside_dir":
        ask["messages"] = user("Hi", "file:///etc/passwd")
    elif case == "unknown_model":
        ask["model"] = "gpt-4o"
    elif case == "too_many_tokens":
        ask["max_tokens"] = 65
    elif case == "over_context":
        ask["messages"] = user("word " * 600)
    elif case == "bad_type":
        ask["max_tokens"] = "many"
    elif case == "tool_role":
        ask["messages"] = [{"role": "tool", "content": "x", "tool_call_id": "1"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**ask)
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    assert fix in body["message"] and "Traceback" not in body["message"]


def test_oversized_body_is_413(server):
    reply = post(server, "/v1/chat/completions", {"model": "tiny", "messages": user("x" * 300_000)})
    assert reply.status_code == 413
    assert "--max-body-mb" in reply.json()["error"]["message"]
    assert post(server, "/v1/chat/completions", b"{not json").json()["error"]["code"] == "invalid_json"


def test_seeded_answer_is_the_same_alone_and_under_load(client):
    ask = dict(model="tiny", messages=user("Pick a word."), max_tokens=6, temperature=1.0, seed=1234)
    alone = client.chat.completions.create(**ask).choices[0].message.content
    with cf.ThreadPoolExecutor(6) as pool:
        others = [pool.submit(client.chat.completions.create, model="tiny", messages=user(f"Other {i}"),
                              max_tokens=6, temperature=1.0) for i in range(4)]
        seeded = [pool.submit(client.chat.completions.create, **ask) for _ in range(2)]
        assert [f.result().choices[0].message.content for f in seeded] == [alone, alone]
        assert all(len(f.result().choices) == 1 for f in others)
    other_seed = client.chat.completions.create(**{**ask, "seed": 99}).choices[0].message.content
    assert other_seed != alone  # the seed matters, so the equality above is a real check


def test_load_loses_no_request(server):
    def model_calls():
        return sum(s.value for s in server.app.state.metrics.batch_rows.collect()[0].samples
                   if s.name.endswith("_count"))

    before = model_calls()
    stats = run_load(server.url, "tiny", requests=16, clients=8, max_tokens=4, api_key=KEY)
    assert stats["answered"] == 16 and stats["lost"] == 0 and stats["failed"] == 0, stats["errors"]
    assert model_calls() - before < 16  # requests were batched


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(tiny):
    import httpx

    from mmllm.generation import GenerateResult

    class Held:
        """The tiny model, but each batch waits until the test opens the gate."""

        def __init__(self, model):
            self._model, self.gate, self.calls = model, threading.Event(), 0

        def __getattr__(self, name):
            return getattr(self._model, name)

        def generate_batch(self, rows, **kwargs):
            self.calls += 1
            self.gate.wait(60)
            return [GenerateResult(text="held") for _ in rows]

    held = Held(tiny)
    app = create_app(held, ServeSettings(model_name="tiny", max_queue=1, max_batch_size=1, batch_wait_s=0))
    queue = app.state.batcher
    with LocalServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="tiny", messages=user("Hi"), max_tokens=2)

        def wait_until(condition):
            deadline = time.time() + 30
            while not condition():
                assert time.time() < deadline
                time.sleep(0.01)

        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.chat.completions.create, **ask)
            wait_until(lambda: held.calls == 1)  # the worker holds the first request
            impatient = pool.submit(httpx.post, srv.url + "/v1/chat/completions", json=ask, timeout=3)
            wait_until(lambda: queue.queue_depth == 1)  # the second waits in the queue
            with pytest.raises(openai.RateLimitError) as err:
                client.chat.completions.create(**ask)
            assert err.value.body["code"] == "queue_full"
            with pytest.raises(httpx.TimeoutException):
                impatient.result()
            wait_until(lambda: queue.queue_depth == 0)  # its client left: the slot is free again
            third = pool.submit(client.chat.completions.create, **ask)
            wait_until(lambda: queue.queue_depth == 1)
            held.gate.set()
            assert first.result().choices[0].message.content == "held"
            assert third.result().choices[0].message.content == "held"
        assert held.calls == 2  # the abandoned request never reached the model


def test_stop_strings():
    assert cut_at_stop("hello world", ["wor", "xyz"]) == ("hello ", True)
    f = StopFilter(["END"])
    streamed = "".join(f.feed(p) for p in ["ab", "cE", "N", "Dzz"]) + f.flush()
    assert streamed == "abc" and f.stopped
    f = StopFilter(["END"])
    assert "".join(f.feed(p) for p in ["ab", "cE", "Nx"]) + f.flush() == "abcENx"


def test_serve_command_flags(monkeypatch):
    from mmllm import cli
    from mmllm.serve import settings_from_args

    monkeypatch.setenv("MMLLM_API_KEY", "from-env")
    args = cli.build_parser().parse_args(["serve", "--model", "tiny", "--max-batch-size", "1", "--batch-wait-ms", "2",
                                          "--max-body-mb", "1", "--allowed-local-media-path", "/data"])
    assert args.func is cli.cmd_serve and args.host == "127.0.0.1" and args.port == 8000
    settings = settings_from_args(args, "tiny")
    assert (settings.model_name, settings.api_key, settings.max_batch_size) == ("tiny", "from-env", 1)
    assert settings.batch_wait_s == 0.002 and settings.max_body_bytes == 2**20
    assert settings.allowed_local_media_path == "/data" and not settings.allow_remote_media


def test_remote_media_is_fetched_only_when_allowed_and_within_the_limit(tmp_path):
    import functools
    import http.server

    from mmllm.serve.protocol import APIError, load_part

    png = base64.b64decode(png_data_url(size=16).split(",", 1)[1])
    (tmp_path / "cat.png").write_bytes(png)
    (tmp_path / "big.png").write_bytes(png + b"\0" * 4096)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def load(url, **settings):
        part = {"type": "image_url", "image_url": {"url": url}}
        return load_part(part, "image", ServeSettings(**settings), None, "messages[0].content[0]")

    try:
        with pytest.raises(APIError, match="--allow-remote-media"):
            load(f"{base}/cat.png")
        assert load(f"{base}/cat.png", allow_remote_media=True).size == (16, 16)
        with pytest.raises(APIError, match="MB media limit") as err:
            load(f"{base}/big.png", allow_remote_media=True, max_media_bytes=len(png) + 100)
        assert err.value.status == 400 and err.value.code == "media_too_large"
        with pytest.raises(APIError, match="could not fetch"):
            load(f"{base}/missing.png", allow_remote_media=True)
        with pytest.raises(APIError, match="MB limit"):
            load(png_data_url(size=64), max_media_bytes=100)
    finally:
        httpd.shutdown()
