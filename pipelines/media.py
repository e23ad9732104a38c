"""Media returned by the decoders, each with ``save(path) -> path actually written``.

Images and videos also have ``preview(min_side)``: a copy enlarged by a whole factor with
nearest-neighbour pixels, for showing a small picture (the toy decoders draw 32 x 32) at a
size a person can judge. ``save`` always writes the pixels as generated."""

from __future__ import annotations

import importlib.util
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


PREVIEW_SIDE = 256  # pixels: small outputs are shown at least this large


def upscale_factor(width: int, height: int, min_side: int = PREVIEW_SIDE) -> int:
    """The whole factor that brings the shorter side to at least ``min_side`` (1 if it is already)."""
    return max(1, -(-min_side // max(1, min(width, height))))


def _with_suffix(path: str | os.PathLike, suffix: str) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == suffix else path.with_suffix(suffix)


@dataclass
class ImageOutput:
    image: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size  # (W, H), PIL order

    def numpy(self) -> np.ndarray:
        return np.asarray(self.image)  # (H, W, 3) uint8

    def save(self, path: str | os.PathLike) -> Path:
        path = _with_suffix(path, ".png")
        self.image.save(path)
        return path

    def preview(self, min_side: int = PREVIEW_SIDE) -> "ImageOutput":
        """This image enlarged by a whole factor, nearest-neighbour, to at least ``min_side`` pixels a side."""
        k = upscale_factor(*self.image.size, min_side)
        if k == 1:
            return self
        return ImageOutput(self.image.resize((self.image.width * k, self.image.height * k), Image.NEAREST))


@dataclass
class AudioOutput:
    waveform: np.ndarray  # float32 in [-1, 1], (samples,) or (channels, samples)
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate

    def save(self, path: str | os.PathLike) -> Path:
        path = _with_suffix(path, ".wav")
        data = np.asarray(self.waveform, dtype=np.float32)
        data = data.T if data.ndim == 2 else data  # files want (samples, channels)
        if importlib.util.find_spec("soundfile") is not None:
            import soundfile

            soundfile.write(str(path), data, self.sample_rate, subtype="PCM_16")
            return path
        pcm = (np.clip(data, -1.0, 1.0) * 32767).round().astype("<i2")
        with wave.open(str(path), "wb") as f:
            f.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
            f.setsampwidth(2)  # int16
            f.setframerate(self.sample_rate)
            f.writeframes(pcm.tobytes())
        return path


@dataclass
class VideoOutput:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: int

    def preview(self, min_side: int = PREVIEW_SIDE) -> "VideoOutput":
        """These frames enlarged by a whole factor, nearest-neighbour, to at least ``min_side`` pixels a side."""
        k = upscale_factor(self.frames.shape[2], self.frames.shape[1], min_side)
        if k == 1:
            return self
        return VideoOutput(self.frames.repeat(k, axis=1).repeat(k, axis=2), self.fps)

    def save(self, path: str | os.PathLike) -> Path:
        """MP4 when imageio-ffmpeg is installed, else an animated GIF (the suffix says which)."""
        if importlib.util.find_spec("imageio_ffmpeg") is not None and importlib.util.find_spec("imageio"):
            import imageio

            path = _with_suffix(path, ".mp4")
            # macro_block_size=1: keep tiny or odd frame sizes as they are instead of resizing.
            with imageio.get_writer(str(path), fps=self.fps, macro_block_size=1) as writer:
                for frame in self.frames:
                    writer.append_data(frame)
            return path
        path = _with_suffix(path, ".gif")
        images = [Image.fromarray(f) for f in self.frames]
        images[0].save(
            path, save_all=True, append_images=images[1:], duration=round(1000 / self.fps), loop=0
        )
        return path
