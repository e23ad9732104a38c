"""Decoder wrappers vs the stock diffusers pipelines, on tiny seeded offline pipelines."""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from mmllm.config import DecoderConfig
from pipelines import DECODERS, AudioOutput, ImageOutput, VideoOutput, build_decoder
from pipelines.decoders import (
    AnimateDiffDecoder,
    AudioLDMDecoder,
    StableDiffusionDecoder,
    TargetCache,
    TextToVideoDecoder,
)
from pipelines.tiny import tiny_animatediff, tiny_audioldm, tiny_stable_diffusion, tiny_text_to_video

TEXT_WIDTH = 48
AUDIO_PROJECTION = 24
CAPTIONS = ["a red square on grass", "two dogs"]


@dataclass
class Case:
    """One modality: its tiny pipeline, decoder, fast settings and how the pipeline returns media."""

    name: str
    pipe: object
    decoder: object
    settings: dict
    output_type: str
    extra: dict = field(default_factory=dict)

    def direct(self, prompt_embeds, seed, **kwargs):
        """Call the stock pipeline directly; returns its raw media as numpy arrays."""
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe_settings = {k: v for k, v in self.settings.items() if k != "fps"}
        with torch.no_grad():
            result = self.pipe(
                prompt_embeds=prompt_embeds,
                generator=generator,
                output_type=self.output_type,
                **pipe_settings,
                **kwargs,
            )
        return raw_arrays(self.name, result)


def raw_arrays(name, result):
    if name == "image":
        return [np.asarray(im) for im in result.images]
    if name == "video":
        return [np.stack([np.asarray(f) for f in video]) for video in result.frames]
    return [np.asarray(a) for a in result.audios]


def our_arrays(outputs):
    arrays = []
    for out in outputs:
        if isinstance(out, ImageOutput):
            arrays.append(out.numpy())
        elif isinstance(out, VideoOutput):
            arrays.append(out.frames)
        else:
            arrays.append(out.waveform)
    return arrays


@pytest.fixture(scope="module")
def cases():
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    sd = tiny_stable_diffusion(text_width=TEXT_WIDTH, seed=0)
    vid = tiny_text_to_video(text_width=TEXT_WIDTH, seed=0)
    aud = tiny_audioldm(projection_dim=AUDIO_PROJECTION, seed=0)
    anim = tiny_animatediff(text_width=TEXT_WIDTH, seed=0)
    for p in (sd, vid, aud, anim):
        p.set_progress_bar_config(disable=True)
    image_settings = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": 32, "width": 32}
    video_settings = {**image_settings, "num_frames": 3, "fps": 4}
    audio_settings = {"num_inference_steps": 2, "guidance_scale": 2.5, "audio_length_in_s": 0.5}
    return {
        "image": Case("image", sd, StableDiffusionDecoder.from_pipeline(sd, **image_settings), image_settings, "pil"),
        "video": Case("video", vid, TextToVideoDecoder.from_pipeline(vid, **video_settings), video_settings, "pil"),
        "audio": Case("audio", aud, AudioLDMDecoder.from_pipeline(aud, **audio_settings), audio_settings, "np"),
        # A second video backend: the same checks, on AnimateDiff's motion-module UNet.
        "animatediff": Case("video", anim, AnimateDiffDecoder.from_pipeline(anim, **video_settings), video_settings,
                            "pil"),
    }


MODALITIES = ["image", "video", "audio", "animatediff"]


def pipeline_encode(case, captions, guidance=False):
    """The pipeline's internal prompt encoding: (positive, negative-or-None)."""
    with torch.no_grad():
        if case.name == "audio":
            out = case.pipe._encode_prompt(captions, torch.device("cpu"), 1, guidance)
            return (out[len(captions):], out[: len(captions)]) if guidance else (out, None)
        return case.pipe.encode_prompt(captions, torch.device("cpu"), 1, guidance)


# --------------------------------------------------------------------------- equivalence with diffusers


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_equals_direct_pipeline_call(cases, modality):
    case = cases[modality]
    embeds = torch.randn(2, *case.decoder.conditioning_shape, generator=torch.Generator().manual_seed(5))
    negative = case.decoder.negative_embeds(2)
    ours = our_arrays(case.decoder.generate(embeds, seed=11, negative_prompt_embeds=negative))
    theirs = case.direct(embeds, 11, negative_prompt_embeds=negative)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("modality", ["image", "video", "animatediff"])
