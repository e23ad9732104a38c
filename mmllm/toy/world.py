"""A tiny procedural world of images, sounds, videos and the words that describe them.

mmllm's shipped default model is trained on this world: its encoders and decoders are toy
ones, so the whole system runs on a CPU with nothing to download, and every answer and every
generated medium can be scored exactly. Everything is a pure function
of a spec (and, for variety, an optional ``numpy.random.Generator``), deterministic,
numpy-only and fast: a 32x32 image renders in well under a millisecond.

Media
-----
- **Image** (``ImageSpec``): ``count`` (1-3) identical shapes of one ``colour``, ``shape``
  and ``size`` on a black background. The canvas is a 3x3 grid of cells; the group sits
  on the line through its ``position`` anchor (left/right/center: a vertical line,
  top/bottom: a horizontal one), one cell apart, so its centroid is the anchor.
  ``render_image(spec, size=32) -> uint8 (H, W, 3)``.
- **Audio** (``AudioSpec``): ``count`` (1-3) beeps at a ``pitch`` (low 220 Hz, medium
  440 Hz, high 880 Hz) with a ``timbre``: ``pure`` (sine), ``hollow`` (square: odd
  harmonics) or ``buzzy`` (sawtooth: all harmonics), synthesised band-limited so
  nothing aliases. ``render_audio(spec, sample_rate=16000, seconds=1.0) -> float32 (S,)``.
- **Video** (``VideoSpec``): one large shape of a ``colour`` moving in a ``direction``
  (up/down/left/right) across the frame. ``render_video(spec, size=32, frames=8)
  -> uint8 (T, H, W, 3)``.

Splits and held-out combinations
--------------------------------
Each modality holds out some pairs of attribute values (``HOLDOUTS``): colour x shape
for images, pitch x count for audio, colour x direction for video. ``split="train"``
never draws a held-out pair, ``split="test"`` draws only held-out pairs (every value of
each attribute is still seen in training, only the combination is new), and
``split="all"`` draws anything. This measures compositional generalisation.

Text
----
``caption(spec, rng=None)`` gives the canonical caption (``rng=None``, e.g. "a small
red circle on the left") or a random phrasing; ``question_answer`` asks about one
attribute; ``generation_request`` asks for media ("draw a red circle").

Conversation and generation-marker convention
---------------------------------------------
Dialogues are LLaVA-style dicts (JSON-serialisable)::

    {"id": "toy-train-000003",
     "image": {"modality": "image", "colour": "red", ...},   # input media: a spec dict; in
                                                              # write_dataset's JSON a path
                                                              # relative to the root, with the
                                                              # spec under "image_spec"
     "conversations": [
        {"from": "human", "value": "<image>\\nWhat colour is the shape?"},
        {"from": "gpt",   "value": "It is red."},
        {"from": "human", "value": "Now play two high beeps with a pure tone."},
        {"from": "gpt",   "value": "Here are two high beeps with a pure tone. <gen:audio>"}],
     "outputs": [{"turn": 3, "modality": "audio",
                  "spec": {"modality": "audio", ...},
                  "caption": "two high beeps with a pure tone"}]}

- Input media: at most one per modality per dialogue, under the key ``"image"``,
  ``"audio"`` or ``"video"``; its placeholder (``<image>``, ``<audio>``, ``<video>``,
  see ``INPUT_PLACEHOLDERS``) appears exactly once, at the start of the human turn that
  introduces it, followed by ``"\\n"`` (LLaVA's convention).
- Output media: an assistant turn that produces media ends with the marker
  ``<gen:MODALITY>`` (``gen_marker(modality)``), exactly once per produced item. The
  training code replaces the marker with that modality's signal tokens
  (``[IMG0..k]`` ...). ``sample["outputs"]`` lists the produced items in marker order:
  ``turn`` (index into ``conversations``), ``modality``, ``spec`` (ground truth for the
  oracles) and ``caption`` (the canonical caption: the decoding-side target text whose
  frozen-decoder text embedding is the L2 target).

Data set builders return plain Python objects; ``write_dataset`` writes PNG / WAV /
NPZ files plus JSONL pairs and a LLaVA JSON with media paths relative to the root.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np

# --------------------------------------------------------------------------- vocabulary

MODALITIES = ("image", "audio", "video")
SPLITS = ("train", "test", "all")

# (name, RGB). Chosen far apart in RGB and in hue so that a blurred (darkened) edge still
# maps back to its colour; see oracle._nearest_colour.
PALETTE = (
    ("red", (220, 30, 30)),
    ("green", (30, 190, 40)),
    ("blue", (40, 70, 240)),
    ("yellow", (240, 220, 30)),
    ("purple", (160, 50, 210)),
    ("orange", (250, 135, 0)),
)
COLOURS = tuple(name for name, _ in PALETTE)
BACKGROUND = (0, 0, 0)

SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)

PITCHES = ("low", "medium", "high")
PITCH_HZ = (("low", 220.0), ("medium", 440.0), ("high", 880.0))
TIMBRES = ("pure", "hollow", "buzzy")  # sine, square, sawtooth
DIRECTIONS = ("up", "down", "left", "right")

# Shape extent (edge to edge) as a fraction of one grid cell (image side / 3). The gap
# between large neighbours (>= 2 px at size 32) keeps them separate under mild blur.
SIZE_CELL_FRACTION = (("small", 0.5), ("large", 0.75))
CROSS_ARM = 0.34  # cross arm half-width, as a fraction of the half-extent
VIDEO_EXTENT = 0.3  # video shape extent as a fraction of the frame side
VIDEO_TRAVEL = (0.25, 0.75)  # start / end of the centre along the motion axis (fraction)

INPUT_PLACEHOLDERS = (("image", "<image>"), ("audio", "<audio>"), ("video", "<video>"))


def gen_marker(modality: str) -> str:
    """The marker ending an assistant turn that produces ``modality`` media."""
    _check_modality(modality)
    return f"<gen:{modality}>"


def input_placeholder(modality: str) -> str:
    _check_modality(modality)
    return dict(INPUT_PLACEHOLDERS)[modality]


# --------------------------------------------------------------------------- specs


def _check_value(field_name: str, value: Any, valid: Sequence) -> None:
    if value not in valid:
        raise ValueError(f"{field_name}={value!r} is not in the toy world; use one of {list(valid)}")


def _check_modality(modality: str) -> None:
    _check_value("modality", modality, MODALITIES)


class _Spec:
    modality: ClassVar[str]

    def to_dict(self) -> dict:
        return {"modality": self.modality, **dataclasses.asdict(self)}  # type: ignore[arg-type]

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ImageSpec(_Spec):
    colour: str
    shape: str
    size: str = "large"
    position: str = "center"
    count: int = 1
    modality: ClassVar[str] = "image"

    def __post_init__(self):
        _check_value("colour", self.colour, COLOURS)
        _check_value("shape", self.shape, SHAPES)
        _check_value("size", self.size, SIZES)
        _check_value("position", self.position, POSITIONS)
        _check_value("count", self.count, COUNTS)


@dataclass(frozen=True)
class AudioSpec(_Spec):
    pitch: str
    timbre: str = "pure"
    count: int = 1
    modality: ClassVar[str] = "audio"

    def __post_init__(self):
        _check_value("pitch", self.pitch, PITCHES)
        _check_value("timbre", self.timbre, TIMBRES)
        _check_value("count", self.count, COUNTS)


@dataclass(frozen=True)
class VideoSpec(_Spec):
    colour: str
    shape: str
    direction: str
    modality: ClassVar[str] = "video"

    def __post_init__(self):
        _check_value("colour", self.colour, COLOURS)
        _check_value("shape", self.shape, SHAPES)
        _check_value("direction", self.direction, DIRECTIONS)


Spec = Union[ImageSpec, AudioSpec, VideoSpec]
SPEC_CLASSES = (("image", ImageSpec), ("audio", AudioSpec), ("video", VideoSpec))


def spec_class(modality: str) -> type:
    _check_modality(modality)
    return dict(SPEC_CLASSES)[modality]


def spec_from_dict(data: dict) -> Spec:
    """Inverse of ``Spec.to_dict``: ``{"modality": "image", "colour": ...}`` -> ``ImageSpec``."""
    if "modality" not in data:
        raise KeyError(f"spec dict {data!r} has no 'modality' key; add one of {list(MODALITIES)}")
    fields = {k: v for k, v in data.items() if k != "modality"}
    return spec_class(data["modality"])(**fields)


def attribute_values(modality: str) -> dict[str, tuple]:
    """Attribute name -> its possible values, in spec field order (a fresh dict)."""
    _check_modality(modality)
    if modality == "image":
        return {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "count": COUNTS}
    if modality == "audio":
        return {"pitch": PITCHES, "timbre": TIMBRES, "count": COUNTS}
    return {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}


# --------------------------------------------------------------------------- held-out combinations


@dataclass(frozen=True)
class Holdout:
    """Pairs of values of two attributes that the train split never shows together."""

    modality: str
    attributes: tuple[str, str]
    pairs: tuple[tuple[Any, Any], ...]


# One held-out partner per shape / pitch / count / direction, so every single value is
# still seen in training; only the combination is new.
HOLDOUTS = (
    Holdout("image", ("colour", "shape"),
            (("red", "triangle"), ("green", "square"), ("blue", "cross"), ("yellow", "circle"))),
    Holdout("audio", ("pitch", "count"), (("low", 3), ("medium", 1), ("high", 2))),
    Holdout("video", ("colour", "direction"),
            (("red", "up"), ("green", "down"), ("blue", "left"), ("yellow", "right"))),
)


def holdout_for(modality: str) -> Holdout:
    _check_modality(modality)
    return next(h for h in HOLDOUTS if h.modality == modality)


def is_held_out(spec: Spec) -> bool:
    """True when ``spec`` shows one of its modality's held-out value pairs."""
    h = holdout_for(spec.modality)
    return tuple(getattr(spec, a) for a in h.attributes) in h.pairs


