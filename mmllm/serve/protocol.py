"""OpenAI wire format <-> mmllm: messages and content parts in, choices and media out.

Nothing here imports FastAPI; the functions take and return plain dicts and raise
``APIError`` with the HTTP status, an OpenAI error type and a message that says the fix.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .settings import ServeSettings

# Content-part type -> the modality it carries.
PART_MODALITY = {"image_url": "image", "input_audio": "audio", "audio_url": "audio", "video_url": "video"}
SUFFIX_OF_MIME = {
    "image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/gif": ".gif", "image/webp": ".webp",
    "image/bmp": ".bmp", "image/tiff": ".tiff",
    "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav", "audio/vnd.wave": ".wav", "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3", "audio/flac": ".flac", "audio/x-flac": ".flac", "audio/ogg": ".ogg",
    "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-msvideo": ".avi",
}
AUDIO_FORMATS = {"wav": ".wav", "mp3": ".mp3", "flac": ".flac", "ogg": ".ogg"}
MEDIA_FIELD = "mmllm_media"  # extension field of an assistant message: generated images and videos
AUDIO_TTL_S = 3600  # message.audio.expires_at: the server keeps nothing, so this is informational


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# --------------------------------------------------------------------------- media in


def _suffix_for(mime: str, modality: str, param: str) -> str:
    mime = mime.lower().split(";")[0].strip()
    if mime == "image/gif" and modality == "video":
        return ".gif"
    suffix = SUFFIX_OF_MIME.get(mime)
    if suffix is None:
        raise bad_request(f"{param}: media type {mime or '(none)'!r} is not supported; use one of "
                          f"{sorted(SUFFIX_OF_MIME)}", param, "unsupported_media_type")
    return suffix


def _data_url(url: str, modality: str, limit: int, param: str) -> tuple[bytes, str]:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise bad_request(f"{param}: a data URL must look like 'data:<mime type>;base64,<data>'", param,
                          "invalid_data_url")
    if len(payload) * 3 // 4 > limit:
        raise bad_request(f"{param}: the media is over this server's {limit / 2**20:g} MB limit; send a smaller file",
                          param, "media_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data URL's payload is not valid base64", param, "invalid_data_url") from None
    if not data:
        raise bad_request(f"{param}: the data URL is empty", param, "invalid_data_url")
    return data, _suffix_for(head[5:-7], modality, param)


def _local_file(url: str, settings: ServeSettings, param: str) -> Path:
    root = settings.allowed_local_media_path
    if not root:
        raise bad_request(f"{param}: local files are off on this server; send a data URL, or start the server with "
                          "--allowed-local-media-path DIR", param, "local_media_disabled")
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise bad_request(f"{param}: {str(path)!r} is outside the allowed media folder {root!r}", param,
                          "local_media_forbidden")
    if not path.is_file():
        raise bad_request(f"{param}: file {str(path)!r} does not exist", param, "media_not_found")
    if path.stat().st_size > settings.max_media_bytes:
        raise bad_request(f"{param}: {str(path)!r} is over this server's {settings.max_media_bytes / 2**20:g} MB "
                          "media limit", param, "media_too_large")
    return path


def _remote(url: str, modality: str, settings: ServeSettings, param: str) -> tuple[bytes, str]:
    if not settings.allow_remote_media:
        raise bad_request(f"{param}: this server does not fetch http(s) URLs; send the media as a data URL "
                          "(data:<mime type>;base64,...), or start the server with --allow-remote-media", param,
                          "remote_media_disabled")
    limit = settings.max_media_bytes
    try:
        with urllib.request.urlopen(url, timeout=settings.remote_timeout_s) as reply:  # noqa: S310 (http(s) only)
            data = reply.read(limit + 1)
            mime = reply.headers.get_content_type() or ""
    except Exception as err:
        raise bad_request(f"{param}: could not fetch {url!r} ({type(err).__name__}: {err})", param,
                          "media_fetch_failed") from None
    if len(data) > limit:
        raise bad_request(f"{param}: {url!r} is over this server's {limit / 2**20:g} MB media limit", param,
                          "media_too_large")
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    if mime in SUFFIX_OF_MIME or (mime == "image/gif"):
        suffix = _suffix_for(mime, modality, param)
    return data, suffix


def load_part(part: dict, modality: str, settings: ServeSettings, sample_rate: int | None, param: str):
    """One content part -> a decoded medium mmllm takes (RGB PIL image, float32 wave, uint8 frames)."""
    from ..media import MediaError, load_audio, load_image, load_video

    kind = part["type"]
    body = part.get(kind)
    if kind == "input_audio":
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise bad_request(f"{param}: input_audio needs {{'data': <base64>, 'format': 'wav'}}", param)
        fmt = str(body.get("format", "wav")).lower()
        if fmt not in AUDIO_FORMATS:
            raise bad_request(f"{param}: audio format {fmt!r} is not supported; use one of {sorted(AUDIO_FORMATS)}",
                              param, "unsupported_media_type")
        mime = {"mp3": "audio/mpeg"}.get(fmt, f"audio/{fmt}")
        url = f"data:{mime};base64,{body['data']}"
    else:
        url = body.get("url") if isinstance(body, dict) else body
        if not isinstance(url, str) or not url:
            raise bad_request(f"{param}: a {kind} part needs {{'url': 'data:...' }}", param)
    scheme = url.split(":", 1)[0].lower()
    path = None
    if scheme == "data":
        data, suffix = _data_url(url, modality, settings.max_media_bytes, param)
    elif scheme == "file":
        path = _local_file(url, settings, param)
    elif scheme in ("http", "https"):
        data, suffix = _remote(url, modality, settings, param)
    else:
        raise bad_request(f"{param}: URL scheme {scheme!r} is not supported; send a data URL", param,
                          "unsupported_url")
    try:
        with tempfile.TemporaryDirectory(prefix="mmllm-serve-") as tmp:
            if path is None:
                path = Path(tmp) / f"media{suffix}"
                path.write_bytes(data)
            if modality == "image":
                return load_image(path)
            if modality == "audio":
                return load_audio(path, sample_rate)
            return load_video(path)
    except MediaError as err:
        raise bad_request(f"{param}: {str(err).replace(str(path), 'the ' + modality)}", param, "invalid_media") from None


# --------------------------------------------------------------------------- messages


def _text_of(part: dict, param: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{param}: a text part needs a 'text' string", param)
    return text


def to_conversation(model, messages: list, settings: ServeSettings) -> dict:
    """OpenAI ``messages`` -> an mmllm request ``{"prompt", "history", "image", "audio", "video"}``.

    System (and developer) and assistant turns, and every user turn but the last, become
    ``history``; the last message must be the user's and becomes ``prompt``. Each media part
    puts the model's placeholder where it stands among the text parts.
    """
    if not messages:
        raise bad_request("messages is empty; send at least one user message", "messages")
    specs = model.processor.modalities if model.processor else {}
    turns = []
    for i, msg in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{param} must be an object with 'role' and 'content'", param)
        role = msg.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"{param}: role {role!r} is not supported; use system, user or assistant "
                              "(tool calls are not supported)", f"{param}.role")
        content = msg.get("content")
        media: dict[str, list] = {}
        if content is None:
            content = ""
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                pparam = f"{param}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" or (kind == "refusal" and role == "assistant"):
                    pieces.append(_text_of(part, pparam) if kind == "text" else str(part.get("refusal", "")))
                elif kind in PART_MODALITY:
                    modality = PART_MODALITY[kind]
                    if role != "user":
                        raise bad_request(f"{pparam}: only user messages may carry media", pparam)
                    if modality not in specs:
                        raise bad_request(f"{pparam}: this model cannot read {modality}; it reads "
                                          f"{sorted(specs) or 'text only'}", pparam, "unsupported_modality")
                    rate = getattr(specs[modality].encoder, "sample_rate", None) if modality == "audio" else None
                    media.setdefault(modality, []).append(load_part(part, modality, settings, rate, pparam))
                    pieces.append(specs[modality].placeholder)
                else:
                    raise bad_request(f"{pparam}: content part type {kind!r} is not supported; use text, image_url, "
                                      "input_audio or video_url", pparam)
            text = "\n".join(pieces)
        else:
            raise bad_request(f"{param}.content must be a string or a list of content parts", f"{param}.content")
        turns.append({"role": role, "content": text, **media})
    last = turns[-1]
    if last["role"] != "user":
        raise bad_request("the last message must be the user's; this server does not continue an assistant "
                          "message", f"messages[{len(turns) - 1}].role")
    request = {"prompt": last["content"], "history": turns[:-1]}
    for modality in specs:
        if last.get(modality):
            request[modality] = last[modality]
    return request


def prompt_tokens(model, request: dict) -> int:
    """Length of the request's prompt in LLM positions (media placeholders expanded)."""
    from ..generation import build_request

    media = {k: request.get(k) for k in ("image", "audio", "video")}
    messages, _ = build_request(model, request["prompt"], media, request.get("history"))
    proc = model.processor
    return len(proc.expand(proc.tokenize(proc.render(messages, add_generation_prompt=True))))


