"""The chat logic behind ``mmllm chat``, ``mmllm generate`` and the web demo, as plain Python (no Gradio).

A conversation is a list of ``Turn``: what the user typed, the media files attached to it,
the model's reply and the media it produced. ``model_history`` turns that list into the
``history=`` argument of ``model.generate``, so earlier media stay in context;
``to_messages`` turns it into Gradio chatbot messages; ``respond`` runs one turn and
yields the growing conversation while text streams in.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmllm.media import MediaError, check_media
from mmllm.modalities import MODALITIES as _REGISTRY

log = logging.getLogger(__name__)

MODALITIES = tuple(_REGISTRY)
RESULT_FIELDS = tuple((m.name, m.result_field) for m in _REGISTRY.values())
SUFFIXES = tuple((m.name, m.file_suffixes()) for m in _REGISTRY.values())


class InputError(ValueError):
    """A user's message or upload that cannot be used; the message says why and what to do."""


@dataclass
class Settings:
    """Sampling settings for the LLM and, for models with an output side, decoder settings.

    A decoder setting left at None is not passed, so each decoder uses its own configured
    value (``DecoderConfig.options``, e.g. the toy decoders' 4 frames and guidance 3).
    """

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None  # None: a fresh random draw each turn
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    num_frames: int | None = None
    audio_length_in_s: float | None = None

    def generate_kwargs(self, output_modalities: Sequence[str] = ()) -> dict:
        """Keywords for ``model.generate``. Decoder settings go only to models that have
        decoders (a text-only LLM's ``generate`` would reject them), each only where its
        modality can be produced and only when set."""
        kwargs: dict[str, Any] = dict(max_new_tokens=int(self.max_new_tokens), temperature=float(self.temperature),
                                      top_p=float(self.top_p), seed=self.seed)
        wanted = {}
        if output_modalities:
            wanted.update(guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps)
        if "video" in output_modalities:
            wanted["num_frames"] = self.num_frames
        if "audio" in output_modalities:
            wanted["audio_length_in_s"] = self.audio_length_in_s
        kwargs.update({k: v for k, v in wanted.items() if v is not None})
        return kwargs


# Shown in the settings panel when the model's decoders do not say (e.g. a pipeline default).
FALLBACK_DECODER_SETTINGS = {"guidance_scale": 7.5, "num_inference_steps": 25, "num_frames": 16,
                             "audio_length_in_s": 5.0}


def decoder_settings(model) -> dict[str, Any]:
    """The decoder settings a model uses when none are passed, for a settings panel to
    start from: for each key, the first of its decoders that sets it (else the fallback)."""
    decoders = getattr(model, "decoders", None) or {}
    found: dict[str, Any] = {}
    for m in output_modalities(model):
        options = getattr(decoders.get(m), "options", None) or {}
        for key in FALLBACK_DECODER_SETTINGS:
            if key not in found and options.get(key) is not None:
                found[key] = options[key]
    return {**FALLBACK_DECODER_SETTINGS, **found}


@dataclass
class Limits:
    """What uploads may be: at most ``max_upload_mb`` each, inside one of ``roots``
    (the upload temp dir and the examples dir; empty means anywhere, as in the terminal)."""

    max_upload_mb: float = 20.0
    roots: tuple[str, ...] = ()


@dataclass
class Turn:
    text: str
    media: dict[str, list[str]] = field(default_factory=dict)  # modality -> checked file paths
    reply: str = ""
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (modality, saved file path)
    error: str | None = None  # set when the turn failed; failed turns are not sent to the model
    done: bool = False


# --------------------------------------------------------------------------- model facts


def input_modalities(model) -> tuple[str, ...]:
    """The media the model reads, in ``MODALITIES`` order."""
    names = getattr(model, "input_modalities", None)
    if names is None:
        names = tuple(model.config.inputs)
    return tuple(m for m in MODALITIES if m in names)


def output_modalities(model) -> tuple[str, ...]:
    return tuple(getattr(model, "output_modalities", ()) or ())


def placeholder(model, modality: str) -> str:
    return model.config.inputs[modality].placeholder


# --------------------------------------------------------------------------- uploads


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