def in_split(spec: Spec, split: str) -> bool:
    _check_value("split", split, SPLITS)
    if split == "all":
        return True
    return is_held_out(spec) == (split == "test")


def _allowed_pairs(modality: str, split: str) -> list[tuple]:
    _check_value("split", split, SPLITS)
    h = holdout_for(modality)
    values = attribute_values(modality)
    a, b = h.attributes
    every = [(x, y) for x in values[a] for y in values[b]]
    if split == "all":
        return every
    if split == "test":
        return list(h.pairs)
    return [p for p in every if p not in h.pairs]


# --------------------------------------------------------------------------- sampling


def sample_spec(rng: np.random.Generator, modality: str, split: str = "train") -> Spec:
    """A uniformly random spec of ``modality`` from ``split`` (uniform over allowed pairs,
    then uniform over the other attributes, in field order: reproducible given ``rng``)."""
    h = holdout_for(modality)
    pairs = _allowed_pairs(modality, split)
    pair = pairs[int(rng.integers(len(pairs)))]
    fields = dict(zip(h.attributes, pair))
    for name, values in attribute_values(modality).items():
        if name not in fields:
            fields[name] = values[int(rng.integers(len(values)))]
    return spec_class(modality)(**fields)


def sample_image_spec(rng: np.random.Generator, split: str = "train") -> ImageSpec:
    return sample_spec(rng, "image", split)  # type: ignore[return-value]


