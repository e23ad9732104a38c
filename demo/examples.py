"""Example media from the toy world, written at start-up for the demo's clickable examples."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mmllm.toy import world


def write_example_media(folder: str | Path, size: int = 96) -> dict[str, Path]:
    """Write a red circle (PNG), a medium beep (WAV) and a red circle moving right (MP4, or
    an animated GIF without imageio-ffmpeg) into ``folder`` -> {modality: path}."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "red-circle.png"
    Image.fromarray(world.render_image(world.ImageSpec("red", "circle"), size=size)).save(image)
    audio = folder / "beep.wav"
    world.write_wav(audio, world.render_audio(world.AudioSpec("medium"), sample_rate=16000), 16000)
    frames = world.render_video(world.VideoSpec("red", "circle", "right"), size=size, frames=8)  # (T, H, W, 3)
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio

        video = folder / "moving-right.mp4"
        with imageio.get_writer(str(video), fps=4, macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame)
    else:
        video = folder / "moving-right.gif"
        images = [Image.fromarray(f) for f in frames]
        images[0].save(video, save_all=True, append_images=images[1:], duration=250, loop=0)
    return {"image": image, "audio": audio, "video": video}


def example_messages(media: dict[str, Path], accepted: tuple[str, ...]) -> list[dict]:
    """The toy world's four requests as MultimodalTextbox values; an example whose file the
    model cannot read is sent without it."""

    def files(modality):
        return [str(media[modality])] if modality in accepted else []

    # The toy model learned requests that name every attribute; asked a bare "Draw a red
    # circle." it can answer with a video.
    return [
        {"text": "Describe this image.", "files": files("image")},
        {"text": "Draw a large red circle in the middle.", "files": []},
        {"text": "What sound is this?", "files": files("audio")},
        {"text": "Make it move left.", "files": files("video")},
    ]
