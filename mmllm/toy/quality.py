"""Measure the toy components with the world's oracles.

Encoders: linear probes (ridge regression on the backend's features, as mmllm's input
projectors will see them) trained on the ``train`` split and scored on fresh ``train``
items ("held-in") and on held-out attribute pairs ("held-out"); plus CLIP zero-shot
attribute classification (image vs canonical captions differing in one attribute).

VAE: world images encoded and decoded, read back by the image oracle (the ceiling of every
decoder that draws through it).

Decoders: each decoder is fed its own text encoder's conditioning of canonical captions
(exactly the stage-1 L2 target) through the real backend, and the oracle reads the
generated media back (``analyse_image`` / ``analyse_audio`` / ``analyse_video``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import oracle, world
from .components import (IMAGE_SIZE, SAMPLE_RATE, VIDEO_FRAMES, default_root, to_unit, vae_roundtrip,
                         video_decoder_backend)


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, 7919, sum(map(ord, name))])


def _specs(modality: str, split: str, n: int, rng) -> list:
    return [world.sample_spec(rng, modality, split) for _ in range(n)]


def ridge_probe(train_x: torch.Tensor, train_y: list, tests: dict[str, tuple[torch.Tensor, list]],
                ridge: float = 1.0) -> dict[str, float]:
    """Multi-class ridge regression on one-hot labels (dual form: any feature width).

    ``train_x`` (N, ...) is flattened and standardised; returns accuracy per test set.
    """
    classes = sorted(set(train_y), key=str)
    x = train_x.flatten(1).double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    y = torch.zeros(len(train_y), len(classes), dtype=torch.float64)
    y[torch.arange(len(train_y)), [classes.index(v) for v in train_y]] = 1.0
    k = x @ x.T / x.shape[1]  # (N, N)
    alpha = torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), y - y.mean(0))
    out = {}
    for name, (tx, ty) in tests.items():
        z = (tx.flatten(1).double() - mean) / std
        pred = (z @ x.T / x.shape[1]) @ alpha
        out[name] = float(np.mean([classes[i] == v for i, v in zip(pred.argmax(1).tolist(), ty)]))
    return out


def logistic_predict(train_x: torch.Tensor, train_y: list, *tests: torch.Tensor, l2: float = 1e-3) -> list:
    """Multinomial logistic regression (L-BFGS, L2 ``l2``) fitted on ``train_x`` (N, ...)
    flattened and standardised; the predicted labels of each test set."""
    classes = sorted(set(train_y), key=str)
    x = train_x.flatten(1).float()
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    y = torch.tensor([classes.index(v) for v in train_y])
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300)

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    with torch.no_grad():
        return [[classes[i] for i in (((t.flatten(1).float() - mean) / std) @ weight + bias).argmax(1).tolist()]
                for t in tests]


def _features(encoder, items: list, batch: int = 64) -> torch.Tensor:
    return torch.cat([encoder(encoder.preprocess(items[i:i + batch])).float().cpu() for i in range(0, len(items), batch)])


def evaluate_encoders(root: Path, n: int = 300, seed: int = 0) -> dict:
    """Probe and zero-shot accuracies of the toy CLIP, AST and frames encoders."""
    from mmllm.config import EncoderConfig
    from mmllm.encoders import build_encoder

    from .preset import image_encoder_config

    report: dict = {}
    rng = _rng(seed, "encoders")
    image_cfg = image_encoder_config(root)
    image_enc = build_encoder(image_cfg, "image")
    sets = {}
    for name, split, count in (("train", "train", n), ("held_in", "train", n // 2), ("held_out", "test", n // 2)):
        specs = _specs("image", split, count, rng)
        sets[name] = (specs, [world.render_image(s, IMAGE_SIZE, rng=rng) for s in specs])
    feats = {k: _features(image_enc, imgs) for k, (_, imgs) in sets.items()}
    probe = {}
    for attr in ("colour", "shape", "size", "position", "count"):
        labels = {k: [getattr(s, attr) for s in specs] for k, (specs, _) in sets.items()}
        probe[attr] = ridge_probe(feats["train"], labels["train"],
                                  {k: (feats[k], labels[k]) for k in ("held_in", "held_out")})
    report["image_probe"] = probe
    report["image_zero_shot"] = clip_zero_shot(root, {k: sets[k] for k in ("held_in", "held_out")})

    audio_enc = build_encoder(EncoderConfig(backend="hf_audio", source=str(root / "audio_encoder"),
                                            features="patch", feature_layer=-1), "audio")
    asets = {}
    for name, split, count in (("train", "train", n), ("held_in", "train", n // 2), ("held_out", "test", n // 2)):
        specs = _specs("audio", split, count, rng)
        asets[name] = (specs, [world.render_audio(s, SAMPLE_RATE, 1.0, rng=rng) for s in specs])
    afeats = {k: _features(audio_enc, w) for k, (_, w) in asets.items()}
    report["audio_probe"] = {
        attr: ridge_probe(afeats["train"], [getattr(s, attr) for s in asets["train"][0]],
                          {k: (afeats[k], [getattr(s, attr) for s in asets[k][0]]) for k in ("held_in", "held_out")})
        for attr in ("pitch", "count", "timbre")
    }

    vsets = {}
    for name, split, count in (("train", "train", n), ("held_in", "train", n // 2), ("held_out", "test", n // 2)):
        specs = _specs("video", split, count, rng)
        vsets[name] = (specs, [world.render_video(s, IMAGE_SIZE, VIDEO_FRAMES, rng=rng) for s in specs])
    report["video_probe"] = {}
    for pooling in ("none", "mean"):
        cfg = EncoderConfig(backend="frames", share_with="image", num_frames=VIDEO_FRAMES, frame_pooling=pooling,
                            features="patch")
        enc = build_encoder(cfg, "video", {"image": image_enc})
        vfeats = {k: _features(enc, v) for k, (_, v) in vsets.items()}
        report["video_probe"][f"frame_pooling={pooling}"] = {
            attr: ridge_probe(vfeats["train"], [getattr(s, attr) for s in vsets["train"][0]],
                              {k: (vfeats[k], [getattr(s, attr) for s in vsets[k][0]]) for k in ("held_in", "held_out")})
            for attr in ("colour", "shape", "direction")
        }
    return report


IMAGE_FEATURES = {"class token": lambda h: h[:, 0], "mean patch token": lambda h: h[:, 1:].mean(1),
                  "all tokens": lambda h: h}


def image_feature_probes(root: str | os.PathLike | None = None, n_train: int = 3000, n_test: int = 500,
                         seed: int = 0) -> dict:
    """Where the toy CLIP keeps each image attribute: logistic probes on its last layer's class
    token, mean patch token and all tokens (``IMAGE_FEATURES``), trained on ``n_train``
    jittered train-split renderings and scored on ``n_test`` fresh held-in and held-out ones.
    ``"newcomer"``: shape read from the 24 large, centred, un-jittered colour x shape images
    of the README's check (held-in / held-out pairs, and the mistakes)."""
    from mmllm.encoders import build_encoder

    from .evaluate import newcomer_specs
    from .preset import image_encoder_config

    root = Path(root) if root is not None else default_root()
    encoder = build_encoder(image_encoder_config(root), "image")
    rng = _rng(seed, "image_feature_probes")
    sets = {}
    for name, split, count in (("train", "train", n_train), ("held_in", "train", n_test), ("held_out", "test", n_test)):
        specs = _specs("image", split, count, rng)
        sets[name] = (specs, _features(encoder, [world.render_image(s, IMAGE_SIZE, rng=rng) for s in specs]))
    newcomer = newcomer_specs()
    newcomer_feats = _features(encoder, [world.render_image(s, IMAGE_SIZE) for s in newcomer])
    report: dict = {"probes": {}, "newcomer": {}, "settings": {"n_train": n_train, "n_test": n_test, "seed": seed}}
    held_out = [world.is_held_out(s) for s in newcomer]
    for feature, pick in IMAGE_FEATURES.items():
        report["probes"][feature] = {}
        for attr in ("colour", "shape", "size", "position", "count"):
            held_in, held_out_pred, named = logistic_predict(
                pick(sets["train"][1]), [getattr(s, attr) for s in sets["train"][0]],
                pick(sets["held_in"][1]), pick(sets["held_out"][1]), pick(newcomer_feats))
            report["probes"][feature][attr] = {
                k: float(np.mean([p == getattr(s, attr) for p, s in zip(pred, sets[k][0])]))
                for k, pred in (("held_in", held_in), ("held_out", held_out_pred))}
            if attr == "shape":
                right = [p == s.shape for p, s in zip(named, newcomer)]
                report["newcomer"][feature] = {
                    "held_in": float(np.mean([r for r, h in zip(right, held_out) if not h])),
                    "held_out": float(np.mean([r for r, h in zip(right, held_out) if h])),
                    "mistakes": [f"{s.colour} {s.shape} -> {p}" for s, p, r in zip(newcomer, named, right) if not r]}
    return report


