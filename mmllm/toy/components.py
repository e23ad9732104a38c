"""The toy world's frozen encoders and decoders, pretrained on the world itself.

Every component is a stock upstream class saved with ``save_pretrained`` and loaded by
mmllm's real backends, exactly as a downloaded checkpoint would be::

    <root>/clip/            transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor
                            (image encoder: ``hf_clip``; its text tower conditions the decoders)
    <root>/audio_encoder/   transformers ASTModel + ASTFeatureExtractor (``hf_audio``);
                            text_encoder/ holds the CLIP text tower it was trained against
    <root>/vae/             diffusers AutoencoderKL, 32x32 RGB -> 16x16x4 (shared by the decoders)
    <root>/image_decoder/   diffusers StableDiffusionPipeline (``stable_diffusion``)
    <root>/audio_decoder/   StableDiffusionPipeline drawing 16x64 log-mel spectrograms,
                            + spectrogram.json (``spectrogram_sd``: Griffin-Lim inversion)
    <root>/video_decoder/   diffusers TextToVideoSDPipeline, 4 frames of 32x32 (``text_to_video_sd``);
                            its UNet3D starts from the image decoder's UNet, and its copy of the
                            CLIP text tower is tuned with it (``BuildSettings.text_tuning``)

``build_components(root)`` builds whatever is missing. A directory is complete when its
``toy_component.json`` exists, records the recipe the current ``BuildSettings`` give it
(``BuildSettings.recipe``: a changed step count or batch mix rebuilds that component) and
names the same builds of its dependencies (a rebuilt CLIP invalidates the decoders
conditioned on its text tower). Each component is built
in a temporary directory and renamed into place, so an interrupted build leaves nothing
half-written. By default everything but the audio decoder trains on the ``train`` split
only, so held-out attribute pairs measure compositional generalisation
(``mmllm.toy.quality``); ``BuildSettings(split="all")`` shows the frozen components every
pair, as web-scale pretraining would, while the MMLLM's stages still see the train split
alone; ``split={"image_decoder": "all"}`` does so for the named components only (the
default is ``{"audio_decoder": "all"}``, see ``BuildSettings.split``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import atomic_directory
from . import configs, oracle, world

IMAGE_SIZE = 32
VIDEO_FRAMES = 4  # few frames keep the 3-D UNet affordable on a CPU; motion is still readable
# The video decoder's UNet: "unet3d" (UNet3DConditionModel, saved as a TextToVideoSDPipeline,
# the ModelScope / Zeroscope family) or "motion" (the image UNet with AnimateDiff motion
# modules, saved as an AnimateDiffPipeline).
VIDEO_UNETS = ("unet3d", "motion")
MOTION_HEADS = 4  # attention heads of the motion modules
SAMPLE_RATE = 16000
MAX_TEXT_LENGTH = 32  # the longest world caption is 19 word-level tokens
MARKER = "toy_component.json"
TEXT_TUNING = ("frozen", "embeddings", "all")  # BuildSettings.text_tuning
COMPONENTS = ("clip", "audio_encoder", "vae", "image_decoder", "audio_decoder", "video_decoder")
DECODER_COMPONENTS = tuple(c for c in COMPONENTS if c.endswith("_decoder"))
DEPENDS = {
    "clip": (),
    "audio_encoder": ("clip",),  # reuses the CLIP tokenizer
    "vae": (),
    "image_decoder": ("clip", "vae"),
    "audio_decoder": ("audio_encoder", "vae"),
    "video_decoder": ("clip", "vae", "image_decoder"),  # its UNet starts from the image UNet
}
# What the MMLLM's training stages read from the components: the encoders, and the decoders'
# conditioning space, which is a frozen copy of these encoders' text towers (image decoder:
# CLIP's; audio decoder: the audio encoder's). A decoder retrained on the same tower (more
# steps, another UNet) changes no input and no target, so it does not retrain the LLM. A
# decoder whose text encoder was tuned with its UNet (``BuildSettings.text_tuning``; the video
# decoder by default) holds its own conditioning space, so it is a training input too
# (``training_inputs``).
TRAINING_INPUTS = ("clip", "audio_encoder")
# SD-1.x noise schedule, shared by training and the saved DDIM sampler, rescaled to zero
# terminal SNR with v-prediction and trailing timesteps (Lin et al. 2024, "Common Diffusion
# Noise Schedules and Sample Steps are Flawed"). SD's own schedule leaves 7 % of the signal at
# its last step, so a decoder learns to take the layout (where the shape is, which way it
# moves) from that remnant, and sampling from pure noise draws it at random: fed the true
# caption, the video decoder drew the axis of motion at chance (docs/toy.md).
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                rescale_betas_zero_snr=True)
PREDICTION = "v_prediction"


def _check_components(names, where: str) -> None:
    """Raise a KeyError naming the valid components if ``names`` holds an unknown one."""
    unknown = sorted(set(names) - set(COMPONENTS))
    if unknown:
        raise KeyError(f"unknown toy component(s) {unknown} {where}; valid: {list(COMPONENTS)}")


_default = configs.defaults("components")


@dataclass
class BuildSettings(configs.Recipe):
    """Step counts, batch sizes and pool sizes of every component's training run.

    The defaults are the ``default`` recipe's (``mmllm/toy/configs/default.json``);
    ``from_recipe(name)`` reads another (``quick``, ``fast``, ``smoke``).
    """

    SECTION = "components"

    steps: dict = _default("steps", "component -> training steps")
    batch: dict = _default("batch", "component -> batch size")
    lr: dict = _default("lr", "component -> learning rate")
    pool: dict = _default("pool", "modality -> rendered training items")
    caption_dropout: float = _default("caption_dropout", "decoders: share of empty captions (classifier-free guidance)")
    canonical_fraction: float = _default("canonical_fraction", "decoders: share of canonical captions")
    corpus: int = _default("corpus", "random captions + requests per modality for the tokenizer")
    foreground_weight: float = _default(
        "foreground_weight", "loss weight of foreground pixels: objects cover a few percent of a frame")
    clip_shape_groups: int = _default("clip_shape_groups", "CLIP batches: groups of images that differ only in shape")
    split: str | dict = _default("split", 'the world split the components train on: "train", "all" or per component')
    video_unet: str = _default("video_unet", "the video decoder's UNet (VIDEO_UNETS)")
    text_tuning: dict = _default(
        "text_tuning", 'decoder -> what it trains of its text encoder beside its UNet (TEXT_TUNING; "frozen" if unset)')
    text_lr_scale: float = _default("text_lr_scale", "the tuned text encoder's rate, a fraction of its decoder's")

    def override(self, steps: Optional[dict] = None) -> "BuildSettings":
        _check_components(steps or {}, "in steps")
        return replace(self, steps={**self.steps, **(steps or {})})

    def split_of(self, name: str) -> str:
        """The world split component ``name`` trains on (``split``: one for all, or per component)."""
        if isinstance(self.split, str):
            return self.split
        _check_components(self.split, "in BuildSettings.split")
        return self.split.get(name, "train")

    def recipe(self, name: str) -> dict:
        """The settings ``name``'s build reads (JSON data): recorded in its marker, and a
        component whose recorded recipe differs is rebuilt."""
        out = {"steps": self.steps[name], "batch": self.batch[name], "lr": self.lr[name], "pool": self.pool}
        if name == "clip":
            out.update(corpus=self.corpus, shape_groups=self.clip_shape_groups)
        if name != "clip" and name != "audio_encoder":
            out["foreground_weight"] = self.foreground_weight
        if name in DECODER_COMPONENTS:
            out.update(caption_dropout=self.caption_dropout, canonical_fraction=self.canonical_fraction,
                       zero_terminal_snr=SCHEDULE["rescale_betas_zero_snr"],  # decoders built before
                       prediction=PREDICTION)  # 2026-12-06 lack these two and rebuild
        if self.split_of(name) != "train":  # recorded only when changed: train-split builds stay valid
            out["split"] = self.split_of(name)
        if name == "video_decoder" and self.video_unet != "unet3d":  # likewise
            out["video_unet"] = self.video_unet
        if (tuning := self.text_tuning_of(name)) != "frozen":  # likewise
            out["text_tuning"] = tuning
            if not self.text_lr_scale > 0:
                raise ValueError(f"BuildSettings.text_lr_scale must be positive, got {self.text_lr_scale!r}")
            if self.text_lr_scale != 1.0:
                out["text_lr_scale"] = self.text_lr_scale
        return out

    def text_tuning_of(self, name: str) -> str:
        """What decoder ``name`` trains of its text encoder (``text_tuning``; "frozen" if unset)."""
        _check_components(self.text_tuning, "in BuildSettings.text_tuning")
        tuning = self.text_tuning.get(name, "frozen")
        if tuning not in TEXT_TUNING:
            raise ValueError(f"BuildSettings.text_tuning[{name!r}] must be one of {list(TEXT_TUNING)}, got {tuning!r}")
        if tuning != "frozen" and name not in DECODER_COMPONENTS:
            raise ValueError(f"BuildSettings.text_tuning names {name!r}, which has no text encoder to tune; "
                             f"name a decoder: {list(DECODER_COMPONENTS)}")
        return tuning


def default_root() -> Path:
    """``$MMLLM_CACHE/toy`` (default ``~/.cache/mmllm/toy``)."""
    from mmllm.llm import cache_dir

    return cache_dir() / "toy"


# --------------------------------------------------------------------------- bookkeeping


def _marker(path: Path) -> Optional[dict]:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(root: str | os.PathLike, name: str, settings: Optional[BuildSettings] = None) -> bool:
    """True when ``root/name`` was fully built against the current builds of its dependencies
    (and, given ``settings``, with the recipe they give it)."""
    root = Path(root)
    info = _marker(root / name)
    if info is None:
        return False
    if settings is not None and info.get("recipe") != json.loads(json.dumps(settings.recipe(name))):
        return False
    for dep in DEPENDS[name]:
        dep_info = _marker(root / dep)
        if dep_info is None or info.get("depends", {}).get(dep) != dep_info.get("build_id"):
            return False
    return True


def _write_marker(root: Path, name: str, directory: Path, info: dict) -> None:
    """Write the marker that makes ``directory`` a complete build of ``name`` (its last file)."""
    info = {"component": name, "build_id": uuid.uuid4().hex, "built_at": time.time(),
            "depends": {d: _marker(root / d)["build_id"] for d in DEPENDS[name]}, **info}
    (directory / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, sum(ord(c) * 131 ** i for i, c in enumerate(name)) % (2 ** 31)])


def _progress(iterable, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, mininterval=2.0)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def loss_summary(losses: list[float], window: int = 50) -> dict:
    """Mean loss over the first and the last ``window`` steps (a quarter of the run when
    shorter), so a build records that its loss fell."""
    k = max(1, min(window, len(losses) // 4))
    return {"first_loss": float(np.mean(losses[:k])), "final_loss": float(np.mean(losses[-k:]))}


def _optimizer(params, lr: float, steps: int, extra: Optional[dict] = None):
    """AdamW with warmup and a cosine decay over ``steps``; ``extra``, a parameter group
    (``{"params": [...], "lr": ...}``) trained beside ``params`` at its own rate."""
    groups = [{"params": [p for p in params if p.requires_grad]}]
    if extra and extra["params"]:
        groups.append(extra)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    return opt, sched


# --------------------------------------------------------------------------- data


def corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Captions and requests of every modality, for training the tokenizer."""
    rng = _rng(seed, "corpus")
    texts = []
    for m in world.MODALITIES:
        for spec in world.all_specs(m):
            texts.append(world.canonical_caption(spec))
        for _ in range(n):
            spec = world.sample_spec(rng, m, "all")
            texts += [world.caption(spec, rng), world.generation_request(spec, rng)]
    return texts


