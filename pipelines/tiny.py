"""Tiny, seeded, offline diffusers pipelines for tests and examples.

Each builder returns a stock diffusers pipeline whose components are built from small
configs with random weights: no hub access. The tokenizers are byte-level BPE tokenizers
with an empty merge list (one token per byte), so any caption tokenizes without unknowns
and ``save_pretrained`` / ``from_pretrained`` round-trips them like real ones.
"""

from __future__ import annotations

import torch
from tokenizers.pre_tokenizers import ByteLevel


def _byte_alphabet() -> list[str]:
    return sorted(ByteLevel.alphabet())  # the 256 printable stand-ins for bytes


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIP tokenizer (SD, Zeroscope) with one token per byte; vocab size 514."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # CLIP marks word-final pieces with "</w>"
        for ch in _byte_alphabet():
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_roberta_tokenizer(max_length: int = 77):
    """A RoBERTa tokenizer (AudioLDM's CLAP) with one token per byte; vocab size 261."""
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _tiny_clip_text_encoder(tokenizer, text_width: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=2 * text_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _tiny_vae(channels: tuple[int, ...], in_channels: int = 3):
    from diffusers import AutoencoderKL

    # len(channels) blocks -> vae_scale_factor = 2 ** (len(channels) - 1)
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=list(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=channels[0],
        sample_size=32,
    ).eval()


def _scheduler():
    from diffusers import DDIMScheduler

    # SD's own DDIM settings; steps_offset=1 is what diffusers expects of new configs.
    return DDIMScheduler(
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def _tiny_unet_kwargs(text_width: int) -> dict:
    """What the tiny image and video UNets share: 16x16x4 latents, two levels of 16/32 channels."""
    return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, cross_attention_dim=text_width, attention_head_dim=4)


def _tiny_image_unet(text_width: int):
    """The tiny SD UNet (also the image half of the tiny AnimateDiff UNet)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **_tiny_unet_kwargs(text_width),
    ).eval()


def tiny_stable_diffusion(text_width: int = 32, seed: int = 0, max_length: int = 77):
    """A ``StableDiffusionPipeline`` with conditioning (max_length, text_width); renders 32x32 fast."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length)
    text_encoder = _tiny_clip_text_encoder(tokenizer, text_width)
    unet = _tiny_image_unet(text_width)
    return StableDiffusionPipeline(
        vae=_tiny_vae((8, 16)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_text_to_video(text_width: int = 32, seed: int = 0, max_length: int = 77):
    """A ``TextToVideoSDPipeline`` (Zeroscope family) with conditioning (max_length, text_width)."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length)
    text_encoder = _tiny_clip_text_encoder(tokenizer, text_width)
    unet = UNet3DConditionModel(
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        **_tiny_unet_kwargs(text_width),
    ).eval()
    return TextToVideoSDPipeline(
        vae=_tiny_vae((8, 16)), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler()
    )


def tiny_animatediff(text_width: int = 32, seed: int = 0, max_length: int = 77):
    """An ``AnimateDiffPipeline``: the tiny image UNet with motion modules, conditioning (max_length, text_width)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(max_length)
    text_encoder = _tiny_clip_text_encoder(tokenizer, text_width)
    image_unet = _tiny_image_unet(text_width)
    adapter = MotionAdapter(block_out_channels=image_unet.config.block_out_channels,
                            motion_layers_per_block=image_unet.config.layers_per_block, motion_num_attention_heads=4,
                            motion_norm_num_groups=image_unet.config.norm_num_groups, motion_max_seq_length=16)
    unet = UNetMotionModel.from_unet2d(image_unet, adapter).eval()
    return AnimateDiffPipeline(vae=_tiny_vae((8, 16)), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=None, scheduler=_scheduler())


def tiny_audioldm(
    text_width: int = 32,
    projection_dim: int = 16,
    seed: int = 0,
    max_length: int = 77,
    sampling_rate: int = 16000,
):
    """An ``AudioLDMPipeline`` whose CLAP text projection (the conditioning) is ``projection_dim`` wide.

    The vocoder upsamples 8 mel bins by 160 samples per frame, as AudioLDM's does, so
    1 s of audio is 100 mel frames at 16 kHz.
    """
    from diffusers import AudioLDMPipeline, UNet2DConditionModel
    from transformers import (
        ClapTextConfig,
        ClapTextModelWithProjection,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    torch.manual_seed(seed)
    tokenizer = tiny_roberta_tokenizer(max_length)
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=projection_dim,
            # RoBERTa positions start after the padding index, hence the +2.
            max_position_embeddings=max_length + 2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    channels = (16, 32)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        # AudioLDM's UNet self-attends (no encoder states) and takes the CLAP embedding
        # as a class embedding concatenated to the time embedding.
        cross_attention_dim=channels,
        attention_head_dim=4,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=projection_dim,
        class_embeddings_concat=True,
    ).eval()
    vae = _tiny_vae((8, 16), in_channels=1)  # the VAE encodes a (1, frames, mel_bins) spectrogram
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=8,
            sampling_rate=sampling_rate,
            upsample_initial_channel=16,
            upsample_rates=[8, 5, 4],
            upsample_kernel_sizes=[16, 10, 8],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
        )
    ).eval()
    scheduler = _scheduler()
    return AudioLDMPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )
