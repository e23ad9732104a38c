"""Decoding user media into arrays: the one place where files are read.

* images -> RGB ``PIL.Image``
* audio  -> mono ``float32`` waveform ``(samples,)`` at a requested sample rate
* video  -> ``uint8`` frames ``(T, H, W, 3)``

Accepted inputs: file paths, PIL images, numpy arrays and torch tensors. What is fixed on the
way, and how (docs/RELIABILITY.md lists every case):

* images: grayscale, palette and CMYK become RGB; transparency is composited on white;
  16-bit and 32-bit images are scaled to 8 bits; float arrays in [0, 1] are scaled to 0-255;
  the EXIF orientation of a photo is applied.
* audio: any sample rate in ``[MIN_SAMPLE_RATE, MAX_SAMPLE_RATE]`` is resampled; several
  channels are averaged to mono; integer PCM is scaled to [-1, 1]; audio longer than
  ``max_seconds`` (or ``MAX_AUDIO_SAMPLES`` samples) is cut there with a warning, and a file
  is read only up to that point.
* video: ``(T, C, H, W)`` is transposed; grayscale frames become RGB.

Every file is checked against the limits below from its header, before it is decoded, so a
small file that claims a huge size costs no memory. Anything else (no such file, an empty or
truncated file, a decompression bomb, NaN samples, zero frames, an unsupported type) raises
``MediaError`` naming the input and the fix.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".npy", ".npz")

MAX_PIXELS = 64_000_000  # per image or frame; larger inputs are refused before decoding
MAX_AUDIO_SECONDS = 600.0
# Samples read from one recording (per channel, at its own rate): 600 s at 48 kHz, 115 MB as float32.
MAX_AUDIO_SAMPLES = 28_800_000
MAX_AUDIO_CHANNELS = 64
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 384_000  # Hz
# Resampling by p/q builds a (p, q + filter) kernel: p and q are held to this, approximating the
# ratio when the rates share no large divisor (48001 Hz -> 16 kHz becomes 3:1, 0.002% off).
MAX_RESAMPLE_TERMS = 1000
MAX_VIDEO_FRAMES = 10_000
# Pixels in one video, all frames together (T * H * W): 300 MB as uint8 RGB.
MAX_VIDEO_PIXELS = 100_000_000
# Bytes of raw array data in a .npy/.npz video, read from its header before loading.
MAX_VIDEO_ARRAY_BYTES = 3 * MAX_VIDEO_PIXELS


class MediaError(ValueError):
    """Bad media input; the message names the input and the fix."""


def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return repr(str(x))
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise MediaError(f"{_describe(x)} is on the meta device and holds no data; pass a tensor with real values")
        if x.layout != torch.strided:
            raise MediaError(f"{_describe(x)} has {x.layout} layout; pass a dense tensor (x.to_dense())")
        if x.is_quantized:
            raise MediaError(f"{_describe(x)} is quantized; pass x.dequantize()")
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def _existing_file(path: Path, kind: str) -> Path:
    if not path.is_file():
        raise MediaError(f"{kind} file {str(path)!r} does not exist; check the path")
    if path.stat().st_size == 0:
        raise MediaError(f"{kind} file {str(path)!r} is empty (0 bytes); pass a complete file")
    return path


# --------------------------------------------------------------------------- images


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """Pixel arrays of any numeric dtype -> uint8, or a MediaError saying which range is expected."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise MediaError(f"{what} has dtype {arr.dtype}; pass uint8 pixels or floats in [0, 1]")
    if arr.size and np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MediaError(f"{what} holds NaN or Inf values; clean it before passing it in")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < 0:
        raise MediaError(f"{what} has negative values (min {lo:g}); map it to [0, 1] first, e.g. (x + 1) / 2")
    if np.issubdtype(arr.dtype, np.floating) and hi <= 1.0:
        return (arr * 255.0 + 0.5).astype(np.uint8)
    if hi <= 255:
        return arr.astype(np.uint8)
    if hi <= 65535:  # 16-bit data
        return (arr / 257.0 + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize == 4:  # 32-bit data: its full range
        return (arr / (np.iinfo(arr.dtype).max / 255.0) + 0.5).astype(np.uint8)
    raise MediaError(f"{what} has values up to {hi:g}; pass 8-bit, 16-bit, 32-bit or [0, 1] float pixels")


def _hwc(arr: np.ndarray, what: str) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, C) with C in 1..4."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise MediaError(f"{what}: an image array must be (H, W), (H, W, C) or (C, H, W) with 1-4 channels")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise MediaError(f"{what} has zero height or width")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise MediaError(f"{what} has {arr.shape[0] * arr.shape[1]} pixels, over the {MAX_PIXELS} limit; downscale it")
    return arr


