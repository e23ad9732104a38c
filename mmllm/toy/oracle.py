"""Ground-truth analysers for the toy world: read attributes back from media and text.

They score what a model generates (images, audio, video, captions, answers), so they
must tolerate noise, blur and small colour shifts. Each ``analyse_*`` returns a
spec-like dict (``{"modality": ..., attribute: value}``, a value ``None`` when it cannot
be read); ``score`` / ``score_batch`` compare with the truth per attribute.

- Image: foreground = pixels far (in RGB) from the background, which is the median
  border colour; the threshold is half the contrast of the strongest 3x3 patch. Objects
  = 8-connected components (tiny specks dropped). Colour = palette entry that best
  explains the mean foreground colour as a mix of palette colour and background (so
  blur-darkened edges still read as the right hue). Shape = best IoU with each shape's
  template drawn in the component's bounding box. Size = box extent against a cell.
  Position = nearest grid anchor to the mean object centre. Count = number of objects.
- Audio: beeps = runs of 10 ms frames whose RMS exceeds the midpoint between the noise
  floor and the peak. Pitch = nearest class (in octaves) to the spectral peak of the
  active frames. Timbre from harmonic amplitudes: a sawtooth has a strong 2nd harmonic
  (1/2), a square only odd ones (3rd at 1/3), a sine neither.
- Video: per-frame foreground centroids; direction = the sign of the larger slope of a
  straight-line fit over time. Colour and shape as for images, pooled over frames.
- Text: keyword matching with the world's own vocabulary (``world.attribute_words``).

``degrade_image`` / ``degrade_audio`` / ``degrade_video`` add Gaussian noise and blur to
check this robustness (and to calibrate against real decoders).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import world
from .world import Spec

# Timbre decision thresholds on harmonic amplitude ratios (theory: sawtooth a2 = 0.5,
# square a3 = 1/3, sine 0); set near the middle to survive low-pass filtering and noise.
SAW_A2 = 0.25
SQUARE_A3 = 0.15
MIN_CONTRAST = 40.0  # RGB distance below which an image counts as empty (uint8 scale)


# --------------------------------------------------------------------------- input conversion


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _as_image(x: Any) -> np.ndarray:
    """float64 (H, W, 3) on the 0..255 scale from uint8 or float-in-[0, 1] input, HWC or CHW."""
    a = _to_numpy(x)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if a.min() < -0.01 or a.max() > 1.01:
        raise ValueError(f"float images must lie in [0, 1] (got [{a.min():.2f}, {a.max():.2f}]); "
                         f"map [-1, 1] outputs with (x + 1) / 2 first")
    return a.astype(np.float64) * 255.0


def _as_video(x: Any) -> np.ndarray:
    """float64 (T, H, W, 3) on the 0..255 scale; accepts (T, 3, H, W) too."""
    a = _to_numpy(x)
    if a.ndim != 4:
        raise ValueError(f"expected a video (T, H, W, 3) or (T, 3, H, W), got shape {a.shape}")
    return np.stack([_as_image(f) for f in a])


# --------------------------------------------------------------------------- image analysis


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter of a 2-D array, edges replicated."""
    p = np.pad(a, 1, mode="edge")
    h, w = a.shape
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _background(img: np.ndarray) -> np.ndarray:
    """Median colour of the border pixels, (3,); objects cover little of the border."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H + 2W, 3)
    return np.median(border, axis=0)


def _distance(img: np.ndarray, bg: np.ndarray) -> np.ndarray:
    return np.linalg.norm(img - bg, axis=-1)  # (H, W)


def _threshold(dist: np.ndarray) -> Optional[float]:
    """Half the contrast of the strongest 3x3 patch, or None when nothing stands out."""
    peak = float(_box3(dist).max())
    return None if peak < MIN_CONTRAST else 0.5 * peak


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean (H, W) mask, each an int array (N, 2) of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    comps = []
    for y0, x0 in np.argwhere(mask):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        comps.append(np.array(pixels))
    return comps


def _objects(mask: np.ndarray) -> list[np.ndarray]:
    """Components large enough to be objects: >= 3 px and >= 1/4 of the largest (all
    real objects in an image have the same area; noise specks are far smaller)."""
    comps = connected_components(mask)
    if not comps:
        return []
    biggest = max(len(c) for c in comps)
    return [c for c in comps if len(c) >= max(3, 0.25 * biggest)]


def _nearest_colour(mean_rgb: np.ndarray, bg: np.ndarray) -> str:
    """Palette colour c minimising |v - a (c - bg)| over a in [0, 1], with v = mean - bg:
    the mean is read as a mix of c and the background (blur, anti-aliasing)."""
    v = mean_rgb - bg
    best, best_err = world.COLOURS[0], np.inf
    for name, rgb in world.PALETTE:
        d = np.asarray(rgb, np.float64) - bg
        a = float(np.clip(v @ d / max(d @ d, 1e-9), 0.0, 1.0))
        err = float(np.linalg.norm(v - a * d))
        if err < best_err:
            best, best_err = name, err
    return best


def _shape_of(pixels: np.ndarray) -> tuple[str, float]:
    """(shape with the best IoU against its template drawn in the component's bounding
    box, estimated edge-to-edge extent in pixels).

    The extent averages the box's larger side with sqrt(area / template fill): blur
    erodes thin parts (a triangle's apex) and shrinks the box, but keeps the area."""
    ys, xs = pixels[:, 0], pixels[:, 1]
    y0, x0 = ys.min(), xs.min()
    h, w = ys.max() - y0 + 1, xs.max() - x0 + 1
    comp = np.zeros((h, w), bool)
    comp[ys - y0, xs - x0] = True
    v = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]  # (h, 1) in (-1, 1)
    u = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]  # (1, w)
    best, best_iou, best_fill = world.SHAPES[0], -1.0, 1.0
    for shape in world.SHAPES:
        t = world.shape_mask_unit(shape, u, v)
        iou = (t & comp).sum() / max((t | comp).sum(), 1)
        if iou > best_iou:
            best, best_iou, best_fill = shape, iou, max(t.mean(), 1e-3)
    return best, 0.5 * (max(h, w) + float(np.sqrt(len(pixels) / best_fill)))


