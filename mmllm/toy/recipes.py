"""The toy world's named recipes, and a cheap way to compare training recipes on it.

``load_recipe(name)`` gives a recipe's typed settings (``components.BuildSettings``,
``mmllm_build.DefaultSettings``) from its JSON file (``mmllm.toy.configs``);
``recipe_fingerprint(name)`` is a short hash of everything the recipe builds from.

A *variant* is a short training run on one modality's caption pairs (LLaVA's "plain"
format, ``<image>`` + caption) from the toy MMLLM's initial state, with its own
``TrainConfig`` fields (stage, learning rates, LoRA) and model-config overrides
(projector type, feature selection, token counts). It is then scored by captioning
rendered held-in and held-out items in the same plain format and reading the answers
with ``oracle.analyse_text``. A variant costs one short run through the real trainer, so
projector types, token counts and learning rates can be ranked in minutes on a CPU::

    from mmllm.toy.recipes import compare
    rows = compare({"linear": {"lr": 6e-3, "inputs.image.projector.type": "linear"},
                    "mlp": {"lr": 6e-3}}, modality="image", steps=120)

``scripts/compare_recipes.py`` is the command line; docs/research/README.md has the measured tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import configs, oracle, world
from .components import BuildSettings, default_root
from .mmllm_build import DefaultSettings, model_dir, training_view
from .preset import toy_config


def load_recipe(name: str = "default") -> tuple[BuildSettings, DefaultSettings]:
    """The components' and the stages' settings of recipe ``name`` (``recipe_names()``)."""
    return BuildSettings.from_recipe(name), DefaultSettings.from_recipe(name)


def recipe_names() -> list[str]:
    return configs.names()


def fingerprint(components: BuildSettings, stages: DefaultSettings, model_config: dict) -> str:
    """The first 16 hex digits of the SHA-256 of the settings and the model config, as sorted JSON."""
    data = {"components": dataclasses.asdict(components), "stages": dataclasses.asdict(stages),
            "model_config": model_config}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def recipe_fingerprint(name: str = "default") -> str:
    """A short hash of what recipe ``name`` builds from: its settings and the toy model config
    (``toy_config``) with component paths relative to the model directory and without the
    decoders' generation settings (``training_view``). Nothing needs to be built: the image
    statistics that ``toy_config`` reads from a built CLIP are outputs of the build, not
    inputs, and are left out, so neither the machine nor a build changes it. A shipped model's
    manifest records it (``scripts/ship_default.py``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "toy"
        (root / "clip").mkdir(parents=True)
        (root / "clip" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.0] * 3,
                                                                           "image_std": [1.0] * 3}))
        model = model_dir(root)
        config = toy_config(root).relative_to(model).to_dict()

        def relative(value):  # relative_to keeps the paths of components that are not there
            if isinstance(value, dict):
                return {k: relative(v) for k, v in value.items()}
            if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(root):
                return os.path.relpath(value, model)
            return value

        config = relative(config)
    for inp in config["inputs"].values():
        for stat in ("image_mean", "image_std"):
            (inp["encoder"].get("options") or {}).pop(stat, None)
    return fingerprint(*load_recipe(name), training_view(config))


def split_variant(variant: dict) -> tuple[dict, dict]:
    """(TrainConfig fields, model-config overrides) of a variant; ``lora: true`` (and stage 2,
    which needs adapters) means the toy build's own LoRA settings (``DefaultSettings.lora``)."""
    from mmllm.training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = {k: v for k, v in variant.items() if k in fields}
    overrides = {k: v for k, v in variant.items() if k not in fields}
    if train.get("lora") is True or (train.get("stage") == "stage2" and not train.get("lora")):
        train["lora"] = DefaultSettings().lora
    return train, overrides