def _array_to_rgb(arr: np.ndarray, what: str):
    from PIL import Image

    arr = _to_uint8(_hwc(arr, what), what)
    channels = arr.shape[-1]
    if channels in (2, 4):  # with alpha: composite on white
        rgb = np.repeat(arr[..., :1], 3, -1) if channels == 2 else arr[..., :3]
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        arr = (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    elif channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


# Modes with alpha, and the mode that keeps it on the way to RGB.
_ALPHA_MODES = {"RGBA": "RGBA", "RGBa": "RGBA", "LA": "LA", "La": "LA", "PA": "RGBA"}
EXIF_ORIENTATION = 0x0112


def _upright(im):
    """Apply a photo's EXIF orientation (phones store pixels sideways and say so in EXIF)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: keep the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if orientation not in (None, 1) else im


def _pil_to_rgb(im):
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit scaled to 8 bits."""
    from PIL import Image

    if im.mode.startswith("I") or im.mode == "F":  # I;16*, I, I;32*: integers; F: float32
        return _array_to_rgb(np.asarray(im), f"image of mode {im.mode}")
    if im.mode == "P" and ("transparency" in im.info or (im.palette is not None and "A" in im.palette.mode)):
        im = im.convert("RGBA")
    if im.mode in _ALPHA_MODES:
        im = im.convert(_ALPHA_MODES[im.mode]).convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as err:
        raise MediaError(f"image of PIL mode {im.mode!r} cannot be converted to RGB ({err}); "
                         "convert it to 'RGB' or 'L' first") from err


def load_image(x: Any):
    """Path / PIL / array / tensor -> RGB PIL image."""
    from PIL import Image

    if isinstance(x, Image.Image):
        if x.size[0] * x.size[1] > MAX_PIXELS:
            raise MediaError(f"image of {x.size[0]}x{x.size[1]} pixels is over the {MAX_PIXELS} limit; downscale it")
        return _pil_to_rgb(_upright(x))
    if isinstance(x, (str, os.PathLike)):
        path = _existing_file(Path(x), "image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    w, h = im.size
                    if w * h > MAX_PIXELS:
                        raise MediaError(
                            f"image {str(path)!r} is {w}x{h} pixels, over the {MAX_PIXELS} limit "
                            "(a decompression bomb?); downscale it"
                        )
                    im.load()
                    return _pil_to_rgb(_upright(im))
        except MediaError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise MediaError(f"image {str(path)!r} is too large to decode safely ({err}); downscale it") from err
        except Exception as err:
            raise MediaError(
                f"cannot decode image {str(path)!r} ({type(err).__name__}: {err}); pass a valid PNG or JPEG file"
            ) from err
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _array_to_rgb(_as_numpy(x), f"image {_describe(x)}")
    raise MediaError(f"unsupported image input {_describe(x)}; pass a file path, PIL image, array or tensor")


# --------------------------------------------------------------------------- audio


def _check_rate(rate, what: str = "audio sample rate") -> int:
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise MediaError(f"{what} {rate!r} is not a positive integer; pass (waveform, rate_in_hz)")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"{what} {int(rate)} Hz is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz; "
                         "check the rate, or resample the recording first")
    return int(rate)


def _sample_limit(rate: int, max_seconds: float) -> int:
    return max(1, min(int(max_seconds * rate), MAX_AUDIO_SAMPLES))


def _cut_warning(seconds: float, limit: int, rate: int) -> None:
    warnings.warn(f"audio is {seconds:.1f} s long; using the first {limit / rate:g} s", stacklevel=3)


def load_audio(x: Any, sample_rate: int, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Path / array / tensor / ``(array, rate)`` -> mono float32 ``(samples,)`` at ``sample_rate``.

    Arrays without a rate are taken to be at ``sample_rate`` already. A file is read only up to
    ``max_seconds`` (and ``MAX_AUDIO_SAMPLES``), whatever length its header claims.
    """
    rate = sample_rate
    if isinstance(x, tuple) and len(x) == 2:
        x, rate = x
    if isinstance(x, (str, os.PathLike)):
        x, rate = _read_audio_file(_existing_file(Path(x), "audio"), max_seconds)
    if not isinstance(x, (np.ndarray, torch.Tensor, list)):
        raise MediaError(f"unsupported audio input {_describe(x)}; pass a WAV path, an array or (array, rate)")
    rate = _check_rate(rate)
    wave = _as_numpy(x)
    if np.issubdtype(wave.dtype, np.integer):  # PCM: scale to [-1, 1]
        wave = wave.astype(np.float32) / float(max(abs(np.iinfo(wave.dtype).min), np.iinfo(wave.dtype).max))
    elif not np.issubdtype(wave.dtype, np.floating):
        raise MediaError(f"audio has dtype {wave.dtype}; pass float samples in [-1, 1] or integer PCM")
    if wave.ndim not in (1, 2):
        raise MediaError(f"audio must be (samples,) or (channels, samples); got shape {wave.shape}")
    if wave.size == 0:
        raise MediaError("audio has zero samples; pass a non-empty recording")
    if not np.isfinite(wave).all() or np.abs(wave).max() > np.finfo(np.float32).max:
        raise MediaError("audio holds NaN or Inf samples; clean it (e.g. np.nan_to_num) before passing it in")
    wave = wave.astype(np.float32)
    if wave.ndim == 2:
        # (channels, samples) or (samples, channels): average the short axis.
        wave = wave.mean(axis=0 if wave.shape[0] <= wave.shape[1] else 1)
    limit = _sample_limit(rate, max_seconds)
    if wave.size > limit:
        _cut_warning(wave.size / rate, limit, rate)
        wave = wave[:limit]
    return resample(wave, rate, _check_rate(sample_rate, "target sample rate"))


def resample_ratio(orig: int, new: int, terms: int = MAX_RESAMPLE_TERMS) -> tuple[int, int]:
    """``orig -> new`` as the smallest ``(q, p)`` with ``p / q == new / orig``, or, when that needs
    a term above ``terms``, the nearest ratio whose terms stay within it (the resampling kernel
    is ``p x (q + filter)`` values, so unbounded terms are unbounded memory)."""
    ratio = Fraction(new, orig)
    if max(ratio.numerator, ratio.denominator) <= terms:
        return ratio.denominator, ratio.numerator
    if ratio >= 1:
        approx = ratio.limit_denominator(max(1, terms * orig // new))
    else:
        approx = 1 / (1 / ratio).limit_denominator(max(1, terms * new // orig))
    return approx.denominator, approx.numerator


def resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Mono float32 ``(samples,)`` from ``orig`` Hz to ``new`` Hz (windowed sinc, bounded kernel)."""
    if orig == new:
        return wave
    import torchaudio.functional as AF

    q, p = resample_ratio(orig, new)
    return AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), q, p).numpy()