@torch.no_grad()
def clip_zero_shot(root: Path, sets: dict) -> dict:
    """Per attribute: pick, among canonical captions that differ only in that attribute, the
    one closest to the image in CLIP space."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(root / "clip").eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip")
    processor = CLIPImageProcessor.from_pretrained(root / "clip")
    out: dict = {}
    for attr in ("colour", "shape", "count", "position"):
        values = world.attribute_values("image")[attr]
        out[attr] = {}
        for name, (specs, images) in sets.items():
            pixels = processor(images=images, return_tensors="pt", do_resize=False, do_center_crop=False).pixel_values
            img = torch.nn.functional.normalize(_features_out(model.get_image_features(pixel_values=pixels)), dim=-1)
            correct = []
            for spec, emb in zip(specs, img):
                texts = [world.canonical_caption(spec.replace(**{attr: v})) for v in values]
                ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                return_tensors="pt").input_ids
                txt = torch.nn.functional.normalize(_features_out(model.get_text_features(input_ids=ids)), dim=-1)
                correct.append(values[int((txt @ emb).argmax())] == getattr(spec, attr))
            out[attr][name] = float(np.mean(correct))
    return out


def _features_out(x):
    """transformers 5 may return a model output from get_*_features; keep the tensor."""
    return x if isinstance(x, torch.Tensor) else x.pooler_output


@torch.no_grad()
def evaluate_decoders(root: Path, n: int = 48, seed: int = 0, steps: int = 20, guidance: float = 3.0,
                      device: str = "cpu", batch: int = 16, progress: bool = True) -> dict:
    """Oracle accuracies of media generated from canonical captions, held-in and held-out."""
    from mmllm.config import DecoderConfig
    from pipelines import build_decoder
    from tqdm.auto import tqdm

    from .preset import decoder_options

    report: dict = {}
    rng = _rng(seed, "decoders")
    readers = {"image": (lambda o: oracle.analyse_image(o.numpy())),
               "audio": (lambda o: oracle.analyse_audio(o.waveform, o.sample_rate)),
               "video": (lambda o: oracle.analyse_video(o.frames))}
    for modality, (backend, folder) in {"image": ("stable_diffusion", "image_decoder"),
                                        "audio": ("spectrogram_sd", "audio_decoder"),
                                        "video": (video_decoder_backend(root / "video_decoder"), "video_decoder")}.items():
        options = {**decoder_options(modality), "num_inference_steps": steps, "guidance_scale": guidance}
        decoder = build_decoder(DecoderConfig(backend=backend, source=str(root / folder), options=options)).to(device)
        report[modality] = {}
        for split_name, split in (("held_in", "train"), ("held_out", "test")):
            specs = _specs(modality, split, n, rng)
            preds = []
            for i in tqdm(range(0, n, batch), desc=f"{modality} {split_name}", disable=not progress, leave=False):
                chunk = specs[i:i + batch]
                embeds = decoder.encode_text([world.canonical_caption(s) for s in chunk])
                preds += [readers[modality](o) for o in decoder.generate(embeds, seed=seed + i)]
            report[modality][split_name] = oracle.score_batch(preds, specs)
    return report


def evaluate_components(root: str | os.PathLike | None = None, n: int = 48, seed: int = 0, device: str = "cpu",
                        progress: bool = True, probe_n: Optional[int] = None) -> dict:
    """The encoders', the VAE's and the decoders' evaluations; also written to ``<root>/quality.json``."""
    from diffusers import AutoencoderKL

    root = Path(root) if root is not None else default_root()
    report = {"encoders": evaluate_encoders(root, n=probe_n or max(60, 6 * n), seed=seed),
              "vae": vae_roundtrip(AutoencoderKL.from_pretrained(root / "vae").eval(), seed=seed),
              "decoders": evaluate_decoders(root, n=n, seed=seed, device=device, progress=progress),
              "settings": {"n": n, "seed": seed}}
    (root / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