def build_tokenizer(seed: int = 0, corpus_size: int = 3000):
    """A ``CLIPTokenizer`` with word-level BPE merges learned from the world's text.

    It keeps the byte alphabet of ``pipelines.tiny.tiny_clip_tokenizer``, so any text
    still tokenizes; world captions become one token per word.
    """
    from pipelines.tiny import tiny_clip_tokenizer

    return tiny_clip_tokenizer(MAX_TEXT_LENGTH).train_new_from_iterator(corpus(seed, corpus_size), vocab_size=600)


def sample_caption(spec, rng: np.random.Generator, canonical_fraction: float = 0.5, dropout: float = 0.0) -> str:
    u = rng.random()
    if u < dropout:
        return ""
    if u < dropout + canonical_fraction:
        return world.canonical_caption(spec)
    return world.caption(spec, rng)


def image_pool(n: int, rng: np.random.Generator, split: str = "train"):
    """(specs, uint8 (N, 32, 32, 3)) jittered renderings."""
    specs = [world.sample_spec(rng, "image", split) for _ in range(n)]
    return specs, np.stack([world.render_image(s, IMAGE_SIZE, rng=rng) for s in specs])


def shape_group(rng: np.random.Generator, split: str = "train"):
    """(specs, uint8 (K, 32, 32, 3)): one random image spec of ``split`` in every shape whose
    colour pair is in that split, each rendered with jitter. In a CLIP batch these are hard
    negatives: only shape tells them apart."""
    base = world.sample_spec(rng, "image", split)
    specs = [s for s in (replace(base, shape=shape) for shape in world.SHAPES) if world.in_split(s, split)]
    return specs, np.stack([world.render_image(s, IMAGE_SIZE, rng=rng) for s in specs])


