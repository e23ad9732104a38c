"""Media returned by the decoders, each with ``save(path) -> path actually written``."""

from __future__ import annotations

import importlib.util
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


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