def context_length(model) -> int:
    limit = getattr(model.config, "max_length", None)
    if limit:
        return int(limit)
    return int(getattr(model.llm.config, "max_position_embeddings", 2048))


# --------------------------------------------------------------------------- media out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_image(item) -> str:
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")
    return _b64(buf.getvalue())


def encode_saved(item) -> tuple[str, str]:
    """An output with ``save(path)`` -> (base64 bytes, mime type) of the file it writes."""
    with tempfile.TemporaryDirectory(prefix="mmllm-serve-") as tmp:
        path = Path(item.save(Path(tmp) / "out"))
        mime = {".wav": "audio/wav", ".mp4": "video/mp4", ".gif": "image/gif", ".png": "image/png"}.get(
            path.suffix.lower(), "application/octet-stream")
        return _b64(path.read_bytes()), mime


def media_fields(result, transcript: str) -> dict:
    """``message.audio`` (first clip, OpenAI's shape) and ``message.mmllm_media`` (the rest)."""
    out: dict[str, Any] = {}
    extra = [{"type": "image", "mime_type": "image/png", "data": encode_image(im)} for im in result.images]
    for clip in result.videos:
        data, mime = encode_saved(clip)
        extra.append({"type": "video", "mime_type": mime, "data": data})
    for i, clip in enumerate(result.audio):
        data, mime = encode_saved(clip)
        if i == 0:
            out["audio"] = {"id": f"audio_{uuid.uuid4().hex}", "data": data, "format": "wav",
                            "expires_at": int(time.time()) + AUDIO_TTL_S, "transcript": transcript}
        else:
            extra.append({"type": "audio", "mime_type": mime, "data": data})
    if extra:
        out[MEDIA_FIELD] = extra
    return out


# --------------------------------------------------------------------------- text out


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class StopFilter:
    """Streams text while holding back what could be the start of a stop string."""

    stop: list[str]
    seen: str = ""
    sent: int = 0
    stopped: bool = False
    hold: int = field(init=False)

    def __post_init__(self):
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.seen += piece
        text, self.stopped = cut_at_stop(self.seen, self.stop)
        end = len(text) if self.stopped else max(self.sent, len(text) - self.hold)
        out, self.sent = text[self.sent:end], end
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self.sent = self.seen[self.sent:], len(self.seen)
        return out
