"""``EchoModel``: a stand-in with the ``model.generate`` interface that answers instantly
and returns toy-world media. For UI tests and screenshots without loading a network."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from mmllm.generation import GenerateResult
from mmllm.modalities import NAMES
from mmllm.toy import world
from pipelines.media import AudioOutput, ImageOutput, VideoOutput


@dataclass
class _Stream:
    """Iterable of text pieces; ``.result`` once exhausted (as ``mmllm.generation.TextStream``)."""

    pieces: list[str]
    final: GenerateResult
    result: GenerateResult | None = None

    def __iter__(self):
        yield from self.pieces
        self.result = self.final


class EchoModel:
    """Echoes the prompt; a prompt naming "draw", "sound"/"play" or "move" also gets a red
    circle image, a beep or a clip of a circle moving left. ``calls`` records every request."""

    input_modalities = NAMES
    output_modalities = NAMES

    def __init__(self):
        self.config = SimpleNamespace(inputs={m: SimpleNamespace(placeholder=f"<{m}>")
                                              for m in self.input_modalities})
        self.calls: list[dict] = []

    def generate(self, prompt=None, *, image=None, audio=None, video=None, history=None, stream=False, **kwargs):
        if not prompt or not str(prompt).strip():
            raise ValueError("the prompt is empty")
        self.calls.append(dict(prompt=prompt, image=image, audio=audio, video=video, history=history, **kwargs))
        attached = [m for m, v in (("image", image), ("audio", audio), ("video", video)) if v is not None]
        text = f"You said: {prompt}" + (f" (with {', '.join(attached)})" if attached else "")
        result = GenerateResult(text=text)
        words = prompt.lower()
        if "draw" in words:
            result.images.append(ImageOutput(_pil(world.render_image(world.ImageSpec("red", "circle"), size=64))))
        if "sound" in words or "play" in words:
            wave = world.render_audio(world.AudioSpec("medium"), sample_rate=16000, seconds=1.0)
            result.audio.append(AudioOutput(wave, 16000))
        if "move" in words:
            frames = world.render_video(world.VideoSpec("red", "circle", "left"), size=64, frames=8)
            result.videos.append(VideoOutput(frames, fps=4))
        if not stream:
            return result
        return _Stream([(" " if i else "") + w for i, w in enumerate(text.split(" "))], result)


def _pil(array):
    from PIL import Image

    return Image.fromarray(array)
