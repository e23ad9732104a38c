"""Decoding user media into arrays: the one place where files are read.

* images -> RGB ``PIL.Image``
* audio  -> mono ``float32`` waveform ``(samples,)`` at a requested sample rate
* video  -> ``uint8`` frames ``(T, H, W, 3)``

Accepted inputs: file paths, PIL images, numpy arrays and torch tensors. Anything else, or a
file that cannot be decoded, raises ``MediaError`` naming the input and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv", ".npy", ".npz")


class MediaError(ValueError):
    """Bad media input; the message names the input and the fix."""


def _describe(x: Any) -> str:
    if isinstance(x, (str, os.PathLike)):
        return repr(str(x))
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return f"{type(x).__name__} of shape {tuple(x.shape)}"
    return type(x).__name__


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] or uint8 -> uint8."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise MediaError("image array holds NaN or Inf values; clean it before passing it in")
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _hwc(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, C)."""
    if arr.ndim == 2:
        return arr[..., None]
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        return arr.transpose(1, 2, 0)
    if arr.ndim == 3:
        return arr
    raise MediaError(f"an image array must be (H, W), (H, W, C) or (C, H, W); got shape {arr.shape}")


def load_image(x: Any):
    """Path / PIL / array / tensor -> RGB PIL image."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB")
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        if not path.is_file():
            raise MediaError(f"image file {str(path)!r} does not exist; check the path")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except Exception as err:
            raise MediaError(f"cannot decode image {str(path)!r} ({err}); pass a PNG or JPEG file") from err
    if isinstance(x, (np.ndarray, torch.Tensor)):
        arr = _hwc(_as_numpy(x))
        arr = _to_uint8(arr)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB")
    raise MediaError(f"unsupported image input {_describe(x)}; pass a file path, PIL image, array or tensor")


def load_audio(x: Any, sample_rate: int) -> np.ndarray:
    """Path / array / tensor / ``(array, rate)`` -> mono float32 ``(samples,)`` at ``sample_rate``.

    Arrays without a rate are taken to be at ``sample_rate`` already. Multichannel audio is
    averaged to mono; other rates are resampled.
    """
    rate = sample_rate
    if isinstance(x, tuple) and len(x) == 2:
        x, rate = x
    if isinstance(x, (str, os.PathLike)):
        x, rate = _read_audio_file(Path(x))
    if not isinstance(x, (np.ndarray, torch.Tensor, list)):
        raise MediaError(f"unsupported audio input {_describe(x)}; pass a WAV path, an array or (array, rate)")
    wave = _as_numpy(x).astype(np.float32)
    if wave.ndim == 2:
        # (channels, samples) or (samples, channels): average the short axis.
        wave = wave.mean(axis=0 if wave.shape[0] <= wave.shape[1] else 1)
    if wave.ndim != 1:
        raise MediaError(f"audio must be (samples,) or (channels, samples); got shape {wave.shape}")
    if wave.size == 0:
        raise MediaError("audio has zero samples; pass a non-empty recording")
    if not np.isfinite(wave).all():
        raise MediaError("audio holds NaN or Inf samples; clean it before passing it in")
    if rate != sample_rate:
        import torchaudio.functional as AF

        wave = AF.resample(torch.from_numpy(wave), int(rate), int(sample_rate)).numpy()
    return wave


def _read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise MediaError(f"audio file {str(path)!r} does not exist; check the path")
    try:
        import soundfile

        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return data.T, rate  # (channels, samples)
    except ImportError:
        pass
    except Exception as err:
        raise MediaError(f"cannot decode audio {str(path)!r} ({err}); pass a WAV or FLAC file") from err
    import wave

    try:
        with wave.open(str(path), "rb") as w:
            raw = w.readframes(w.getnframes())
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
    except Exception as err:
        raise MediaError(f"cannot decode audio {str(path)!r} ({err}); pass a PCM WAV file") from err
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    data = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    data = (data - 128.0) / 128.0 if width == 1 else data / float(np.iinfo(dtype).max)
    return data.reshape(-1, channels).T, rate


def load_video(x: Any) -> np.ndarray:
    """Path (GIF, MP4, .npy) / array / tensor -> uint8 frames ``(T, H, W, 3)``."""
    if isinstance(x, (str, os.PathLike)):
        x = _read_video_file(Path(x))
    if isinstance(x, (list, tuple)):
        x = np.stack([np.asarray(load_image(f)) for f in x]) if len(x) else np.zeros((0,))
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise MediaError(f"unsupported video input {_describe(x)}; pass a path, a (T, H, W, 3) array or tensor")
    arr = _as_numpy(x)
    if arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # (T, C, H, W) -> (T, H, W, C)
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise MediaError(f"video must be (T, H, W, 3) with at least one frame; got shape {arr.shape}")
    arr = _to_uint8(arr)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def _read_video_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MediaError(f"video file {str(path)!r} does not exist; check the path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z[z.files[0]]
        if suffix == ".gif":
            from PIL import Image, ImageSequence

            with Image.open(path) as im:
                return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
        import imageio.v3 as iio

        return np.asarray(iio.imread(path, index=None))
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode video {str(path)!r} ({err}); pass an MP4, GIF or .npy file") from err