_AUDIO_BLOCK = 1 << 18  # frames decoded at a time, so several channels never sit in memory at once


def _read_audio_file(path: Path, max_seconds: float = MAX_AUDIO_SECONDS) -> tuple[np.ndarray, int]:
    """-> (mono float32 samples, rate), reading no more than the sample limit from the file."""
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is None:
        return _read_wav(path, max_seconds)
    try:
        with soundfile.SoundFile(str(path)) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            _check_file_audio(path, rate, channels)
            limit = _sample_limit(rate, max_seconds)
            parts, total = [], 0
            while total < limit:
                block = f.read(min(_AUDIO_BLOCK, limit - total), dtype="float32", always_2d=True)  # (n, C)
                if not len(block):
                    break
                parts.append(block.mean(axis=1))
                total += len(block)
            more = total >= limit and len(f.read(1, dtype="float32"))
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(
            f"cannot decode audio {str(path)!r} ({type(err).__name__}: {err}); pass a WAV or FLAC file"
        ) from err
    if more:
        _cut_warning(max(frames, limit + 1) / rate, limit, rate)
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), rate


def _check_file_audio(path: Path, rate: int, channels: int) -> None:
    _check_rate(rate, f"audio {str(path)!r} has sample rate")
    if not 1 <= channels <= MAX_AUDIO_CHANNELS:
        raise MediaError(f"audio {str(path)!r} has {channels} channels, over the {MAX_AUDIO_CHANNELS} limit; "
                         "mix it down to mono or stereo")


def _read_wav(path: Path, max_seconds: float) -> tuple[np.ndarray, int]:
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, frames = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            _check_file_audio(path, rate, channels)
            limit = _sample_limit(rate, max_seconds)
            raw = w.readframes(min(frames, limit))
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode audio {str(path)!r} ({err}); pass a PCM WAV file") from err
    data = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    data = (data - 128.0) / 128.0 if width == 1 else data / float(np.iinfo(dtype).max)
    if frames > limit:
        _cut_warning(frames / rate, limit, rate)
    return data.reshape(-1, channels).mean(axis=1), rate


# --------------------------------------------------------------------------- checks


def check_media(x: Any, modality: str) -> None:
    """Decode ``x`` once as ``modality``; raise ``MediaError`` if it cannot be used.

    For up-front checks (CLI, demo uploads) before a model is asked to read the file; the
    model later decodes again at its own sample rate.
    """
    if modality == "image":
        load_image(x)
    elif modality == "audio":
        load_audio(x, 16000)
    elif modality == "video":
        load_video(x)
    else:
        raise MediaError(f"unknown modality {modality!r}; use image, audio or video")


# --------------------------------------------------------------------------- video