def sample_audio_spec(rng: np.random.Generator, split: str = "train") -> AudioSpec:
    return sample_spec(rng, "audio", split)  # type: ignore[return-value]


def sample_video_spec(rng: np.random.Generator, split: str = "train") -> VideoSpec:
    return sample_spec(rng, "video", split)  # type: ignore[return-value]


def all_specs(modality: str, split: str = "all") -> list[Spec]:
    """Every spec of ``modality`` in ``split`` (image: 720 in all; audio: 27; video: 96)."""
    values = attribute_values(modality)
    specs = [spec_class(modality)(**dict(zip(values, combo))) for combo in itertools.product(*values.values())]
    return [s for s in specs if in_split(s, split)]


# --------------------------------------------------------------------------- image rendering


def palette_rgb(colour: str) -> tuple[int, int, int]:
    _check_value("colour", colour, COLOURS)
    return dict(PALETTE)[colour]


def shape_mask_unit(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v) in ``shape`` inscribed in the square [-1, 1]^2.

    v grows downwards (image rows). The triangle points up with its base on v = 1.
    Shared by the renderer and by the oracle's template matching.
    """
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return inside
    if shape == "triangle":
        return inside & (np.abs(u) <= (v + 1) / 2)
    if shape == "cross":
        return inside & ((np.abs(u) <= CROSS_ARM) | (np.abs(v) <= CROSS_ARM))
    raise ValueError(f"shape={shape!r} is not in the toy world; use one of {list(SHAPES)}")


def shape_extent_px(fraction: float, length: float) -> int:
    """Edge-to-edge extent in whole pixels (>= 3) of a shape spanning ``fraction`` of ``length``."""
    return max(3, int(round(fraction * length)))


def _draw_shape(canvas: np.ndarray, shape: str, cx: float, cy: float, extent: int, rgb) -> None:
    """Paint ``shape`` into ``canvas`` (H, W, 3) in place, in an ``extent`` x ``extent``
    pixel box whose centre is (cx, cy) rounded so the box starts on a whole pixel (x right,
    y down). Snapping keeps every shape symmetric in its box, so a clean rendering matches
    the oracle's template for that box exactly. Pixels are sampled at their centres."""
    h, w = canvas.shape[:2]
    half = extent / 2
    x0, y0 = round(cx - half), round(cy - half)
    ys = (np.arange(h) + 0.5 - (y0 + half)) / half  # (H,) in (-1, 1) inside the box
    xs = (np.arange(w) + 0.5 - (x0 + half)) / half  # (W,)
    mask = shape_mask_unit(shape, xs[None, :], ys[:, None])  # (H, W)
    canvas[mask] = rgb


def position_anchor(position: str, size: int) -> tuple[float, float]:
    """(x, y) in pixels of the centre of ``position``'s cell in the 3x3 grid."""
    _check_value("position", position, POSITIONS)
    col, row = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}[position]
    cell = size / 3
    return ((col + 0.5) * cell, (row + 0.5) * cell)


def object_centres(spec: ImageSpec, size: int) -> list[tuple[float, float]]:
    """Centres of the ``spec.count`` shapes: one cell apart on the line through the anchor
    (vertical for left/right/center, horizontal for top/bottom), centred on it."""
    ax, ay = position_anchor(spec.position, size)
    cell = size / 3
    dx, dy = (cell, 0.0) if spec.position in ("top", "bottom") else (0.0, cell)
    offsets = [k - (spec.count - 1) / 2 for k in range(spec.count)]
    return [(ax + o * dx, ay + o * dy) for o in offsets]