def _vote(values: Sequence) -> Any:
    values = list(values)
    return max(set(values), key=lambda v: (values.count(v), -values.index(v))) if values else None


def analyse_image(image: Any) -> dict:
    """Attributes of an image: ``uint8 (H, W, 3)``, float in [0, 1], or a (3, H, W) tensor.

    Returns ``{"modality": "image", "colour", "shape", "size", "position", "count"}``;
    every value is None (count 0) when no object stands out from the background.
    """
    img = _as_image(image)
    side = min(img.shape[:2])
    bg = _background(img)
    dist = _distance(img, bg)
    thr = _threshold(dist)
    empty = {"modality": "image", "colour": None, "shape": None, "size": None, "position": None, "count": 0}
    if thr is None:
        return empty
    objects = _objects(dist > thr)
    if not objects:
        return empty
    pixels = np.concatenate(objects)
    colour = _nearest_colour(img[pixels[:, 0], pixels[:, 1]].mean(0), bg)
    shapes, extents = zip(*(_shape_of(c) for c in objects))
    cell = side / 3
    small, large = (dict(world.SIZE_CELL_FRACTION)[s] for s in ("small", "large"))
    size = "large" if np.median(extents) > (small + large) / 2 * cell else "small"
    centre = np.mean([c.mean(0) + 0.5 for c in objects], axis=0)[::-1]  # (x, y) in pixels
    anchors = [(p, world.position_anchor(p, side)) for p in world.POSITIONS]
    position = min(anchors, key=lambda pa: np.hypot(centre[0] - pa[1][0], centre[1] - pa[1][1]))[0]
    return {"modality": "image", "colour": colour, "shape": _vote(shapes), "size": size,
            "position": position, "count": len(objects)}


# --------------------------------------------------------------------------- audio analysis


def _runs(active: np.ndarray, max_gap: int, min_len: int) -> list[tuple[int, int]]:
    """[start, end) runs of True, bridging gaps of <= max_gap and dropping runs < min_len."""
    runs: list[list[int]] = []
    for i in np.flatnonzero(active):
        if runs and i - runs[-1][1] <= max_gap:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs if b - a >= min_len]


def _band_energy(power: np.ndarray, freqs: np.ndarray, f: float, floor: float) -> float:
    """Power within +-3 % (at least 2 bins) of ``f``, minus the noise floor over that band."""
    width = max(0.03 * f, 2 * (freqs[1] - freqs[0]))
    band = np.abs(freqs - f) <= width
    return max(float(power[band].sum() - floor * band.sum()), 0.0)


