"""Decoding user media into arrays: the one place where files are read.

* images -> RGB ``PIL.Image``
* audio  -> mono ``float32`` waveform ``(samples,)`` at a requested sample rate
* video  -> ``uint8`` frames ``(T, H, W, 3)``

Accepted inputs: file paths, PIL images, numpy arrays and torch tensors. What is fixed on the
way, and how (docs/RELIABILITY.md lists every case):

* images: grayscale, palette and CMYK become RGB; transparency is composited on white;
  16-bit and 32-bit images are scaled to 8 bits; float arrays in [0, 1] are scaled to 0-255.
* audio: any sample rate is resampled; several channels are averaged to mono; integer PCM is
  scaled to [-1, 1]; audio longer than ``max_seconds`` is cut there with a warning.
* video: ``(T, C, H, W)`` is transposed; grayscale frames become RGB.

Anything else (no such file, an empty or truncated file, a decompression bomb, NaN samples,
zero frames, an unsupported type) raises ``MediaError`` naming the input and the fix.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".npy", ".npz")

MAX_PIXELS = 64_000_000  # per image or frame; larger inputs are refused before decoding
MAX_AUDIO_SECONDS = 600.0
MAX_VIDEO_FRAMES = 10_000


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
    raise MediaError(f"{what} has values up to {hi:g}; pass 8-bit, 16-bit or [0, 1] float pixels")


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


def _pil_to_rgb(im):
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit scaled to 8 bits."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _array_to_rgb(np.asarray(im).astype(np.float64 if im.mode == "F" else np.int64), "image")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(x: Any):
    """Path / PIL / array / tensor -> RGB PIL image."""
    from PIL import Image

    if isinstance(x, Image.Image):
        if x.size[0] * x.size[1] > MAX_PIXELS:
            raise MediaError(f"image of {x.size[0]}x{x.size[1]} pixels is over the {MAX_PIXELS} limit; downscale it")
        return _pil_to_rgb(x)
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
                    return _pil_to_rgb(im)
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


def load_audio(x: Any, sample_rate: int, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Path / array / tensor / ``(array, rate)`` -> mono float32 ``(samples,)`` at ``sample_rate``.

    Arrays without a rate are taken to be at ``sample_rate`` already.
    """
    rate = sample_rate
    if isinstance(x, tuple) and len(x) == 2:
        x, rate = x
    if isinstance(x, (str, os.PathLike)):
        x, rate = _read_audio_file(_existing_file(Path(x), "audio"))
    if not isinstance(x, (np.ndarray, torch.Tensor, list)):
        raise MediaError(f"unsupported audio input {_describe(x)}; pass a WAV path, an array or (array, rate)")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise MediaError(f"audio sample rate {rate!r} is not a positive integer; pass (waveform, rate_in_hz)")
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
    limit = int(max_seconds * rate)
    if wave.size > limit:
        warnings.warn(f"audio is {wave.size / rate:.1f} s long; using the first {max_seconds:g} s", stacklevel=2)
        wave = wave[:limit]
    if rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(np.ascontiguousarray(wave)), int(rate), int(sample_rate)).numpy()
    return wave


def _read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        try:
            data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
            return data.T, rate  # (channels, samples)
        except Exception as err:
            raise MediaError(
                f"cannot decode audio {str(path)!r} ({type(err).__name__}: {err}); pass a WAV or FLAC file"
            ) from err
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            raw = w.readframes(w.getnframes())
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    except Exception as err:
        raise MediaError(f"cannot decode audio {str(path)!r} ({err}); pass a PCM WAV file") from err
    data = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    data = (data - 128.0) / 128.0 if width == 1 else data / float(np.iinfo(dtype).max)
    return data.reshape(-1, channels).T, rate


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


def load_video(x: Any) -> np.ndarray:
    """Path (GIF, MP4, .npy/.npz) / array / tensor / list of frames -> uint8 ``(T, H, W, 3)``."""
    what = f"video {_describe(x)}"
    if isinstance(x, (str, os.PathLike)):
        x = _read_video_file(_existing_file(Path(x), "video"))
    if isinstance(x, (list, tuple)):
        if not x:
            raise MediaError("video has zero frames; pass at least one frame")
        x = np.stack([np.asarray(load_image(f)) for f in x])
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise MediaError(f"unsupported video input {_describe(x)}; pass a path, a (T, H, W, 3) array or tensor")
    arr = _as_numpy(x)
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise MediaError(f"{what}: video must be (T, H, W, 3) or (T, 3, H, W); got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise MediaError(f"{what} has zero frames; pass at least one frame")
    if arr.shape[0] > MAX_VIDEO_FRAMES:
        raise MediaError(f"{what} has {arr.shape[0]} frames, over the {MAX_VIDEO_FRAMES} limit; subsample it")
    frames = [np.asarray(_array_to_rgb(f, what)) for f in arr]
    return np.stack(frames)


def _read_video_file(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise MediaError(f"video {str(path)!r} holds no arrays")
                return z["frames"] if "frames" in z.files else z[z.files[0]]
        if suffix == ".gif":
            from PIL import Image, ImageSequence

            with Image.open(path) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    raise MediaError(f"video {str(path)!r} frames are over the {MAX_PIXELS}-pixel limit")
                return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        import imageio.v3 as iio

        return np.asarray(iio.imread(path, index=None))
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(
            f"cannot decode video {str(path)!r} ({type(err).__name__}: {err}); pass an MP4, GIF or .npy file"
        ) from err
