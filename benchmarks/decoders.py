"""Decoder overhead: mmllm's ``Decoder.generate(prompt_embeds, seed, **settings)`` vs calling the stock
diffusers pipeline directly with the same ``prompt_embeds``, negative embeddings, seed and settings.

Pipelines are built from their published architectures with random weights (config dicts below):

* image: Stable Diffusion 1.5 (UNet 320/640/1280/1280, cross-attention 768, SD VAE, CLIP ViT-L text).
* audio: AudioLDM-S (``cvssp/audioldm-s-full-v2``: UNet 128/256/384/640 with the CLAP projection as a
  class embedding, 8-channel mel VAE, HiFi-GAN vocoder, CLAP RoBERTa text encoder).
* video: Zeroscope v2 576w (ModelScope UNet3D 320/640/1280/1280, cross-attention 1024, SD VAE,
  OpenCLIP-H text).

Tokenizers are byte-level stand-ins (``pipelines.tiny``): they only encode the empty negative
prompt, once. ``--scale tiny`` uses ``pipelines.tiny``'s pipelines instead (CPU checks).
Runs alternate in ABBA order (direct, mmllm, mmllm, direct, ...) and the medians are compared.

    python -m benchmarks.decoders --json out.json
    python -m benchmarks.decoders --scale tiny --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from . import common

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

AUDIOLDM_UNET = dict(sample_size=128, in_channels=8, out_channels=8, layers_per_block=2,
                     block_out_channels=(128, 256, 384, 640),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=(128, 256, 384, 640), attention_head_dim=8, class_embed_type="simple_projection",
                     projection_class_embeddings_input_dim=512, class_embeddings_concat=True)
AUDIOLDM_VAE = dict(in_channels=1, out_channels=1, latent_channels=8, layers_per_block=2, sample_size=512,
                    block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                    up_block_types=("UpDecoderBlock2D",) * 3)
AUDIOLDM_VOCODER = dict(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024,
                        upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                        resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3,
                        normalize_before=False)
CLAP_TEXT = dict(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=514, projection_dim=512, pad_token_id=1,
                 bos_token_id=0, eos_token_id=2)

ZEROSCOPE_UNET = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280),
                      down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D",
                                        "DownBlock3D"),
                      up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
                      cross_attention_dim=1024, attention_head_dim=64, norm_num_groups=32)
OPENCLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                       num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)

# Generation settings per modality and scale (few steps; Zeroscope at its 576x320 size, 8 frames).
SETTINGS = {
    "llava-1.5-7b": {
        "image": dict(num_inference_steps=10, guidance_scale=7.5, height=512, width=512),
        "audio": dict(num_inference_steps=10, guidance_scale=2.5, audio_length_in_s=5.12),
        "video": dict(num_inference_steps=10, guidance_scale=9.0, height=320, width=576, num_frames=8),
    },
    "tiny": {
        "image": dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32),
        "audio": dict(num_inference_steps=2, guidance_scale=2.5, audio_length_in_s=0.5),
        "video": dict(num_inference_steps=2, guidance_scale=9.0, height=32, width=32, num_frames=4),
    },
}


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def real_pipeline(modality: str):
    """A stock diffusers pipeline at the published architecture, random weights."""
    import diffusers
    from transformers import (ClapTextConfig, ClapTextModelWithProjection, CLIPTextConfig, CLIPTextModel,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig)

    from pipelines.tiny import tiny_clip_tokenizer, tiny_roberta_tokenizer

    torch.manual_seed(0)
    if modality == "image":
        return diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=tiny_clip_tokenizer(77), unet=diffusers.UNet2DConditionModel(**SD15_UNET),
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if modality == "audio":
        return diffusers.AudioLDMPipeline(
            vae=diffusers.AutoencoderKL(**AUDIOLDM_VAE),
            text_encoder=ClapTextModelWithProjection(ClapTextConfig(**CLAP_TEXT)),
            tokenizer=tiny_roberta_tokenizer(77), unet=diffusers.UNet2DConditionModel(**AUDIOLDM_UNET),
            scheduler=_scheduler(), vocoder=SpeechT5HifiGan(SpeechT5HifiGanConfig(**AUDIOLDM_VOCODER)))
    if modality == "video":
        return diffusers.TextToVideoSDPipeline(
            vae=diffusers.AutoencoderKL(**SD_VAE), text_encoder=CLIPTextModel(CLIPTextConfig(**OPENCLIP_H_TEXT)),
            tokenizer=tiny_clip_tokenizer(77), unet=diffusers.UNet3DConditionModel(**ZEROSCOPE_UNET),
            scheduler=_scheduler())
    raise KeyError(modality)


def tiny_pipeline(modality: str):
    from pipelines import tiny

    return {"image": lambda: tiny.tiny_stable_diffusion(text_width=48),
            "audio": lambda: tiny.tiny_audioldm(),
            "video": lambda: tiny.tiny_text_to_video()}[modality]()


DECODER_CLASS = {"image": "StableDiffusionDecoder", "audio": "AudioLDMDecoder", "video": "TextToVideoDecoder"}


def direct_call(pipe, modality: str, embeds, negative, seed: int, settings: dict):
    """What ``Decoder.generate`` asks of the pipeline, written out as a user would call diffusers."""
    extra = {k: v for k, v in settings.items() if k not in ("num_inference_steps", "guidance_scale")}
    output_type = "np" if modality == "audio" else "pil"
    with torch.no_grad():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
                    output_type=output_type, **extra)


def _raw(modality: str, result) -> np.ndarray:
    if modality == "image":
        return np.asarray(result.images[0])
    if modality == "video":
        return np.stack([np.asarray(f) for f in result.frames[0]])
    return np.asarray(result.audios[0])


def _ours(modality: str, outputs) -> np.ndarray:
    o = outputs[0]
    for name in ("image", "frames", "waveform"):
        if hasattr(o, name):
            return np.asarray(getattr(o, name))
    return np.asarray(o)


class TimedPipeline:
    """Stands in for the pipeline inside the Decoder: forwards everything, and records how long
    each ``__call__`` of the real pipeline takes, so the wrapper's own time is measured within the
    same call (``Decoder.generate`` time minus the pipeline's), free of run-to-run noise."""

    def __init__(self, pipe, device):
        self._pipe, self._device, self.last_s = pipe, device, 0.0

    def __call__(self, *args, **kwargs):
        common.sync(self._device)
        t0 = time.perf_counter()
        out = self._pipe(*args, **kwargs)
        common.sync(self._device)
        self.last_s = time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self._pipe, name)