def render_image(spec: ImageSpec, size: int = 32, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Render ``spec`` as a ``uint8 (size, size, 3)`` RGB image on a black background.

    With ``rng`` each shape moves by up to 0.08 cell in x and y (variety for training);
    without it the image is the spec's canonical rendering.
    """
    if size < 12:
        raise ValueError(f"size={size} is too small to draw 3 shapes per row; use size >= 12 (default 32)")
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND
    cell = size / 3
    extent = shape_extent_px(dict(SIZE_CELL_FRACTION)[spec.size], cell)
    for cx, cy in object_centres(spec, size):
        if rng is not None:
            cx, cy = cx + rng.uniform(-0.08, 0.08) * cell, cy + rng.uniform(-0.08, 0.08) * cell
        _draw_shape(canvas, spec.shape, cx, cy, extent, palette_rgb(spec.colour))
    return canvas


# --------------------------------------------------------------------------- audio rendering


def pitch_hz(pitch: str) -> float:
    _check_value("pitch", pitch, PITCHES)
    return dict(PITCH_HZ)[pitch]


def _tone(timbre: str, freq: float, t: np.ndarray, sample_rate: int) -> np.ndarray:
    """Band-limited additive synthesis, peak-normalised to 1: sine; square (odd harmonics
    at 1/k); sawtooth (all harmonics at 1/k). Only harmonics below Nyquist are summed."""
    _check_value("timbre", timbre, TIMBRES)
    n_harm = max(1, int((sample_rate / 2 - 1) // freq))
    if timbre == "pure":
        ks = [1]
    elif timbre == "hollow":
        ks = [k for k in range(1, n_harm + 1) if k % 2 == 1]
    else:
        ks = list(range(1, n_harm + 1))
    x = sum(np.sin(2 * np.pi * k * freq * t) / k for k in ks)
    return x / np.max(np.abs(x))


def beep_times(count: int, seconds: float) -> list[tuple[float, float]]:
    """(start, end) in seconds of each beep: 0.18 s long (scaled with ``seconds``), onsets
    0.31 s apart, the group centred in the clip."""
    dur, spacing = 0.18 * seconds, 0.31 * seconds
    centres = [seconds / 2 + (k - (count - 1) / 2) * spacing for k in range(count)]
    return [(c - dur / 2, c + dur / 2) for c in centres]


def render_audio(spec: AudioSpec, sample_rate: int = 16000, seconds: float = 1.0,
                 rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Render ``spec`` as a mono ``float32 (round(sample_rate * seconds),)`` waveform.

    Each beep has a 10 ms raised-cosine attack and release and peak amplitude 0.5. With
    ``rng``: amplitude in [0.35, 0.6], onsets moved by up to 20 ms, pitch detuned by up
    to 2 % (all well inside the oracle's tolerances).
    """
    if seconds < 0.5 or sample_rate < 4000:
        raise ValueError(f"seconds={seconds}, sample_rate={sample_rate}: use seconds >= 0.5 and "
                         f"sample_rate >= 4000 so three beeps and the high pitch's harmonics fit")
    n = int(round(sample_rate * seconds))
    out = np.zeros(n, np.float64)
    freq = pitch_hz(spec.pitch)
    amp = 0.5
    if rng is not None:
        freq *= 1 + rng.uniform(-0.02, 0.02)
        amp = rng.uniform(0.35, 0.6)
    ramp = max(1, int(0.01 * sample_rate))
    for start, end in beep_times(spec.count, seconds):
        if rng is not None:
            shift = rng.uniform(-0.02, 0.02)
            start, end = start + shift, end + shift
        i0, i1 = max(0, int(start * sample_rate)), min(n, int(end * sample_rate))
        t = np.arange(i1 - i0) / sample_rate
        env = np.ones(i1 - i0)
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)  # (ramp,) 0 -> 1
        env[:ramp] *= fade
        env[-ramp:] *= fade[::-1]
        out[i0:i1] += amp * env * _tone(spec.timbre, freq, t, sample_rate)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- video rendering