def video_pool(n: int, rng: np.random.Generator, split: str = "train"):
    """(specs, uint8 (N, T, 32, 32, 3))."""
    specs = [world.sample_spec(rng, "video", split) for _ in range(n)]
    return specs, np.stack([world.render_video(s, IMAGE_SIZE, VIDEO_FRAMES, rng=rng) for s in specs])


def audio_pool(n: int, rng: np.random.Generator, split: str = "train"):
    """(specs, float32 (N, 16000)) one-second clips."""
    specs = [world.sample_spec(rng, "audio", split) for _ in range(n)]
    return specs, np.stack([world.render_audio(s, SAMPLE_RATE, 1.0, rng=rng) for s in specs])


def unit_rgb(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1] (before CLIP's mean/std)."""
    return torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1] (the VAE's range)."""
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


@torch.no_grad()
def vae_roundtrip(vae, n: int = 96, seed: int = 0) -> dict:
    """Oracle accuracies of world images encoded and decoded by ``vae`` (a diffusers
    ``AutoencoderKL``, or anything with its ``encode(x).latent_dist.mode()`` and
    ``decode(z).sample``), held-in and held-out: what any decoder built on it can draw at best."""
    rng = np.random.default_rng([seed, 7919, sum(map(ord, "vae"))])
    report = {}
    for split_name, split in (("held_in", "train"), ("held_out", "test")):
        specs = [world.sample_spec(rng, "image", split) for _ in range(n)]
        x = to_unit(np.stack([world.render_image(s, IMAGE_SIZE) for s in specs]))  # (N, 3, H, W) in [-1, 1]
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample
        back = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(1, -1).numpy()
        report[split_name] = oracle.score_batch([oracle.analyse_image(b) for b in back], specs)
    return report


def spectrogram_images(waves: np.ndarray, mel) -> torch.Tensor:
    """float (N, S) -> (N, 3, n_mels, frames) in [-1, 1], grey repeated over RGB."""
    img = mel.to_image(torch.from_numpy(waves))  # (N, n_mels, frames) in [0, 1]
    return img.mul(2).sub(1).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def foreground(pixels: torch.Tensor, threshold: float = -0.9) -> torch.Tensor:
    """(..., 3, H, W) in [-1, 1] -> (..., 1, H, W) float mask of pixels off the black
    background (shapes, tones above the spectrogram floor)."""
    return (pixels.amax(dim=-3, keepdim=True) > threshold).float()


def loss_weights(mask: torch.Tensor, weight: float, factor: int = 1) -> torch.Tensor:
    """``1 + weight * mask``, max-pooled by ``factor`` to a latent grid; (N, 1, H, W) in and out."""
    if factor > 1:
        mask = F.max_pool2d(mask, factor)
    return 1.0 + weight * mask


# --------------------------------------------------------------------------- encoders


def _contrastive(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * a @ b.T  # (B, B)
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _text_config(tokenizer, **overrides) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TEXT_LENGTH,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **overrides)


def _tokens(tokenizer, captions: list[str], device) -> torch.Tensor:
    # No attention mask, padding to max length: exactly what the SD pipelines feed the text encoder.
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def build_clip(out: Path, settings: BuildSettings, device: str, seed: int, progress: bool) -> dict:
    """Train a tiny CLIPModel contrastively on world images and captions; save to ``out``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    rng = _rng(seed, "clip")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed, settings.corpus)
    # projection_dim goes into the tower configs too: CLIPVisionModelWithProjection loads
    # this checkpoint with the vision config alone and would otherwise re-initialise a
    # 512-wide visual_projection.
    config = CLIPConfig(
        text_config=_text_config(tokenizer, projection_dim=64),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
                           num_hidden_layers=3, num_attention_heads=4, projection_dim=64),
        projection_dim=64,
    )
    model = CLIPModel(config).to(device).train()
    specs, images = image_pool(settings.pool["image"], rng, settings.split_of("clip"))
    pixels = unit_rgb(images)
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3)).view(1, 3, 1, 1)
    pixels = (pixels - mean) / std
    steps, batch, groups = settings.steps["clip"], settings.batch["clip"], settings.clip_shape_groups
    n_random = min(max(batch - len(world.SHAPES) * groups, 0), len(specs))
    opt, sched = _optimizer(model.parameters(), settings.lr["clip"], steps)
    losses = []
    for _ in (bar := _progress(range(steps), "clip", progress)):
        idx = rng.choice(len(specs), size=n_random, replace=False)
        batch_specs, batch_pixels = [specs[i] for i in idx], [pixels[idx]]
        for _ in range(groups):
            group_specs, group_images = shape_group(rng, settings.split_of("clip"))
            batch_specs += group_specs
            batch_pixels.append((unit_rgb(group_images) - mean) / std)
        captions = [sample_caption(spec, rng) for spec in batch_specs]
        result = model(input_ids=_tokens(tokenizer, captions, device), pixel_values=torch.cat(batch_pixels).to(device),
                       return_loss=True)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        opt.step()
        sched.step()
        losses.append(result.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval().to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=mean.flatten().tolist(), image_std=std.flatten().tolist()).save_pretrained(out)
    return {**loss_summary(losses, 20), "image_mean": mean.flatten().tolist(), "image_std": std.flatten().tolist()}


def build_audio_encoder(out: Path, clip_dir: Path, settings: BuildSettings, device: str, seed: int,
                        progress: bool) -> dict:
    """Train a tiny ASTModel contrastively against a small CLIP text tower on world audio.

    The AST goes to ``out`` (with its ASTFeatureExtractor); the text tower, trained on
    audio captions, goes to ``out/text_encoder`` for the spectrogram decoder.
    """
    from transformers import (ASTConfig, ASTFeatureExtractor, ASTModel, CLIPTextConfig,
                              CLIPTextModelWithProjection, CLIPTokenizer)

    rng = _rng(seed, "audio_encoder")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    specs, waves = audio_pool(settings.pool["audio"], rng, settings.split_of("audio_encoder"))
    extractor = ASTFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, num_mel_bins=32, max_length=100,
                                    do_normalize=False)
    feats = extractor(list(waves), sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_values"]  # (N, 100, 32)
    mean, std = float(feats.mean()), float(feats.std() * 2)  # AST's convention: std doubled
    extractor = ASTFeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, num_mel_bins=32, max_length=100,
                                    do_normalize=True, mean=mean, std=std)
    feats = (feats - mean) / std
    ast = ASTModel(ASTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                             patch_size=16, num_mel_bins=32, max_length=100, frequency_stride=16,
                             time_stride=8)).to(device).train()
    text = CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(tokenizer, projection_dim=64))).to(device).train()
    head = torch.nn.Linear(ast.config.hidden_size, 64).to(device)  # discarded after training
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    params = [*ast.parameters(), *text.parameters(), *head.parameters(), logit_scale]
    steps, batch = settings.steps["audio_encoder"], settings.batch["audio_encoder"]
    opt, sched = _optimizer(params, settings.lr["audio_encoder"], steps)
    losses = []
    for _ in (bar := _progress(range(steps), "audio_encoder", progress)):
        idx = rng.choice(len(specs), size=min(batch, len(specs)), replace=False)
        captions = [sample_caption(specs[i], rng) for i in idx]
        audio_emb = head(ast(feats[idx].to(device)).pooler_output)
        text_emb = text(input_ids=_tokens(tokenizer, captions, device)).text_embeds
        loss = _contrastive(audio_emb, text_emb, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    ast.eval().to("cpu").save_pretrained(out)
    extractor.save_pretrained(out)
    text.eval().to("cpu").save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "text_encoder")
    return {**loss_summary(losses, 20), "feature_mean": mean, "feature_std": std}


# --------------------------------------------------------------------------- decoders


def build_vae(out: Path, settings: BuildSettings, device: str, seed: int, progress: bool) -> dict:
    """A small AutoencoderKL (32x32 -> 16x16x4) trained on images, video frames and spectrograms."""
    from diffusers import AutoencoderKL
    from pipelines.spectrogram import MelSpectrogramSpec

    rng = _rng(seed, "vae")
    torch.manual_seed(seed)
    _, images = image_pool(settings.pool["image"] // 2, rng, settings.split_of("vae"))
    _, videos = video_pool(max(1, settings.pool["video"] // 8), rng, settings.split_of("vae"))
    _, waves = audio_pool(settings.pool["audio"] // 2, rng, settings.split_of("vae"))
    square = torch.cat([to_unit(images), to_unit(videos.reshape(-1, *videos.shape[2:]))])  # (N, 3, 32, 32)
    spectro = spectrogram_images(waves, MelSpectrogramSpec())  # (M, 3, 16, 64)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE).to(device).train()
    steps, batch = settings.steps["vae"], settings.batch["vae"]
    opt, sched = _optimizer(vae.parameters(), settings.lr["vae"], steps)
    losses = []
    for step in (bar := _progress(range(steps), "vae", progress)):
        pool = spectro if step % 4 == 3 else square  # a quarter of the steps on spectrograms
        x = pool[rng.choice(len(pool), size=min(batch, len(pool)), replace=False)].to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        w = loss_weights(foreground(x), settings.foreground_weight)
        loss = (w * (recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(F.mse_loss(recon, x).item())
        bar.set_postfix(mse=f"{losses[-1]:.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        sample = square[: 512].to(device)
        latents = vae.encode(sample).latent_dist.mode()
        recon_mse = F.mse_loss(vae.decode(latents).sample, sample).item()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # SD's convention: unit-variance latents
    vae.to("cpu").save_pretrained(out)
    # The oracle's reading of its images: every decoder's ceiling.
    roundtrip = {split: {k: round(v, 3) for k, v in scores.items()}
                 for split, scores in vae_roundtrip(vae, n=48, seed=seed).items()}
    return {**loss_summary(losses), "recon_mse": recon_mse, "scaling_factor": vae.config.scaling_factor,
            "oracle_roundtrip": roundtrip}


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type=PREDICTION, timestep_spacing="trailing")


@torch.no_grad()
def _latents(vae, pixels: torch.Tensor, device: str, chunk: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latent means (N, 4, H/2, W/2) on the CPU."""
    out = [vae.encode(pixels[i:i + chunk].to(device)).latent_dist.mode().cpu() for i in range(0, len(pixels), chunk)]
    return torch.cat(out) * vae.config.scaling_factor


def _train_denoiser(unet, latents: torch.Tensor, specs: list, text_encoder, tokenizer, settings: BuildSettings,
                    name: str, device: str, rng: np.random.Generator, progress: bool,
                    to_unet: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
                    weights: Optional[torch.Tensor] = None, text_per_frame: int = 1) -> dict:
    """The standard denoising loss (``PREDICTION``: v) on ``latents`` conditioned on the text
    encoder, frozen or partly trained with the UNet (``BuildSettings.text_tuning``).

    ``weights`` (broadcastable to ``latents``, e.g. (N, 1, h, w)) weight each latent
    position's squared error: ``loss_weights`` of the foreground, so objects count.
    ``text_per_frame``: repeat each caption's conditioning this many times, for UNets that
    take one per frame (``UNetMotionModel``; ``AnimateDiffPipeline`` repeats it the same way)."""
    scheduler = _scheduler()
    alphas = scheduler.alphas_cumprod
    unet.to(device).train()
    text_encoder.to(device).eval().requires_grad_(False)  # eval: CLIP's text tower has no dropout to turn on
    tuning = settings.text_tuning_of(name)
    tuned = {"frozen": [], "embeddings": [text_encoder.get_input_embeddings().weight],
             "all": list(text_encoder.parameters())}[tuning]
    for p in tuned:
        p.requires_grad_(True)
    steps, batch = settings.steps[name], settings.batch[name]
    opt, sched = _optimizer(unet.parameters(), settings.lr[name], steps,
                            extra={"params": tuned, "lr": settings.lr[name] * settings.text_lr_scale})
    losses = []
    for _ in (bar := _progress(range(steps), name, progress)):
        idx = rng.choice(len(specs), size=min(batch, len(specs)), replace=False)
        captions = [sample_caption(specs[i], rng, settings.canonical_fraction, settings.caption_dropout) for i in idx]
        with torch.set_grad_enabled(bool(tuned)):
            cond = text_encoder(_tokens(tokenizer, captions, device))[0]  # (B, L, D), as encode_prompt does
            cond = cond.repeat_interleave(text_per_frame, dim=0)
        x0 = latents[idx].to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas), (len(idx),))
        noisy = scheduler.add_noise(x0, noise, t)
        pred = unet(to_unet(noisy), t.to(device), encoder_hidden_states=cond).sample
        # The target the saved sampler expects (``PREDICTION``): v, or the noise itself.
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
        err = (pred - to_unet(target)) ** 2
        loss = err.mean() if weights is None else (to_unet(weights[idx].to(device).expand_as(x0)) * err).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *tuned], 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    unet.eval().to("cpu")
    text_encoder.requires_grad_(False).to("cpu")
    return loss_summary(losses)  # the marker's recipe records any text tuning