def _is_animated(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:  # undecodable: let the image check below say so
        return False


def modality_of(path: str | os.PathLike) -> str:
    """The modality a file's suffix names; an animated GIF counts as video, a still one as an image."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return "video" if _is_animated(path) else "image"
    for modality, suffixes in SUFFIXES:
        if suffix in suffixes:
            return modality
    kinds = "; ".join(f"{m}: {' '.join(s)}" for m, s in SUFFIXES)
    raise InputError(f"{path.name}: unsupported file type {suffix or '(no suffix)'!r}; attach one of {kinds}")


def _inside(path: Path, roots: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots)


def check_upload(path: str | os.PathLike, limits: Limits, accepted: Sequence[str]) -> str:
    """-> the file's modality, after checking where it is, its type, its size and that it decodes.

    Raises ``InputError`` with a message for the user otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path.name}: file not found; attach it again")
    if limits.roots and not _inside(path, limits.roots):
        raise InputError(f"{path.name}: files must be uploaded through the page")
    modality = modality_of(path)
    size = path.stat().st_size
    if size > limits.max_upload_mb * 1e6:
        raise InputError(f"{path.name} is {_mb(size)}; the upload limit is {limits.max_upload_mb:g} MB")
    if modality not in accepted:
        reads = ", ".join(accepted) if accepted else "text only"
        raise InputError(f"{path.name}: this model cannot read {modality}; it reads {reads}")
    try:
        check_media(path, modality)
    except MediaError as err:
        raise InputError(f"{path.name}: not a readable {modality} file ({hide_paths(str(err), [path])})") from err
    return modality


def hide_paths(message: str, paths) -> str:
    """``message`` with each of ``paths`` shown by its file name only: the server's upload
    folders are not the user's business."""
    for path in sorted({str(p) for p in paths}, key=len, reverse=True):
        message = message.replace(path, Path(path).name)
    return message


def make_turn(model, message: dict | str | None, limits: Limits) -> Turn:
    """A checked ``Turn`` from a ``{"text", "files"}`` message (Gradio's MultimodalTextbox value)."""
    if isinstance(message, str) or message is None:
        message = {"text": message or "", "files": []}
    text = (message.get("text") or "").strip()
    files = [f["path"] if isinstance(f, dict) else f for f in (message.get("files") or [])]
    if not text and not files:
        raise InputError("the message is empty; type a question or attach a file")
    if not text:
        raise InputError("add some text to go with the file, e.g. 'Describe this.'")
    accepted = input_modalities(model)
    media: dict[str, list[str]] = {}
    for f in files:
        media.setdefault(check_upload(f, limits, accepted), []).append(str(f))
    return Turn(text=text, media=media)


# --------------------------------------------------------------------------- conversation


def model_history(model, turns: Sequence[Turn]) -> list[dict]:
    """``history=`` for ``model.generate``: every finished turn, with its media and one
    placeholder per item, those the user did not type put at the start of the user's text
    (as ``generate`` does for the current turn). Failed turns are left out."""
    history = []
    for turn in turns:
        if turn.error is not None or not turn.done:
            continue
        missing = {m: len(paths) - turn.text.count(placeholder(model, m)) for m, paths in turn.media.items()}
        prefix = "".join((placeholder(model, m) + "\n") * n for m, n in missing.items() if n > 0)
        user: dict[str, Any] = {"role": "user", "content": prefix + turn.text}
        user.update({m: list(paths) for m, paths in turn.media.items()})
        history += [user, {"role": "assistant", "content": turn.reply}]
    return history