def test_default_negative_matches_pipelines_own_empty_prompt(cases, modality):
    # Without negative_prompt_embeds the pipeline encodes "" itself; ours must be identical.
    case = cases[modality]
    embeds = torch.randn(1, *case.decoder.conditioning_shape, generator=torch.Generator().manual_seed(2))
    ours = our_arrays(case.decoder.generate(embeds, seed=3))
    theirs = case.direct(embeds, 3)
    assert np.array_equal(ours[0], theirs[0])


def test_audio_default_negative_matches_pipelines_empty_prompt_encoding(cases):
    # AudioLDM pads its own "" to prompt_embeds.shape[1] tokens (the CLAP width), ours to the
    # tokenizer length; padded positions are masked, so the embeddings agree to float precision.
    case = cases["audio"]
    _, negative = pipeline_encode(case, ["x"], guidance=True)
    assert torch.allclose(case.decoder.negative_embeds(1), negative, atol=1e-5)


def test_text_prompt_path_equals_encode_text_then_generate(cases):
    # pipe(prompt=captions) and generate(encode_text(captions)) are the same computation.
    case = cases["image"]
    ours = our_arrays(case.decoder.generate(case.decoder.encode_text(CAPTIONS), seed=4))
    generator = torch.Generator("cpu").manual_seed(4)
    with torch.no_grad():
        theirs = raw_arrays("image", case.pipe(prompt=CAPTIONS, generator=generator, output_type="pil", **case.settings))
    for a, b in zip(ours, theirs):
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("modality", MODALITIES)
def test_output_types_and_shapes(cases, modality):
    case = cases[modality]
    embeds = case.decoder.encode_text(CAPTIONS)
    outputs = case.decoder.generate(embeds, seed=0)
    assert len(outputs) == 2
    for out in outputs:
        if case.name == "image":
            assert isinstance(out, ImageOutput) and out.size == (32, 32) and out.image.mode == "RGB"
        elif case.name == "video":
            assert isinstance(out, VideoOutput) and out.fps == 4
            assert out.frames.shape == (3, 32, 32, 3) and out.frames.dtype == np.uint8
        else:
            rate = case.pipe.vocoder.config.sampling_rate
            assert isinstance(out, AudioOutput) and out.sample_rate == rate
            assert out.waveform.dtype == np.float32
            assert out.waveform.shape == (int(0.5 * rate),)