def _unet2d(sample_size, text_width: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=text_width, attention_head_dim=8,
    )


def _save_sd(out: Path, vae, text_encoder, tokenizer, unet) -> None:
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out)


def _plain_text_model(tower, config):
    """``tower``'s text transformer (a ``CLIPModel``'s or a ``CLIPTextModelWithProjection``'s)
    as a ``CLIPTextModel`` (what SD pipelines hold), without its projection."""
    from transformers import CLIPTextModel

    text = CLIPTextModel(config)
    text.load_state_dict(tower.text_model.state_dict())
    return text.eval()


def clip_text_encoder(clip_dir: str | os.PathLike):
    """The text tower of a saved CLIPModel as a ``CLIPTextModel``."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir)
    return _plain_text_model(clip, clip.config.text_config)


def _decoder_start(root: Path, seed: int, name: str, device: str) -> tuple:
    """(rng, VAE, CLIP text tower, tokenizer) that an image or video decoder's build starts from,
    with torch seeded: the shared VAE and the toy CLIP's text side under ``root``."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    rng = _rng(seed, name)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(root / "vae").to(device)
    return rng, vae, clip_text_encoder(root / "clip"), CLIPTokenizer.from_pretrained(root / "clip")


def build_image_decoder(out: Path, root: Path, settings: BuildSettings, device: str, seed: int,
                        progress: bool) -> dict:
    rng, vae, text_encoder, tokenizer = _decoder_start(root, seed, "image_decoder", device)
    specs, images = image_pool(settings.pool["image"], rng, settings.split_of("image_decoder"))
    pixels = to_unit(images)
    latents = _latents(vae, pixels, device)  # (N, 4, 16, 16)
    weights = loss_weights(foreground(pixels), settings.foreground_weight, pixels.shape[-1] // latents.shape[-1])
    unet = _unet2d(latents.shape[-1], text_encoder.config.hidden_size)
    info = _train_denoiser(unet, latents, specs, text_encoder, tokenizer, settings, "image_decoder", device, rng,
                           progress, weights=weights)
    _save_sd(out, vae.to("cpu"), text_encoder, tokenizer, unet)
    return info


def build_audio_decoder(out: Path, root: Path, settings: BuildSettings, device: str, seed: int,
                        progress: bool) -> dict:
    from diffusers import AutoencoderKL
    from pipelines.spectrogram import MelSpectrogramSpec
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    rng = _rng(seed, "audio_decoder")
    torch.manual_seed(seed)
    mel = MelSpectrogramSpec()
    vae = AutoencoderKL.from_pretrained(root / "vae").to(device)
    text_dir = root / "audio_encoder" / "text_encoder"
    tower = CLIPTextModelWithProjection.from_pretrained(text_dir)  # as the audio encoder trained it
    text_encoder = _plain_text_model(tower, tower.config)
    tokenizer = CLIPTokenizer.from_pretrained(text_dir)
    specs, waves = audio_pool(settings.pool["audio"], rng, settings.split_of("audio_decoder"))
    pixels = spectrogram_images(waves, mel)
    latents = _latents(vae, pixels, device)  # (N, 4, 8, 32)
    weights = loss_weights(foreground(pixels), settings.foreground_weight, pixels.shape[-1] // latents.shape[-1])
    unet = _unet2d(list(latents.shape[-2:]), text_encoder.config.hidden_size)
    info = _train_denoiser(unet, latents, specs, text_encoder, tokenizer, settings, "audio_decoder", device, rng,
                           progress, weights=weights)
    _save_sd(out, vae.to("cpu"), text_encoder, tokenizer, unet)
    mel.save(out)
    return info


def _unet3d_from_image(root: Path, sample_size: int, text_width: int):
    """A ``UNet3DConditionModel`` started from the image decoder's UNet, as ModelScope /
    AnimateDiff start from an image model: the spatial layers share names and shapes, and the
    temporal layers start as identities, so training begins from per-frame images."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    unet = UNet3DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
        up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=text_width, attention_head_dim=8,
    )
    image_unet = UNet2DConditionModel.from_pretrained(root / "image_decoder" / "unet").state_dict()
    own = unet.state_dict()
    # proj_in / proj_out are linear in 2-D and 1x1 convolutions in 3-D: same numbers, other shape.
    matched = {k: v.reshape(own[k].shape) for k, v in image_unet.items() if k in own and own[k].numel() == v.numel()}
    unet.load_state_dict(matched, strict=False)
    return unet, f"{len(matched)}/{len(own)} tensors"


def _motion_unet_from_image(root: Path, frames: int):
    """The image decoder's UNet with AnimateDiff motion modules (``UNetMotionModel.from_unet2d``).
    The motion modules' output projections start at zero, as AnimateDiff's do, so training
    also begins from per-frame images; unlike UNet3D's temporal attention they know each
    frame's place (sinusoidal positions)."""
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    image_unet = UNet2DConditionModel.from_pretrained(root / "image_decoder" / "unet")
    adapter = MotionAdapter(block_out_channels=image_unet.config.block_out_channels,
                            motion_layers_per_block=image_unet.config.layers_per_block,
                            motion_num_attention_heads=MOTION_HEADS,
                            motion_norm_num_groups=image_unet.config.norm_num_groups,
                            motion_max_seq_length=max(frames, 16))
    unet = UNetMotionModel.from_unet2d(image_unet, adapter)
    zeroed = 0
    for name, module in unet.named_modules():
        if "motion_modules" in name and name.endswith("proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
            zeroed += 1
    return unet, f"image UNet + {zeroed} motion modules"


def build_video_decoder(out: Path, root: Path, settings: BuildSettings, device: str, seed: int,
                        progress: bool) -> dict:
    from diffusers import AnimateDiffPipeline, TextToVideoSDPipeline

    if settings.video_unet not in VIDEO_UNETS:
        raise ValueError(f"BuildSettings.video_unet must be one of {list(VIDEO_UNETS)}, got {settings.video_unet!r}")
    rng, vae, text_encoder, tokenizer = _decoder_start(root, seed, "video_decoder", device)
    specs, videos = video_pool(settings.pool["video"], rng, settings.split_of("video_decoder"))
    n, t = videos.shape[:2]
    pixels = to_unit(videos.reshape(n * t, *videos.shape[2:]))
    frames = _latents(vae, pixels, device)  # (N*T, 4, 16, 16)
    latents = frames.view(n, t, *frames.shape[1:])  # (N, T, 4, h, w); the UNets want (N, 4, T, h, w)
    weights = loss_weights(foreground(pixels), settings.foreground_weight, pixels.shape[-1] // frames.shape[-1])
    weights = weights.view(n, t, *weights.shape[1:])  # (N, T, 1, h, w)
    if settings.video_unet == "motion":  # one conditioning per frame, as AnimateDiffPipeline passes it
        unet, init = _motion_unet_from_image(root, t)
        pipeline, text_per_frame = functools.partial(AnimateDiffPipeline, motion_adapter=None), t
    else:
        unet, init = _unet3d_from_image(root, latents.shape[-1], text_encoder.config.hidden_size)
        pipeline, text_per_frame = TextToVideoSDPipeline, 1
    info = _train_denoiser(unet, latents, specs, text_encoder, tokenizer, settings, "video_decoder", device, rng,
                           progress, to_unet=lambda x: x.transpose(1, 2), weights=weights,
                           text_per_frame=text_per_frame)
    info["init_from_image_unet"] = init
    pipeline(vae=vae.to("cpu"), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
             scheduler=_scheduler()).save_pretrained(out)
    return info


def video_decoder_backend(directory: str | os.PathLike) -> str:
    """The decoder backend that loads a saved toy video decoder: ``animatediff`` for an
    ``AnimateDiffPipeline`` (``video_unet="motion"``), else ``text_to_video_sd``."""
    index = Path(directory) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    return "animatediff" if name == "AnimateDiffPipeline" else "text_to_video_sd"


# --------------------------------------------------------------------------- driver


def build_components(root: str | os.PathLike | None = None, device: str = "cpu", fast: bool = False,
                     seed: int = 0, steps: Optional[dict] = None, settings: Optional[BuildSettings] = None,
                     only: Optional[list[str]] = None, force: bool = False, progress: bool = True,
                     log: Callable[[str], None] = print) -> dict[str, Path]:
    """Build every missing toy component under ``root`` (default ``default_root()``).

    ``fast`` uses ``BuildSettings.fast()`` (a few steps: for tests); ``steps`` overrides
    step counts per component; ``only`` restricts the build to some components (their
    missing dependencies are built too); ``force`` rebuilds even complete ones.
    Returns ``{name: directory}`` for every component. Timings go into each
    directory's ``toy_component.json``.
    """
    root = Path(root) if root is not None else default_root()
    root.mkdir(parents=True, exist_ok=True)
    settings = (settings or (BuildSettings.fast() if fast else BuildSettings())).override(steps)
    wanted = list(COMPONENTS) if only is None else _with_dependencies(only)
    for name in COMPONENTS:
        if name not in wanted or (is_complete(root, name, settings) and not force):
            continue
        start, cpu = time.time(), time.process_time()
        log(f"building toy {name} in {root} ...")
        with atomic_directory(root / name) as tmp:  # a killed build leaves the old one, or none
            info = _build_one(name, tmp, root, settings, device, seed, progress)
            info.update(seconds=round(time.time() - start, 1), cpu_seconds=round(time.process_time() - cpu, 1),
                        torch_threads=torch.get_num_threads(), device=str(device), seed=seed,
                        steps=settings.steps[name], batch=settings.batch[name], recipe=settings.recipe(name))
            _write_marker(root, name, tmp, info)
        log(f"built toy {name} in {time.time() - start:.0f} s")
    return {name: root / name for name in COMPONENTS}


def _with_dependencies(names: list[str]) -> list[str]:
    _check_components(names, "to build")
    out = set()
    stack = list(names)
    while stack:
        n = stack.pop()
        if n not in out:
            out.add(n)
            stack.extend(DEPENDS[n])
    return [n for n in COMPONENTS if n in out]


def _build_one(name: str, out: Path, root: Path, settings: BuildSettings, device: str, seed: int,
               progress: bool) -> dict:
    if name == "clip":
        return build_clip(out, settings, device, seed, progress)
    if name == "audio_encoder":
        return build_audio_encoder(out, root / "clip", settings, device, seed, progress)
    if name == "vae":
        return build_vae(out, settings, device, seed, progress)
    builder = {"image_decoder": build_image_decoder, "audio_decoder": build_audio_decoder,
               "video_decoder": build_video_decoder}[name]
    return builder(out, root, settings, device, seed, progress)


def component_info(root: str | os.PathLike | None = None) -> dict[str, Optional[dict]]:
    """Each component's ``toy_component.json`` (None where missing)."""
    root = Path(root) if root is not None else default_root()
    return {name: _marker(root / name) for name in COMPONENTS}


def training_inputs(components: dict[str, Optional[dict]]) -> dict[str, Optional[str]]:
    """``{name: build_id}`` of the components the MMLLM's stages read, given ``component_info``:
    ``TRAINING_INPUTS`` and every decoder built with a tuned text encoder (its recipe's
    ``text_tuning``), whose conditioning is its own. A decoder retrained on a frozen tower
    changes no input and no target, so it is left out and the stages are kept."""
    names = [*TRAINING_INPUTS, *(name for name, info in components.items()
                                 if ((info or {}).get("recipe") or {}).get("text_tuning", "frozen") != "frozen")]
    return {name: (components.get(name) or {}).get("build_id") for name in names}


__all__ = ["BuildSettings", "COMPONENTS", "DECODER_COMPONENTS", "TEXT_TUNING", "TRAINING_INPUTS", "build_components",
           "build_tokenizer", "component_info", "default_root", "is_complete", "training_inputs"]