@torch.no_grad()
def plain_caption_scores(model, modality: str, split: str, n: int = 48, seed: int = 5,
                         max_new_tokens: int = 16) -> dict[str, float]:
    """Attribute accuracies of greedy plain-format captions (media tokens only, no chat
    template: what stage 1 trains) of ``n`` rendered ``split`` items."""
    from .evaluate import render_input

    rng = np.random.default_rng([seed, sum(map(ord, modality + split))])
    specs = [world.sample_spec(rng, modality, split) for _ in range(n)]
    inputs = [render_input(s, rng) for s in specs]
    proc = model.processor
    ids = torch.tensor([proc.expand([proc.modalities[modality].token_id])] * n, device=model.device)
    tensors, owners = proc.preprocess_media([{modality: [x]} for x in inputs])
    tensors = {k: v.to(model.device) for k, v in tensors.items()}
    owners = {k: v.to(model.device) for k, v in owners.items()}
    model.eval()
    embeds, prefix = model.embed(ids, tensors, owners)
    with model.prefix_context(prefix):
        out = model.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, pad_token_id=model.tokenizer.pad_token_id,
                                 eos_token_id=model.tokenizer.eos_token_id)
    texts = model.tokenizer.batch_decode(out, skip_special_tokens=True)
    rows = [oracle.score(oracle.analyse_text(t, modality), s) for t, s in zip(texts, specs)]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def run_variant(name: str, variant: dict, out: str | os.PathLike, modality: str = "image", steps: int = 120,
                batch_size: int = 16, n: int = 48, root: Optional[str | os.PathLike] = None, data=None,
                config_overrides: Optional[dict] = None, seed: int = 0, progress: bool = False) -> dict:
    """Train one variant on ``modality``'s caption pairs for ``steps`` and score it.

    ``data`` is ``mmllm_build.write_data``'s file dict (written under ``<root>/data`` when
    None); ``config_overrides`` apply to every variant (tests use a tiny LLM). Returns
    ``{"variant", "seconds", "first_loss", "final_loss", "held_in": {...}, "held_out": {...}}``.
    """
    import time

    from mmllm import MMLLM
    from mmllm.training import TrainConfig, train

    from .components import loss_summary
    from .mmllm_build import write_data

    root = Path(root) if root is not None else default_root()
    files = data or write_data(root / "data", DefaultSettings(seed=seed))
    captions = [f for f in files["captions"] if f.endswith(f"_{modality}.jsonl")]
    fields, overrides = split_variant(variant)
    settings = dict(stage="stage1_enc", model="toy", out=str(out), captions=captions, steps=steps,
                    batch_size=batch_size, lr=2e-3, precision="fp32", log_every=0, save_every=0,
                    warmup_ratio=0.05, progress=progress, seed=seed, data_root=str(Path(captions[0]).parent))
    settings.update(fields)
    if isinstance(settings.get("lora"), dict):
        from mmllm.config import LoraConfig

        settings["lora"] = LoraConfig(**settings["lora"])
    cfg = TrainConfig(**settings)
    model = MMLLM.from_config(toy_config(root, **{**(config_overrides or {}), **overrides}))
    t0 = time.time()
    result = train(cfg, model=model)
    seconds = time.time() - t0
    return {"variant": name, "settings": variant, "seconds": round(seconds, 1), **loss_summary(result.losses, 10),
            "held_in": plain_caption_scores(model, modality, "train", n, seed=seed + 5),
            "held_out": plain_caption_scores(model, modality, "test", n, seed=seed + 5)}


def compare(variants: dict[str, dict], out: str | os.PathLike, log: Callable[[str], None] = print,
            **kwargs) -> list[dict]:
    """``run_variant`` for each named variant (each into ``out/<name>``), in order."""
    rows = []
    for name, variant in variants.items():
        log(f"variant {name}: {variant}")
        rows.append(run_variant(name, variant, Path(out) / name, **kwargs))
        log(f"variant {name}: loss {rows[-1]['first_loss']:.3f} -> {rows[-1]['final_loss']:.3f}, "
            f"held-out {({k: round(v, 2) for k, v in rows[-1]['held_out'].items()})}")
    return rows


def table(rows: list[dict], modality: str = "image") -> str:
    """A markdown table: one row per variant, held-in / held-out accuracy per attribute."""
    attrs = list(world.attribute_values(modality))
    head = ["variant", "settings", "loss first -> last", *attrs, "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items()) or "defaults"
        cells = [f"{r['held_in'][a]:.2f} / {r['held_out'][a]:.2f}" for a in attrs]
        lines.append("| " + " | ".join([r["variant"], settings, f"{r['first_loss']:.2f} -> {r['final_loss']:.2f}",
                                        *cells, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


__all__ = ["compare", "fingerprint", "load_recipe", "plain_caption_scores", "recipe_fingerprint", "recipe_names",
           "run_variant", "split_variant", "table"]