def _check_video_size(frames: int, height: int, width: int, what: str) -> None:
    """Refuse a video by its claimed size, before its frames are decoded."""
    if frames > MAX_VIDEO_FRAMES:
        raise MediaError(f"{what} has {frames} frames, over the {MAX_VIDEO_FRAMES} limit; subsample it")
    if height * width > MAX_PIXELS:
        raise MediaError(f"{what} frames are {width}x{height} pixels, over the {MAX_PIXELS}-pixel limit; downscale it")
    if frames * height * width > MAX_VIDEO_PIXELS:
        raise MediaError(
            f"{what} is {frames} frames of {width}x{height} pixels ({frames * height * width} in all), over the "
            f"{MAX_VIDEO_PIXELS}-pixel limit for a whole video; keep fewer frames or downscale them"
        )


def _same_size_frames(frames: list, what: str) -> np.ndarray:
    arrays = [np.asarray(load_image(f)) for f in frames]  # each (H, W, 3) uint8
    sizes = [a.shape[:2] for a in arrays]
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        raise MediaError(
            f"{what}: frame 0 is {sizes[0][1]}x{sizes[0][0]} pixels but frame {odd} is {sizes[odd][1]}x{sizes[odd][0]} pixels; "
            "resize the frames to one size"
        )
    _check_video_size(len(arrays), *sizes[0], what)
    return np.stack(arrays)


def load_video(x: Any) -> np.ndarray:
    """Path (GIF, MP4, .npy/.npz) / array / tensor / list of frames -> uint8 ``(T, H, W, 3)``."""
    what = f"video {_describe(x)}"
    if isinstance(x, (str, os.PathLike)):
        x = _read_video_file(_existing_file(Path(x), "video"))
    if isinstance(x, (list, tuple)):
        if not x:
            raise MediaError("video has zero frames; pass at least one frame")
        x = _same_size_frames(list(x), what)
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise MediaError(f"unsupported video input {_describe(x)}; pass a path, a (T, H, W, 3) array or tensor")
    arr = _as_numpy(x)
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise MediaError(f"{what}: video must be (T, H, W, 3) or (T, 3, H, W); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise MediaError(f"{what} has zero frames; pass at least one frame")
    _check_video_size(*arr.shape[:3], what)
    if arr.dtype == np.uint8 and arr.shape[-1] == 3:
        return np.ascontiguousarray(arr)
    out = np.empty(arr.shape[:3] + (3,), np.uint8)  # (T, H, W, 3), filled frame by frame
    for t, frame in enumerate(arr):
        out[t] = np.asarray(_array_to_rgb(frame, what))
    return out


def _npy_header(f, what: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype from an open ``.npy`` stream's header, without reading its data."""
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
    if read is None:
        raise MediaError(f"{what} has .npy format version {version}; save it again with numpy.save")
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise MediaError(f"{what} holds Python objects (a pickle), which are not loaded; save a numeric array")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_VIDEO_ARRAY_BYTES:
        raise MediaError(f"{what} holds a {shape} {dtype} array ({nbytes} bytes), over the "
                         f"{MAX_VIDEO_ARRAY_BYTES}-byte limit; keep fewer frames or downscale them")
    if len(shape) == 4:
        t, h, w = shape[:3] if shape[-1] in (1, 3, 4) else (shape[0], *shape[2:])
        _check_video_size(t, h, w, what)
    return shape, dtype


def _read_npz(path: Path, what: str) -> np.ndarray:
    with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith(".npy")]
        if not names:
            raise MediaError(f"{what} holds no arrays")
        name = "frames.npy" if "frames.npy" in names else names[0]
        with z.open(name) as f:
            _npy_header(f, what)
    with np.load(path, allow_pickle=False) as arrays:
        return arrays[name[: -len(".npy")]]


def _read_frames(frames, what: str) -> np.ndarray:
    """Frames from an iterator, stopping as soon as they pass the video limits."""
    out = []
    for frame in frames:
        frame = np.asarray(frame)
        _check_video_size(len(out) + 1, frame.shape[0], frame.shape[1], what)
        out.append(frame)
    if not out:
        raise MediaError(f"{what} has zero frames; pass at least one frame")
    return _same_size_frames(out, what)


def _read_video_file(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    what = f"video {str(path)!r}"
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                _npy_header(f, what)
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            return _read_npz(path, what)
        if suffix == ".gif":
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                _check_video_size(1, h, w, what)
                _check_video_size(getattr(im, "n_frames", 1), h, w, what)  # counts frames, decodes none
                out = np.empty((im.n_frames, h, w, 3), np.uint8)
                for t in range(im.n_frames):
                    im.seek(t)
                    out[t] = np.asarray(im.convert("RGB"))
                return out
        import imageio.v3 as iio

        return _read_frames(iio.imiter(path), what)
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(
            f"cannot decode video {str(path)!r} ({type(err).__name__}: {err}); pass an MP4, GIF or .npy file"
        ) from err