def video_path(direction: str, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """((x0, y0), (x1, y1)): the shape centre's start and end in pixels."""
    _check_value("direction", direction, DIRECTIONS)
    lo, hi = VIDEO_TRAVEL[0] * size, VIDEO_TRAVEL[1] * size
    mid = size / 2
    return {
        "up": ((mid, hi), (mid, lo)),
        "down": ((mid, lo), (mid, hi)),
        "left": ((hi, mid), (lo, mid)),
        "right": ((lo, mid), (hi, mid)),
    }[direction]


def render_video(spec: VideoSpec, size: int = 32, frames: int = 8,
                 rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Render ``spec`` as ``uint8 (frames, size, size, 3)``: the shape's centre moves
    linearly from 1/4 to 3/4 of the frame along the direction, at mid-height/width.

    With ``rng`` the path moves sideways by up to 0.1 frame and its ends by up to 0.05.
    """
    if frames < 2 or size < 12:
        raise ValueError(f"frames={frames}, size={size}: use frames >= 2 and size >= 12 so motion is visible")
    (x0, y0), (x1, y1) = video_path(spec.direction, size)
    if rng is not None:
        side = rng.uniform(-0.1, 0.1) * size
        if spec.direction in ("up", "down"):
            x0, x1 = x0 + side, x1 + side
        else:
            y0, y1 = y0 + side, y1 + side
        x0, y0, x1, y1 = (c + rng.uniform(-0.05, 0.05) * size for c in (x0, y0, x1, y1))
    video = np.empty((frames, size, size, 3), np.uint8)
    video[:] = BACKGROUND
    extent = shape_extent_px(VIDEO_EXTENT, size)
    for i, s in enumerate(np.linspace(0.0, 1.0, frames)):
        _draw_shape(video[i], spec.shape, x0 + s * (x1 - x0), y0 + s * (y1 - y0), extent, palette_rgb(spec.colour))
    return video


def render(spec: Spec, rng: Optional[np.random.Generator] = None, **kwargs) -> np.ndarray:
    """Dispatch to ``render_image`` / ``render_audio`` / ``render_video``."""
    fn = {"image": render_image, "audio": render_audio, "video": render_video}[spec.modality]
    return fn(spec, rng=rng, **kwargs)


# --------------------------------------------------------------------------- words

NUMBER_WORDS = ("one", "two", "three")
TIMES_WORDS = ("once", "twice", "three times")
POSITION_PHRASES = (
    ("left", ("on the left", "on the left side")),
    ("right", ("on the right", "on the right side")),
    ("top", ("at the top", "near the top")),
    ("bottom", ("at the bottom", "near the bottom")),
    ("center", ("in the center", "in the middle")),
)
SIZE_WORDS = (("small", ("small", "little")), ("large", ("large", "big")))
PITCH_WORDS = (("low", ("low", "deep")), ("medium", ("medium", "mid")), ("high", ("high", "shrill")))
TIMBRE_WORDS = (("pure", ("pure", "smooth")), ("hollow", ("hollow", "reedy")), ("buzzy", ("buzzy", "harsh")))
DIRECTION_PHRASES = (
    ("up", ("up", "upwards")),
    ("down", ("down", "downwards")),
    ("left", ("left", "to the left")),
    ("right", ("right", "to the right")),
)


def attribute_words(modality: str, attribute: str, value: Any) -> tuple[str, ...]:
    """Words or phrases any caption/answer uses for ``value`` (the first is canonical).

    The text oracle and the tests use these to check that a text mentions a value.
    """
    if attribute in ("colour", "shape"):
        return (value,)
    if attribute == "count":
        if modality == "audio":
            return (NUMBER_WORDS[value - 1], TIMES_WORDS[value - 1]) + (("a single",) if value == 1 else ())
        return (NUMBER_WORDS[value - 1],) + (("a single", "a", "an") if value == 1 else ())
    table = {"size": SIZE_WORDS, "position": POSITION_PHRASES, "pitch": PITCH_WORDS,
             "timbre": TIMBRE_WORDS, "direction": DIRECTION_PHRASES}
    if attribute not in table:
        raise KeyError(f"unknown attribute {attribute!r} for {modality}; valid: {list(attribute_values(modality))}")
    return dict(table[attribute])[value]


def _pick(options: Sequence[str], rng: Optional[np.random.Generator]) -> str:
    """The first (canonical) option without ``rng``, else a uniformly random one."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def plural(noun: str, count: int) -> str:
    if count == 1:
        return noun
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def _image_np(spec: ImageSpec, rng) -> str:
    """Noun phrase: "a small red circle on the left", "two big blue squares at the top"."""
    size = _pick(dict(SIZE_WORDS)[spec.size], rng)
    pos = _pick(dict(POSITION_PHRASES)[spec.position], rng)
    noun = plural(spec.shape, spec.count)
    if spec.count == 1:
        det = _pick(("a", "one", "a single"), rng)
        if det == "a":
            det = _article(size)
    else:
        det = NUMBER_WORDS[spec.count - 1]
    templates = (
        "{det} {size} {colour} {noun} {pos}",
        "{det} {colour} {noun}, {size}, {pos}",
        "{det} {size} {noun} {pos}, coloured {colour}",
    )
    return _pick(templates, rng).format(det=det, size=size, colour=spec.colour, noun=noun, pos=pos)


def _audio_np(spec: AudioSpec, rng) -> str:
    """Noun phrase: "two low beeps with a pure tone", "a buzzy high tone beeping twice"."""
    pitch = _pick(dict(PITCH_WORDS)[spec.pitch], rng)
    timbre = _pick(dict(TIMBRE_WORDS)[spec.timbre], rng)
    num = NUMBER_WORDS[spec.count - 1] if spec.count > 1 else _pick(("one", "a single"), rng)
    times = TIMES_WORDS[spec.count - 1]
    templates = (
        "{num} {pitch} {beeps} with {a_timbre} {timbre} tone",
        "{a_timbre} {timbre} {pitch}-pitched tone beeping {times}",
        "{num} {timbre} {beeps} at a {pitch} pitch",
    )
    return _pick(templates, rng).format(num=num, pitch=pitch, timbre=timbre, a_timbre=_article(timbre),
                                        times=times, beeps=plural("beep", spec.count))


def _video_np(spec: VideoSpec, rng) -> str:
    """Noun phrase: "a blue square moving up", "a red cross sliding to the left"."""
    direction = _pick(dict(DIRECTION_PHRASES)[spec.direction], rng)
    verb = _pick(("moving", "sliding", "travelling"), rng)
    templates = ("{a_colour} {colour} {shape} {verb} {dir}", "{a_shape} {shape} in {colour}, {verb} {dir}")
    return _pick(templates, rng).format(colour=spec.colour, shape=spec.shape, verb=verb, dir=direction,
                                        a_colour=_article(spec.colour), a_shape=_article(spec.shape))


def describe(spec: Spec, rng: Optional[np.random.Generator] = None) -> str:
    """A noun phrase naming every attribute of ``spec`` (canonical without ``rng``)."""
    return {"image": _image_np, "audio": _audio_np, "video": _video_np}[spec.modality](spec, rng)


def canonical_caption(spec: Spec) -> str:
    """The one fixed caption of ``spec``; the decoding-side target text."""
    return describe(spec, None)


def caption(spec: Spec, rng: Optional[np.random.Generator] = None) -> str:
    """A caption naming every attribute: canonical noun phrase without ``rng``; with it,
    a random phrasing, sometimes as a full sentence ("The picture shows ...")."""
    np_text = describe(spec, rng)
    if rng is None or rng.random() < 0.5:
        return np_text
    lead = {"image": ("The picture shows {}.", "An image of {}.", "{} on a black background."),
            "audio": ("The clip plays {}.", "A recording of {}.", "You can hear {}."),
            "video": ("The video shows {}.", "A clip of {}.", "Footage of {}.")}[spec.modality]
    return _sentence(_pick(lead, rng).format(np_text))


def generation_request(spec: Spec, rng: Optional[np.random.Generator] = None) -> str:
    """A user request for media matching ``spec``: "Draw a red circle on the left."."""
    template = _request_template(spec.modality, rng)  # drawn before the phrase: data sets stay as they were
    return template.format(describe(spec, rng))


def _request_template(modality: str, rng: Optional[np.random.Generator]) -> str:
    templates = {
        "image": ("Draw {}.", "Can you draw {}?", "Please make a picture of {}.", "Show me an image of {}.",
                  "Generate an image with {}."),
        "audio": ("Play {}.", "Can you play {}?", "Make a sound of {}.", "Generate audio of {}.",
                  "Let me hear {}."),
        "video": ("Show {} in a video.", "Make a video of {}.", "Animate {}.", "Can you generate a clip of {}?",
                  "Create a video showing {}."),
    }[modality]
    return _pick(templates, rng)


# What a brief request leaves out, and what is made then: "Draw a red circle." is one large
# red circle in the middle, "Play two low beeps." is pure. Never an attribute of a held-out
# pair (HOLDOUTS), so the filled-in spec stays in its split. Videos have no brief form:
# colour, shape and direction are all needed.
BRIEF_DEFAULTS = {"image": {"size": "large", "position": "center", "count": 1}, "audio": {"timbre": "pure"}}


def brief_generation_request(spec: Spec, rng: np.random.Generator) -> tuple[Spec, str]:
    """A request that names only some of ``spec``'s attributes ("Draw two red circles."),
    and the spec it asks for: each attribute of ``BRIEF_DEFAULTS`` is left out with
    probability 1/2 (at least one that the text would name) and takes its default value."""
    defaults = BRIEF_DEFAULTS.get(spec.modality)
    if defaults is None:
        raise ValueError(f"{spec.modality} requests have no brief form; brief requests exist for {list(BRIEF_DEFAULTS)}")
    template = _request_template(spec.modality, rng)
    names = list(defaults)
    omit = [a for a in names if rng.random() < 0.5]
    if not [a for a in omit if a != "count"]:  # without a number, "a red circle" still names one
        rest = [a for a in names if a != "count"]
        omit.append(rest[int(rng.integers(len(rest)))])
    filled = spec.replace(**{a: defaults[a] for a in omit})
    if spec.modality == "image":
        size = "" if "size" in omit else _pick(dict(SIZE_WORDS)[filled.size], rng) + " "
        pos = "" if "position" in omit else " " + _pick(dict(POSITION_PHRASES)[filled.position], rng)
        det = NUMBER_WORDS[filled.count - 1] if filled.count > 1 else _article(size or filled.colour)
        phrase = f"{det} {size}{filled.colour} {plural(filled.shape, filled.count)}{pos}"
    else:
        num = NUMBER_WORDS[filled.count - 1] if filled.count > 1 else _pick(("one", "a single"), rng)
        pitch = _pick(dict(PITCH_WORDS)[filled.pitch], rng)
        phrase = _pick((f"{num} {pitch} {plural('beep', filled.count)}",
                        f"a {pitch} tone beeping {TIMES_WORDS[filled.count - 1]}"), rng)
    return filled, template.format(phrase)


def generation_reply(spec: Spec, rng: Optional[np.random.Generator] = None) -> str:
    """The assistant's reply to a generation request, ending in the output marker."""
    text = canonical_caption(spec)
    is_ = "are" if text.split()[0] in NUMBER_WORDS[1:] else "is"
    lead = _pick((f"Here {is_} {{}}.", f"Sure, here {is_} {{}}.", "Here you go: {}."), rng)
    return f"{lead.format(text)} {gen_marker(spec.modality)}"


_QUESTIONS = (
    ("image", "colour", ("What colour {is_} the {thing}?", "What color {is_} the {thing}?",
                         "Which colour {is_} the {thing}?")),
    ("image", "shape", ("What shape is shown?", "Which shape do you see?", "What kind of shape do you see?")),
    ("image", "size", ("What size {is_} the {thing}?", "How big {is_} the {thing}?")),
    ("image", "position", ("Where {is_} the {thing}?", "Where {is_} the {thing} in the picture?")),
    ("image", "count", ("How many shapes are there?", "How many objects can you count?")),
    ("audio", "pitch", ("How high is the pitch?", "Is the tone low, medium or high?", "What pitch is it?")),
    ("audio", "timbre", ("What does the tone sound like?", "Is the tone pure, hollow or buzzy?",
                         "What is the timbre of the sound?")),
    ("audio", "count", ("How many beeps are there?", "How many times does it beep?")),
    ("video", "colour", ("What colour is the moving shape?", "What color is the object?")),
    ("video", "shape", ("What shape is moving?", "Which shape is in the video?")),
    ("video", "direction", ("Which way is it moving?", "In which direction does the shape move?",
                            "Where is the shape going?")),
)


def question_answer(spec: Spec, attribute: Optional[str] = None,
                    rng: Optional[np.random.Generator] = None) -> tuple[str, str, str]:
    """(question, answer, attribute) about one attribute of ``spec`` (random when
    ``attribute`` is None and ``rng`` is given; the first attribute otherwise)."""
    m = spec.modality
    options = [a for mm, a, _ in _QUESTIONS if mm == m]
    if attribute is None:
        attribute = _pick(options, rng)
    if attribute not in options:
        raise KeyError(f"no questions about {attribute!r} for {m}; valid attributes: {options}")
    count = getattr(spec, "count", 1) if m == "image" else 1
    is_, it = ("is", "It is") if count == 1 else ("are", "They are")
    thing = plural("shape", count)
    question = _pick(next(q for mm, a, q in _QUESTIONS if (mm, a) == (m, attribute)), rng)
    question = question.format(is_=is_, thing=thing)
    value = getattr(spec, attribute)
    word = _pick(attribute_words(m, attribute, value), rng)
    if attribute == "count" and m == "image":
        n = NUMBER_WORDS[value - 1]
        answer = _pick((f"There {'is' if value == 1 else 'are'} {n}.",
                        f"I count {n} {plural(spec.shape, value)}.", f"{n.capitalize()}."), rng)
    elif attribute == "count":
        answer = _pick((f"It beeps {TIMES_WORDS[value - 1]}.",
                        f"There {'is' if value == 1 else 'are'} {NUMBER_WORDS[value - 1]} "
                        f"{plural('beep', value)}."), rng)
    elif attribute == "shape" and m == "image":
        answer = _pick((f"{it} {plural(value, count) if count > 1 else _article(value) + ' ' + value}.",
                        f"{plural(value, count).capitalize()}."), rng)
    elif attribute == "shape":
        answer = _pick((f"It is {_article(value)} {value}.", f"{value.capitalize()}."), rng)
    elif attribute == "direction":
        answer = _pick((f"It is moving {word}.", f"It goes {word}."), rng)
    elif attribute == "position":
        answer = _pick((f"{it} {word}.", f"{word.capitalize()}."), rng)
    elif attribute == "pitch":
        answer = _pick((f"The pitch is {word}.", f"It is a {word} tone."), rng)
    elif attribute == "timbre":
        answer = _pick((f"The tone is {word}.", f"It sounds {word}."), rng)
    else:  # colour, size
        answer = _pick((f"{it} {word}.", f"{word.capitalize()}."), rng)
    return question, answer, attribute


def edit_request(spec: Spec, attribute: str, rng: Optional[np.random.Generator] = None) -> str:
    """A follow-up asking for ``spec`` (already edited) with ``attribute`` changed, e.g.
    "Now make it blue." after a red circle. ``spec`` is the *new* spec."""
    v = getattr(spec, attribute)
    word = _pick(attribute_words(spec.modality, attribute, v), rng)
    count = getattr(spec, "count", 1)
    if spec.modality == "audio" and attribute == "count":
        return f"Play it again with {NUMBER_WORDS[v - 1]} {plural('beep', v)}."
    if spec.modality == "audio" and attribute == "timbre":
        return f"Play it again with {_article(word)} {word} tone."
    if spec.modality == "audio":
        return f"Play it again, but {word}."
    if attribute == "shape":
        return f"Same again, but with {plural(v, count) if count > 1 else _article(v) + ' ' + v}."
    if attribute == "count":
        return f"Now draw {NUMBER_WORDS[v - 1]} of them."
    it = "them" if count > 1 else "it"
    if attribute == "position":
        return f"Now put {it} {word}."
    if attribute == "direction":
        return f"Now make it move {word}."
    return _pick((f"Now make {it} {word}.", f"Same again, but {word}."), rng)


# --------------------------------------------------------------------------- data set builders


def _rng(seed: int, stream: str) -> np.random.Generator:
    """Independent, reproducible stream per (seed, builder)."""
    return np.random.default_rng([seed, sum(ord(c) * 31 ** i for i, c in enumerate(stream)) % (2 ** 32)])


def make_caption_pairs(n: int, modality: str, split: str = "train", seed: int = 0) -> list[tuple[Spec, str]]:
    """``n`` (spec, caption) pairs with varied phrasings (stage-1 encoding side)."""
    rng = _rng(seed, f"caption/{modality}/{split}")
    return [(s, caption(s, rng)) for s in (sample_spec(rng, modality, split) for _ in range(n))]


def make_generation_pairs(n: int, modality: str, split: str = "train",
                          seed: int = 0) -> list[tuple[str, Spec, str]]:
    """``n`` (request, target spec, target canonical caption) triples (decoding side)."""
    rng = _rng(seed, f"generation/{modality}/{split}")
    out = []
    for _ in range(n):
        s = sample_spec(rng, modality, split)
        out.append((generation_request(s, rng), s, canonical_caption(s)))
    return out


def make_qa(n: int, modality: str, split: str = "train", seed: int = 0) -> list[dict]:
    """``n`` dicts: ``spec`` (Spec), ``question``, ``answer``, ``attribute``, ``value``."""
    rng = _rng(seed, f"qa/{modality}/{split}")
    out = []
    for _ in range(n):
        s = sample_spec(rng, modality, split)
        q, a, attr = question_answer(s, None, rng)
        out.append({"spec": s, "question": q, "answer": a, "attribute": attr, "value": getattr(s, attr)})
    return out


def _edit(spec: Spec, split: str, rng: np.random.Generator) -> Optional[tuple[Spec, str]]:
    """``spec`` with one random attribute changed, staying inside ``split``; None if no
    single change stays inside it."""
    values = attribute_values(spec.modality)
    attrs = list(values)
    for i in rng.permutation(len(attrs)):
        attr = attrs[int(i)]
        options = [spec.replace(**{attr: v}) for v in values[attr] if v != getattr(spec, attr)]
        options = [o for o in options if in_split(o, split)]
        if options:
            return options[int(rng.integers(len(options)))], attr
    return None


def conversation_row(user: str, reply: str, media: Optional[tuple[str, str]] = None,
                     output: Optional[dict] = None) -> dict:
    """One LLaVA-format exchange: ``user`` then ``reply``; ``media`` ``(modality, path)`` puts
    that input's placeholder before the request, ``output`` (``{"modality", "caption"}``)
    marks the reply as one that renders it."""
    row: dict = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]}
    if media is not None:
        modality, path = media
        row[modality] = path
        row["conversations"][0]["value"] = f"{input_placeholder(modality)}\n{user}"
    if output is not None:
        row["outputs"] = [output]
    return row