def preview_path(path: str | os.PathLike) -> Path:
    """Where ``save_outputs`` puts the enlarged copy of a small picture or clip saved at ``path``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.preview{path.suffix}")


def shown_path(path: str | os.PathLike) -> str:
    """The file to show a person for an output saved at ``path``: its enlarged preview when
    there is one (a 32 x 32 picture is too small to judge), else the file itself."""
    preview = preview_path(path)
    return str(preview) if preview.is_file() else str(path)


def save_outputs(result, out_dir: str | os.PathLike, previews: bool = False) -> list[tuple[str, str]]:
    """Save each medium in ``result`` under ``out_dir`` -> [(modality, path)]. With ``previews``,
    a picture or clip smaller than ``pipelines.media.PREVIEW_SIDE`` pixels a side also gets an
    enlarged, nearest-neighbour copy beside it (``preview_path``) to look at; the saved file
    keeps the generated pixels."""
    out_dir = Path(out_dir)
    saved = []
    stem = uuid.uuid4().hex[:8]
    for modality, attr in RESULT_FIELDS:
        for i, item in enumerate(getattr(result, attr, None) or []):
            out_dir.mkdir(parents=True, exist_ok=True)
            path = item.save(out_dir / f"{stem}-{modality}-{i}")  # returns the path written (suffix chosen by save)
            saved.append((modality, str(path)))
            enlarged = item.preview() if previews and hasattr(item, "preview") else item
            if enlarged is not item:  # the same kind of item saves with the same suffix as the original
                enlarged.save(preview_path(path))
    return saved


def to_messages(turns: Sequence[Turn]) -> list[dict]:
    """Gradio chatbot messages: text, then each attached or generated file inline."""
    messages: list[dict] = []
    for turn in turns:
        if turn.text:
            messages.append({"role": "user", "content": turn.text})
        for paths in turn.media.values():
            messages += [{"role": "user", "content": {"path": p}} for p in paths]
        if turn.error is not None:
            messages.append({"role": "assistant", "content": f"⚠️ {turn.error}"})
            continue
        if turn.reply or not turn.done:
            messages.append({"role": "assistant", "content": turn.reply or "…"})
        messages += [{"role": "assistant", "content": {"path": p}} for _, p in turn.outputs]
    return messages


def run_turn(model, turn: Turn, history: list[dict], settings: Settings, out_dir,
             previews: bool = False) -> Iterator[Turn]:
    """Stream one turn: yields ``turn`` after each text piece; at the end its reply is the
    full text, its outputs are saved under ``out_dir`` and ``done`` is set. Errors are
    raised to the caller."""
    media = {m: (paths if len(paths) > 1 else paths[0]) for m, paths in turn.media.items()}
    stream = model.generate(turn.text, history=history, stream=True, **media,
                            **settings.generate_kwargs(output_modalities(model)))
    for piece in stream:
        turn.reply += piece
        yield turn
    result = stream.result
    turn.reply = result.text
    turn.outputs = save_outputs(result, out_dir, previews)
    turn.done = True
    yield turn


def respond(model, message, turns: list[Turn], settings: Settings, limits: Limits,
            out_dir) -> Iterator[tuple[list[dict], list[Turn]]]:
    """One chat turn: yields ``(chatbot messages, turns)`` as the reply streams in.

    Bad input (empty message, unsupported, too large or corrupt file) and failed generation
    end the turn with an error message in the chat instead of an exception; such turns are
    kept out of the model's context.
    """
    turns = list(turns)
    try:
        turn = make_turn(model, message, limits)
    except InputError as err:
        text = message.get("text", "") if isinstance(message, dict) else (message or "")
        turns.append(Turn(text=(text or "").strip(), error=str(err), done=True))
        yield to_messages(turns), turns
        return
    yield from _stream(model, turn, turns, settings, out_dir)


def retry(model, turns: list[Turn], settings: Settings, out_dir) -> Iterator[tuple[list[dict], list[Turn]]]:
    """Answer the last user message again (with a new sample when temperature > 0)."""
    turns = list(turns)
    if not turns:
        yield to_messages(turns), turns
        return
    last = turns.pop()
    if last.error is not None and not any(last.media.values()) and not last.text:
        yield to_messages(turns), turns
        return
    yield from _stream(model, Turn(text=last.text, media=last.media), turns, settings, out_dir)


def undo(turns: list[Turn]) -> tuple[list[Turn], dict]:
    """Drop the last turn -> (turns, the dropped message as a ``{"text", "files"}`` value to edit)."""
    turns = list(turns)
    if not turns:
        return turns, {"text": "", "files": []}
    last = turns.pop()
    return turns, {"text": last.text, "files": [p for paths in last.media.values() for p in paths]}


def _stream(model, turn: Turn, turns: list[Turn], settings: Settings, out_dir):
    history = model_history(model, turns)
    turns.append(turn)
    try:
        for _ in run_turn(model, turn, history, settings, out_dir):
            yield to_messages(turns), turns
    except ValueError as err:  # MediaError is a ValueError: a file the model's loaders rejected
        paths = [p for t in turns for ps in t.media.values() for p in ps]
        turn.error, turn.done = hide_paths(str(err), paths), True
        yield to_messages(turns), turns
    except Exception as err:  # keep the page usable; the log keeps the traceback
        log.exception("generation failed")
        paths = [p for t in turns for ps in t.media.values() for p in ps]
        turn.error, turn.done = hide_paths(f"generation failed: {type(err).__name__}: {err}", paths), True
        yield to_messages(turns), turns