def run_one(modality: str, scale: str, device, dtype, repeats: int, warmup: int = 1) -> dict:
    import mmllm  # noqa: F401 - mmllm before pipelines (pipelines' package imports mmllm's config)
    import pipelines.decoders as decoders

    pipe = (real_pipeline if scale == "llava-1.5-7b" else tiny_pipeline)(modality)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    settings = dict(SETTINGS[scale][modality])
    decoder = getattr(decoders, DECODER_CLASS[modality]).from_pipeline(pipe, **settings)
    shape = decoder.conditioning_shape
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, *shape, generator=g).to(device=device, dtype=dtype)
    if modality == "audio":
        embeds = torch.nn.functional.normalize(embeds.float(), dim=-1).to(dtype)  # CLAP embeddings are unit norm
    negative = decoder.negative_embeds(1)  # the wrapper's cached empty-prompt conditioning, also given to diffusers
    timed = TimedPipeline(pipe, device)
    decoder._pipeline = timed  # measurement only: the same pipeline object, called the same way
    inner = []

    def ours():
        out = decoder.generate(embeds, seed=0)
        inner.append(timed.last_s)
        return out

    def direct():
        return direct_call(pipe, modality, embeds, negative, 0, settings)

    for _ in range(warmup):
        direct()
        ours()
    t_direct, t_ours = [], []
    out_direct = out_ours = None
    pair = ((direct, t_direct), (ours, t_ours))
    for i in range(repeats):
        for fn, bucket in (pair if i % 2 == 0 else pair[::-1]):  # ABBA order: drift hits both alike
            common.sync(device)
            t0 = time.perf_counter()
            out = fn()
            common.sync(device)
            bucket.append(time.perf_counter() - t0)
            if fn is direct:
                out_direct = out
            else:
                out_ours = out
    a, b = _raw(modality, out_direct), _ours(modality, out_ours)
    same = a.shape == b.shape and np.array_equal(a.astype(np.float32), b.astype(np.float32))
    row = {"modality": modality, "pipeline": type(pipe).__name__, "conditioning": list(shape), "settings": settings,
           "unet_params": common.count_params(pipe.unet), "direct_s": common.median(t_direct),
           "mmllm_s": common.median(t_ours), "direct_s_all": t_direct, "mmllm_s_all": t_ours,
           "same_output": bool(same), "peak_gib": common.peak_gib(device)}
    row["overhead"] = row["mmllm_s"] / row["direct_s"] - 1
    row["overhead_min"] = min(t_ours) / min(t_direct) - 1
    wrapper = [o - i for o, i in zip(t_ours, inner[-len(t_ours):])]
    row["wrapper_s"] = common.median(wrapper)  # time in Decoder.generate outside the pipeline call
    row["wrapper_overhead"] = row["wrapper_s"] / row["direct_s"]
    spread = (max(t_direct) - min(t_direct)) / row["direct_s"]
    row["direct_spread"] = spread  # run-to-run noise of the direct call, for reading the overhead
    del pipe, decoder
    common.free()
    return row


def run(scale: str = "llava-1.5-7b", device=None, dtype=None, modalities=("image", "audio", "video"),
        repeats: int = 5, warmup: int = 1) -> dict:
    device = common.pick_device(device) if not isinstance(device, torch.device) else device
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = common.device_info(device)
    rows = []
    for m in modalities:
        common.reset_peak(device)
        rows.append(run_one(m, scale, device, dtype, repeats, warmup))
        print(f"  {m}: overhead {100 * rows[-1]['overhead']:+.2f}% (median), wrapper's own time "
              f"{100 * rows[-1]['wrapper_overhead']:.3f}%", file=sys.stderr)
    return {"benchmark": "decoders", "scale": scale, "dtype": str(dtype), "env": info, "rows": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--modalities", nargs="+", default=["image", "audio", "video"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device, dtype = common.setup(args)
    result = run(args.scale, device, dtype, tuple(args.modalities), args.repeats)
    print(f"device: {result['env']['name']} ({device}), {result['dtype']}, scale {args.scale}")
    common.print_table(result["rows"], ["modality", "pipeline", "direct_s", "mmllm_s", "overhead", "overhead_min",
                                        "wrapper_s", "wrapper_overhead", "direct_spread",
                                        "same_output", "peak_gib"])
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