@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_repeats_and_different_seed_differs(cases, modality):
    decoder = cases[modality].decoder
    embeds = decoder.encode_text(CAPTIONS[:1])
    a, b, c = (our_arrays(decoder.generate(embeds, seed=s))[0] for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_rescale_reaches_the_pipeline(cases):
    # guidance_rescale (for zero-terminal-SNR decoders) is the pipeline's own argument: the
    # same pixels as a direct call with it, other pixels than without it.
    case = cases["image"]
    embeds = torch.randn(1, *case.decoder.conditioning_shape, generator=torch.Generator().manual_seed(6))
    negative = case.decoder.negative_embeds(1)
    ours = our_arrays(case.decoder.generate(embeds, seed=2, negative_prompt_embeds=negative, guidance_rescale=0.7))
    assert np.array_equal(ours[0], case.direct(embeds, 2, negative_prompt_embeds=negative, guidance_rescale=0.7)[0])
    assert not np.array_equal(ours[0], case.direct(embeds, 2, negative_prompt_embeds=negative)[0])
    with pytest.raises(TypeError, match="guidance_rescale"):  # a video pipeline has no such argument
        cases["video"].decoder.generate(cases["video"].decoder.encode_text(["x"]), seed=0, guidance_rescale=0.7)


def test_settings_override_options_per_call(cases):
    decoder = cases["image"].decoder
    out = decoder.generate(decoder.encode_text(["x"]), seed=0, height=16, width=48)
    assert out[0].size == (48, 16)


# --------------------------------------------------------------------------- conditioning


def test_conditioning_shape_is_read_from_the_components(cases):
    assert cases["image"].decoder.conditioning_shape == (77, TEXT_WIDTH)
    assert cases["video"].decoder.conditioning_shape == (77, TEXT_WIDTH)
    assert cases["animatediff"].decoder.conditioning_shape == (77, TEXT_WIDTH)
    assert cases["audio"].decoder.conditioning_shape == (AUDIO_PROJECTION,)
    narrow = StableDiffusionDecoder.from_pipeline(tiny_stable_diffusion(text_width=24, max_length=16))
    assert narrow.conditioning_shape == (16, 24)


@pytest.mark.parametrize("modality", MODALITIES)
def test_encode_text_equals_pipeline_internal_encoding(cases, modality):
    case = cases[modality]
    ours = case.decoder.encode_text(CAPTIONS)
    theirs, _ = pipeline_encode(case, CAPTIONS)
    assert ours.shape == (2, *case.decoder.conditioning_shape)
    assert torch.equal(ours, theirs)
    assert not ours.requires_grad
    if modality == "audio":
        assert torch.allclose(ours.norm(dim=-1), torch.ones(2))  # L2-normalised CLAP embedding


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_target_cache_memory_and_disk(cases, modality, tmp_path):
    decoder = cases[modality].decoder
    reference = decoder.encode_text(CAPTIONS)
    cache = TargetCache(tmp_path / "targets")
    first = decoder.encode_text(CAPTIONS + CAPTIONS[:1], cache=cache)
    assert len(cache) == 2 and len(list((tmp_path / "targets").glob("*.safetensors"))) == 2
    assert torch.allclose(first[:2], reference, atol=1e-6)
    assert torch.equal(first[2], first[0])
    assert torch.equal(decoder.encode_text(CAPTIONS, cache=cache), first[:2])
    reopened = TargetCache(tmp_path / "targets")  # a fresh process reads the files
    assert torch.equal(reopened.get(CAPTIONS[1]), first[1])
    assert reopened.get("never seen") is None


def test_target_cache_refuses_targets_of_another_decoder(cases, tmp_path):
    cache = TargetCache(tmp_path)
    cases["audio"].decoder.encode_text(["shared caption"], cache=cache)
    with pytest.raises(ValueError, match="separate TargetCache directory per decoder"):
        cases["image"].decoder.encode_text(["shared caption"], cache=cache)


# --------------------------------------------------------------------------- saving media


def test_image_saves_png_and_reads_back(cases, tmp_path):
    decoder = cases["image"].decoder
    out = decoder.generate(decoder.encode_text(["x"]), seed=0)[0]
    path = out.save(tmp_path / "img")
    assert path.suffix == ".png"
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), out.numpy())


def _sine(rate=16000, seconds=0.25):
    t = np.arange(int(rate * seconds)) / rate
    return AudioOutput((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def test_audio_saves_wav_and_reads_back(cases, tmp_path):
    import wave

    decoder = cases["audio"].decoder
    out = decoder.generate(decoder.encode_text(["x"]), seed=0)[0]
    path = out.save(tmp_path / "a.wav")
    with wave.open(str(path)) as f:
        assert f.getframerate() == out.sample_rate and f.getnframes() == out.waveform.shape[0]
    sine = _sine()
    with wave.open(str(sine.save(tmp_path / "sine"))) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2") / 32767
    assert np.abs(pcm - sine.waveform).max() < 1e-3


def test_audio_wav_fallback_without_soundfile(tmp_path, monkeypatch):
    import wave

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "soundfile" else real(n, *a))
    stereo = AudioOutput(np.stack([_sine().waveform, -_sine().waveform]), 16000)
    with wave.open(str(stereo.save(tmp_path / "s.wav"))) as f:
        assert f.getnchannels() == 2 and f.getnframes() == 4000
        pcm = np.frombuffer(f.readframes(4000), dtype="<i2").reshape(-1, 2).T / 32767
    assert np.abs(pcm - stereo.waveform).max() < 1e-3


def test_video_saves_and_reads_back(cases, tmp_path):
    decoder = cases["video"].decoder
    out = decoder.generate(decoder.encode_text(["x"]), seed=0)[0]
    path = out.save(tmp_path / "clip")
    if path.suffix == ".mp4":
        import imageio

        with imageio.get_reader(str(path)) as reader:
            frames = [np.asarray(f) for f in reader]
    else:
        frames = _gif_frames(path)
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3)


def _gif_frames(path):
    with Image.open(path) as gif:
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


def test_video_gif_fallback_without_ffmpeg(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else real(n, *a))
    frames = np.stack([np.full((8, 10, 3), 40 * i, dtype=np.uint8) for i in range(4)])
    path = VideoOutput(frames, fps=5).save(tmp_path / "v.mp4")
    assert path.suffix == ".gif"
    read = _gif_frames(path)
    assert len(read) == 4 and np.array_equal(read[2], frames[2])