def analyse_audio(audio: Any, sample_rate: int = 16000) -> dict:
    """Attributes of a mono waveform ``(S,)`` (or ``(1, S)``): pitch, timbre, count.

    Returns ``{"modality": "audio", "pitch", "timbre", "count"}`` (None / 0 if silent).
    """
    a = _to_numpy(audio)
    if a.ndim == 2 and 1 in a.shape:
        a = a.reshape(-1)  # (1, S) or (S, 1) -> (S,)
    if a.ndim != 1:
        raise ValueError(f"expected mono audio (S,) or (1, S), got shape {a.shape}; average the channels first")
    x = a.astype(np.float64)
    frame = max(1, sample_rate // 100)  # 10 ms frames
    nf = len(x) // frame
    silent = {"modality": "audio", "pitch": None, "timbre": None, "count": 0}
    if nf < 5:
        return silent
    frames = x[: nf * frame].reshape(nf, frame)  # (F, frame)
    env = np.sqrt((frames ** 2).mean(1))  # (F,) RMS
    floor, peak = float(np.percentile(env, 10)), float(np.convolve(env, np.ones(3) / 3, "same").max())
    if peak < 1e-3 or peak < 1.3 * floor:  # a noise-only envelope peaks ~1.15x its floor
        return silent
    runs = _runs(env > floor + 0.5 * (peak - floor), max_gap=2, min_len=3)
    if not runs:
        return silent
    active = np.concatenate([frames[a:b].reshape(-1) for a, b in runs])
    power = np.abs(np.fft.rfft(active * np.hanning(len(active)))) ** 2
    freqs = np.fft.rfftfreq(len(active), 1.0 / sample_rate)
    search = (freqs >= 80) & (freqs <= min(2500.0, sample_rate / 6))  # keep 3 f0 below Nyquist
    f0 = float(freqs[search][np.argmax(power[search])])
    pitch = min(world.PITCH_HZ, key=lambda ph: abs(np.log2(f0 / ph[1])))[0]
    noise = float(np.median(power))
    e1, e2, e3 = (_band_energy(power, freqs, k * f0, noise) for k in (1, 2, 3))
    a2, a3 = np.sqrt(e2 / max(e1, 1e-12)), np.sqrt(e3 / max(e1, 1e-12))
    timbre = "buzzy" if a2 >= SAW_A2 else "hollow" if a3 >= SQUARE_A3 else "pure"
    return {"modality": "audio", "pitch": pitch, "timbre": timbre, "count": len(runs)}


# --------------------------------------------------------------------------- video analysis


def analyse_video(video: Any) -> dict:
    """Attributes of a video ``uint8 (T, H, W, 3)`` (or float / (T, 3, H, W)).

    Returns ``{"modality": "video", "colour", "shape", "direction"}`` (None if empty).
    """
    vid = _as_video(video)
    bg = np.median(np.stack([_background(f) for f in vid]), axis=0)
    dist = np.stack([_distance(f, bg) for f in vid])  # (T, H, W)
    thr = max((_threshold(d) or 0.0) for d in dist)
    empty = {"modality": "video", "colour": None, "shape": None, "direction": None}
    if thr == 0.0:
        return empty
    times, centres, shapes, colours = [], [], [], []
    for t, (frame, d) in enumerate(zip(vid, dist)):
        objects = _objects(d > thr)
        if not objects:
            continue
        obj = max(objects, key=len)  # the moving shape; anything else is noise
        times.append(t)
        centres.append(obj.mean(0)[::-1])  # (x, y)
        shapes.append(_shape_of(obj)[0])
        colours.append(frame[obj[:, 0], obj[:, 1]].mean(0))
    if len(times) < 2:
        return empty
    c = np.array(centres)  # (T', 2)
    vx, vy = np.polyfit(times, c[:, 0], 1)[0], np.polyfit(times, c[:, 1], 1)[0]
    if abs(vx) >= abs(vy):
        direction = "right" if vx > 0 else "left"
    else:
        direction = "down" if vy > 0 else "up"  # image y grows downwards
    return {"modality": "video", "colour": _nearest_colour(np.mean(colours, axis=0), bg),
            "shape": _vote(shapes), "direction": direction}


def analyse(media: Any, modality: str, **kwargs) -> dict:
    """Dispatch to ``analyse_image`` / ``analyse_audio`` / ``analyse_video``."""
    world._check_modality(modality)
    return {"image": analyse_image, "audio": analyse_audio, "video": analyse_video}[modality](media, **kwargs)


# --------------------------------------------------------------------------- text analysis


def _mentions(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}(?:s|es)?\b", text) is not None


def analyse_text(text: str, modality: str) -> dict:
    """Attributes named in a caption or answer about ``modality`` media, by keyword.

    A value is reported when exactly one value of that attribute is mentioned, else None.
    Count falls back to 1 when no number word appears and the noun is singular.
    """
    low = text.lower()
    out: dict[str, Any] = {"modality": modality}
    for attr, values in world.attribute_values(modality).items():
        if attr == "count":
            continue
        hits = [v for v in values if any(_mentions(low, w) for w in world.attribute_words(modality, attr, v))]
        out[attr] = hits[0] if len(hits) == 1 else None
    if "count" in world.attribute_values(modality):
        strong = {1: ("one", "once", "single"), 2: ("two", "twice"), 3: ("three", "three times")}
        hits = [n for n, words in strong.items() if any(re.search(rf"\b{w}\b", low) for w in words)]
        if len(hits) == 1:
            out["count"] = hits[0]
        elif not hits:
            nouns = world.SHAPES if modality == "image" else ("beep",)
            plural = any(re.search(rf"\b{world.plural(n, 2)}\b", low) for n in nouns)
            out["count"] = None if plural else 1
        else:
            out["count"] = None
    return out


# --------------------------------------------------------------------------- scoring


def _truth_dict(truth: Union[Spec, dict]) -> dict:
    return truth.to_dict() if hasattr(truth, "to_dict") else dict(truth)


def score(pred: dict, truth: Union[Spec, dict]) -> dict[str, float]:
    """Per-attribute correctness (1.0 / 0.0) of one prediction, plus ``"all"`` (every
    attribute right). Attributes are those of ``truth``; missing predictions count wrong."""
    t = _truth_dict(truth)
    out = {k: float(pred.get(k) == v) for k, v in t.items() if k != "modality"}
    out["all"] = float(all(out.values()))
    return out


def score_batch(preds: Sequence[dict], truths: Sequence[Union[Spec, dict]]) -> dict[str, float]:
    """Mean of ``score`` over pairs: per-attribute accuracy and exact-match rate."""
    if len(preds) != len(truths) or not preds:
        raise ValueError(f"need equally many predictions and truths, at least one (got {len(preds)} and {len(truths)})")
    rows = [score(p, t) for p, t in zip(preds, truths)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# --------------------------------------------------------------------------- degradations


def _gaussian_blur(a: np.ndarray, sigma: float, axes: Sequence[int]) -> np.ndarray:
    """Separable Gaussian blur of ``a`` along ``axes`` (edges replicated)."""
    if sigma <= 0:
        return a
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for ax in axes:
        pad = [(0, 0)] * a.ndim
        pad[ax] = (r, r)
        p = np.pad(a, pad, mode="edge")
        n = a.shape[ax]
        a = sum(w * np.take(p, np.arange(i, i + n), axis=ax) for i, w in enumerate(k))
    return a


def degrade_image(image: np.ndarray, rng: np.random.Generator, noise: float = 0.05,
                  blur: float = 0.6) -> np.ndarray:
    """Gaussian blur (sigma ``blur`` px) then Gaussian noise (std ``noise`` of full scale),
    uint8 (H, W, 3) in and out."""
    a = _gaussian_blur(image.astype(np.float64), blur, axes=(0, 1))
    a = a + rng.normal(0.0, noise * 255.0, a.shape)
    return np.clip(a, 0, 255).round().astype(np.uint8)


def degrade_video(video: np.ndarray, rng: np.random.Generator, noise: float = 0.05,
                  blur: float = 0.6) -> np.ndarray:
    """``degrade_image`` on every frame of uint8 (T, H, W, 3)."""
    return np.stack([degrade_image(f, rng, noise, blur) for f in video])


def degrade_audio(audio: np.ndarray, rng: np.random.Generator, noise: float = 0.03,
                  lowpass: bool = True, gain: float = 1.0) -> np.ndarray:
    """Optional 3-tap moving-average low-pass, a gain, then white noise (std ``noise``)."""
    a = audio.astype(np.float64)
    if lowpass:
        a = np.convolve(a, np.ones(3) / 3, mode="same")
    a = gain * a + rng.normal(0.0, noise, a.shape)
    return a.astype(np.float32)