def make_dialogues(n: int, split: str = "train", seed: int = 0, max_exchanges: int = 4) -> list[dict]:
    """``n`` LLaVA-style multi-turn dialogues mixing understanding and generation (see the
    module docstring for the format). Input and output specs are serialised as dicts."""
    rng = _rng(seed, f"dialogue/{split}")
    return [_dialogue(rng, split, f"toy-{split}-{i:06d}", max_exchanges) for i in range(n)]


def _dialogue(rng: np.random.Generator, split: str, ident: str, max_exchanges: int) -> dict:
    sample: dict[str, Any] = {"id": ident}
    turns: list[dict] = []
    outputs: list[dict] = []
    in_mod = _pick(MODALITIES + (None,), rng)  # type: ignore[arg-type]
    in_spec = sample_spec(rng, in_mod, split) if in_mod else None
    if in_spec is not None:
        sample[in_mod] = in_spec.to_dict()
    last = in_spec  # what "it" refers to in an edit request
    for k in range(int(rng.integers(1, max_exchanges + 1))):
        kinds = ["generate"] + (["ask", "ask", "describe"] if in_spec is not None else []) + (["edit"] if last else [])
        if k == 0 and in_spec is not None and rng.random() < 0.7:
            kind = "ask"  # most dialogues open with a question about the input, as in LLaVA
        else:
            kind = _pick(kinds, rng)
        produced = None
        if kind == "ask":
            human, gpt, _ = question_answer(in_spec, None, rng)
        elif kind == "describe":
            human = _pick((f"Describe the {in_mod}.", f"What is in this {in_mod}?", "Describe it briefly."), rng)
            gpt = _sentence(caption(in_spec, rng))
        else:
            edited = _edit(last, split, rng) if kind == "edit" else None
            if edited is not None:
                produced, attr = edited
                human = edit_request(produced, attr, rng)
            else:
                produced = sample_spec(rng, _pick(MODALITIES, rng), split)
                human = generation_request(produced, rng)
            gpt = generation_reply(produced, rng)
        if k == 0 and in_spec is not None:
            human = f"{input_placeholder(in_mod)}\n{human}"
        turns.append({"from": "human", "value": human})
        turns.append({"from": "gpt", "value": gpt})
        if produced is not None:
            outputs.append({"turn": len(turns) - 1, "modality": produced.modality, "spec": produced.to_dict(),
                            "caption": canonical_caption(produced)})
            last = produced
    sample["conversations"] = turns
    sample["outputs"] = outputs
    return sample