# --------------------------------------------------------------------------- loading and registry


@pytest.mark.parametrize(
    "backend,builder",
    [("stable_diffusion", tiny_stable_diffusion), ("audioldm", tiny_audioldm), ("text_to_video_sd", tiny_text_to_video),
     ("animatediff", tiny_animatediff)],
)
def test_save_and_load_by_path_round_trip(backend, builder, tmp_path):
    pipe = builder(seed=1)
    pipe.set_progress_bar_config(disable=True)
    fast = {"num_inference_steps": 2}
    fast.update({"audio_length_in_s": 0.5} if backend == "audioldm" else {"height": 32, "width": 32})
    if backend in ("text_to_video_sd", "animatediff"):
        fast["num_frames"] = 2
    original = DECODERS.get(backend).from_pipeline(pipe, **fast)
    original.save_pretrained(tmp_path / "dec")

    loaded = build_decoder(DecoderConfig(backend=backend, source=str(tmp_path / "dec"), options=fast))
    # The shape comes from the saved tokenizer and text-encoder config, before any weights load.
    assert loaded.conditioning_shape == original.conditioning_shape and not loaded.loaded
    embeds = original.encode_text(["round trip"])
    assert torch.equal(loaded.encode_text(["round trip"]), embeds)
    a = our_arrays(original.generate(embeds, seed=2))[0]
    b = our_arrays(loaded.generate(embeds, seed=2))[0]
    assert np.array_equal(a, b)


def test_random_init_builds_tiny_decoder_from_arch():
    decoder = build_decoder(DecoderConfig(backend="stable_diffusion", init="random", arch={"text_width": 40}))
    assert decoder.conditioning_shape == (77, 40)


def test_unknown_backend_lists_valid_names():
    with pytest.raises(KeyError) as err:
        build_decoder(DecoderConfig(backend="stable_difusion"))
    for name in ("stable_diffusion", "audioldm", "text_to_video_sd", "animatediff"):
        assert name in str(err.value)
    assert {"audioldm", "stable_diffusion", "text_to_video_sd", "animatediff"} <= set(pipelines.DECODERS.names())


def test_errors_say_the_fix(cases):
    decoder = cases["image"].decoder
    with pytest.raises(ValueError, match=r"expected \(B, 77, 48\) from this decoder's text encoder, got \(1, 77, 768\)"):
        decoder.generate(torch.zeros(1, 77, 768))
    with pytest.raises(ValueError, match=r"expected \(B, 24\)"):
        cases["audio"].decoder.generate(torch.zeros(1, 77, AUDIO_PROJECTION))
    with pytest.raises(TypeError, match="valid settings are"):
        decoder.generate(decoder.encode_text(["x"]), num_frames=4)
    with pytest.raises(KeyError, match="valid options are"):
        StableDiffusionDecoder(DecoderConfig(options={"steps": 3}))
    with pytest.raises(ValueError, match="set decoder.source"):
        build_decoder(DecoderConfig(backend="audioldm")).pipeline
    with pytest.raises(TypeError, match="wraps diffusers.AudioLDMPipeline"):
        AudioLDMDecoder.from_pipeline(cases["image"].pipe)
    with pytest.raises(TypeError, match="list of captions"):
        decoder.encode_text("a caption")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_cpu_offload_without_cuda_stays_on_cpu_and_says_so(cases):
    decoder = cases["image"].decoder
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        assert decoder.enable_cpu_offload() is False
    assert decoder.to("cpu").device == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_offload_on_cuda_matches_plain_cuda_run(tmp_path):
    fast = {"num_inference_steps": 2, "height": 32, "width": 32}
    tiny_stable_diffusion(seed=0).save_pretrained(tmp_path)
    on_gpu = build_decoder(DecoderConfig(source=str(tmp_path), options=fast)).to("cuda")
    offloaded = build_decoder(DecoderConfig(source=str(tmp_path), options=fast))
    assert offloaded.enable_cpu_offload() is True and offloaded.device.type == "cuda"
    embeds = on_gpu.encode_text(CAPTIONS)
    assert embeds.device.type == "cuda"
    a = our_arrays(on_gpu.generate(embeds, seed=1))
    b = our_arrays(offloaded.generate(embeds.cpu(), seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