# --------------------------------------------------------------------------- files


def write_wav(path: Union[str, Path], audio: np.ndarray, sample_rate: int) -> None:
    """16-bit mono PCM WAV via the standard library (audio in [-1, 1], float (S,))."""
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def read_wav(path: Union[str, Path]) -> tuple[np.ndarray, int]:
    """(float32 (S,) in [-1, 1], sample_rate) from a 16-bit mono WAV."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise ValueError(f"{path}: only 16-bit mono WAV is supported; re-save with write_wav")
        data = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        return (data.astype(np.float32) / 32767), f.getframerate()


def read_video(path: Union[str, Path]) -> np.ndarray:
    """uint8 (T, H, W, 3) from a ``.npz`` written by ``write_dataset``."""
    with np.load(path) as z:
        return z["frames"]


def read_image(path: Union[str, Path]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def write_dataset(root: Union[str, Path], n: int, seed: int = 0, split: str = "train", size: int = 32,
                  sample_rate: int = 16000, seconds: float = 1.0, frames: int = 8,
                  n_dialogues: Optional[int] = None) -> dict[str, Path]:
    """Write ``n`` media items per modality plus text files under ``root``.

    Layout (paths in the text files are relative to ``root``)::

        image/000000.png   audio/000000.wav   video/000000.npz (key "frames", (T, H, W, 3))
        captions.jsonl     {"modality", "path", "caption", "spec"} per line (random phrasings)
        generation.jsonl   {"modality", "request", "caption", "spec"} per line
        qa.jsonl           {"modality", "path", "question", "answer", "attribute", "value", "spec"}
        dialogues.json     LLaVA list; input media keys hold paths (dlg/...) instead of specs

    Media are canonical renderings (no jitter) so a spec maps to one file. Returns the paths.
    """
    from PIL import Image

    root = Path(root)
    writers = {
        "image": (".png", lambda p, s: Image.fromarray(render_image(s, size)).save(p)),
        "audio": (".wav", lambda p, s: write_wav(p, render_audio(s, sample_rate, seconds), sample_rate)),
        "video": (".npz", lambda p, s: np.savez_compressed(p, frames=render_video(s, size, frames))),
    }
    caps, gens, qas = [], [], []
    for m in MODALITIES:
        ext, write = writers[m]
        (root / m).mkdir(parents=True, exist_ok=True)
        qa_items = make_qa(n, m, split, seed)
        for i, (s, text) in enumerate(make_caption_pairs(n, m, split, seed)):
            rel = f"{m}/{i:06d}{ext}"
            write(root / rel, s)
            caps.append({"modality": m, "path": rel, "caption": text, "spec": s.to_dict()})
            qa = qa_items[i]
            qa_rel = f"{m}/qa_{i:06d}{ext}"
            write(root / qa_rel, qa["spec"])
            qas.append({"modality": m, "path": qa_rel, **{k: v for k, v in qa.items() if k != "spec"},
                        "spec": qa["spec"].to_dict()})
        for req, s, text in make_generation_pairs(n, m, split, seed):
            gens.append({"modality": m, "request": req, "caption": text, "spec": s.to_dict()})
    dialogues = make_dialogues(n if n_dialogues is None else n_dialogues, split, seed)
    (root / "dlg").mkdir(exist_ok=True)
    for d in dialogues:
        for m in MODALITIES:
            if m in d:
                ext, write = writers[m]
                rel = f"dlg/{d['id']}_{m}{ext}"
                write(root / rel, spec_from_dict(d[m]))
                d[f"{m}_spec"] = d[m]
                d[m] = rel
    paths = {"captions": root / "captions.jsonl", "generation": root / "generation.jsonl",
             "qa": root / "qa.jsonl", "dialogues": root / "dialogues.json"}
    for key, rows in (("captions", caps), ("generation", gens), ("qa", qas)):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["dialogues"].write_text(json.dumps(dialogues, indent=1))
    return paths
