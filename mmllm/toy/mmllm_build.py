"""Build mmllm's embedded default: the toy MMLLM, trained end to end on the toy world.

``build_default(root)`` runs every step that is missing under ``root`` (default
``~/.cache/mmllm/toy``), each one cached and resumable::

    <root>/clip ... video_decoder/   frozen toy components (mmllm.toy.components)
    <root>/data/                     the world's train split: media, captions, generation
                                     pairs, QA, dialogues, plus the stage files made here
    <root>/runs/stage1/              stage 1 (mmllm.training.train): captions (X -> text) and
                                     generation pairs (text -> signal tokens + L2)
    <root>/runs/stage2/              stage 2: LoRA + projectors on QA, descriptions,
                                     generation requests and multi-turn dialogues
    <root>/runs/align/               decoding-side alignment: the output projectors alone on
                                     the stage-2 model's cached states (mmllm.training.align)
    <root>/model/                    the finished model (save_pretrained + build.json);
                                     mmllm.load() opens it when it exists

Training is the project's real code (``mmllm.training.train``, what the stage scripts
run); this module only writes the data files and chooses the settings. A stage whose
``done.json`` matches the current settings and components is reused; an interrupted
stage resumes from its latest checkpoint.

Sequences are kept short for a CPU: each data file holds one input modality and the
sources alternate batch by batch (``mix="alternate"``), so a batch of 16-token images is
never padded to a 64-token video.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import configs, world
from .components import VIDEO_FRAMES, build_components, component_info, default_root, loss_summary, training_inputs

MODEL_DIR = "model"
BUILD_INFO = "build.json"
DONE = "done.json"


_default = configs.defaults("stages")


@dataclass
class DefaultSettings(configs.Recipe):
    """Data sizes and training settings of the toy MMLLM's stages.

    The defaults are the ``default`` recipe's (``mmllm/toy/configs/default.json``);
    ``from_recipe(name)`` reads another (``quick``, ``fast``, ``smoke``).
    """

    SECTION = "stages"

    items: int = _default("items", "caption pairs, generation pairs and QA items per modality")
    dialogues: int = _default("dialogues", "multi-turn LLaVA dialogues")
    qa_turns: int = _default("qa_turns")  # stage-2 QA conversations ask 1 to qa_turns questions about one item
    # input modality -> share of its caption pairs that also become stage-2 "describe it" turns
    describe_share: dict = _default("describe_share")
    # input modality -> an attribute that gets a second QA conversation opening with it
    focus_questions: dict = _default("focus_questions")
    # output modality -> share of its generation pairs that also get a brief request
    brief_requests: dict = _default("brief_requests")
    stage1_steps: int = _default("stage1_steps", "stage 1 optimiser steps; 0: one epoch")
    stage1_batch: int = _default("stage1_batch", "stage 1 batch size")
    stage1_lr: float = _default("stage1_lr", "stage 1 learning rate")
    stage1_mix: str = _default("stage1_mix", "how stage 1's files share batches (TrainConfig.mix)")
    stage1_passes: dict = _default(
        "stage1_passes", 'passes per epoch over stage 1\'s files, e.g. \'{"image": 2, "generation": 0.1}\' '
                         "(keys image, audio, video, generation; default one each; TrainConfig.file_passes)")
    stage2_steps: int = _default("stage2_steps", "stage 2 optimiser steps; 0: one epoch")
    stage2_batch: int = _default("stage2_batch", "stage 2 batch size")
    stage2_group_by_length: int = _default("stage2_group_by_length",
                                           "stage 2 length grouping window in batches (TrainConfig.group_by_length)")
    stage2_mix: str = _default("stage2_mix", "how stage 2's files share batches (TrainConfig.mix)")
    stage2_lr: float = _default("stage2_lr", "stage 2 learning rate of LoRA and the signal rows")
    stage2_projector_lr: float = _default("stage2_projector_lr", "stage 2 learning rate of the projectors")
    lora: dict = _default("lora")  # stage 2's LoraConfig
    # Decoding-side alignment after stage 2 (mmllm.training.align): the output projectors
    # alone, on the stage-2 model's cached states at the generation turns' signal tokens.
    align_steps: int = _default("align_steps", "align step: output-projector steps")
    align_batch: int = _default("align_batch")
    align_lr: float = _default("align_lr", "align step: learning rate")
    align_weight_decay: float = _default("align_weight_decay", "align step: AdamW weight decay")
    align_weights: dict = _default(
        "align_weights", 'each output modality\'s share of the align steps, e.g. \'{"image": 2}\' (default equal)')
    align_standardize: bool = _default("align_standardize", "fit the align step on standardised states")
    align_examples: Optional[int] = _default("align_examples",
                                             "align step: signal sequences cached per output modality (default all)")
    align_val_examples: int = _default("align_val_examples")  # of those, held back per modality and scored
    align_reinit: bool = _default("align_reinit")  # fit the output projectors from a fresh initialisation
    align_projectors: dict = _default(
        "align_projectors", "output projectors the align step fits in place of the stages' ones, e.g. "
                            "'{\"audio\": {\"type\": \"linear\"}}' ('{}' keeps the preset's)")
    precision: str = _default("precision",
                              "precision of both stages and of the align step's LLM pass: bf16 mixed precision, "
                              "or auto, bf16 where this machine computes it natively (TrainConfig.precision)")
    save_every: int = _default("save_every")  # checkpoints, for resuming an interrupted stage
    seed: int = _default("seed", "random seed")

    def stage_fingerprint(self, stage: str, components: dict, model_config: Optional[dict] = None,
                          whole_config: bool = False) -> str:
        """What a stage's result depends on: its settings, the data, the components it reads
        (``components.training_inputs``: their ``toy_component.json`` build ids) and the model
        config without the decoders' generation settings (``training_view``). Retraining a
        decoder's UNet on a frozen text encoder, or changing its guidance, therefore keeps the
        stages; a decoder that tuned its text encoder changed their L2 targets, and retrains them.

        ``whole_config=True`` hashes the whole config, as builds before 2026-12-06 recorded;
        ``build_default`` still accepts those (and rewrites them), so such a build stays valid."""
        s1 = ("items", "dialogues", "qa_turns", "stage1_steps", "stage1_batch", "stage1_lr", "stage1_mix",
              "stage1_passes", "precision", "seed")
        s2 = (*s1, "describe_share", "focus_questions", "brief_requests", "stage2_steps", "stage2_batch",
              "stage2_group_by_length", "stage2_mix", "stage2_lr", "stage2_projector_lr", "lora")
        align = (*s2, "align_steps", "align_batch", "align_lr", "align_weight_decay", "align_weights",
                 "align_examples", "align_val_examples", "align_reinit", "align_standardize", "align_projectors")
        keys = {"stage1": s1, "stage2": s2, "align": align}[stage]
        model_config = model_config or {}
        data = {"settings": {k: getattr(self, k) for k in keys},
                "components": training_inputs(components),
                "model_config": model_config if whole_config else training_view(model_config)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def generation_settings(model_config: dict) -> dict:
    """``{modality: settings}``: each output decoder's generation settings in a model config
    dict (the options its backend lists in ``defaults``: guidance, steps, sizes). Only
    rendering reads them; no stage does."""
    from pipelines import DECODERS

    out = {}
    for modality, output in (model_config.get("outputs") or {}).items():
        decoder = output.get("decoder") or {}
        generation = DECODERS.get(decoder["backend"]).defaults
        out[modality] = {k: v for k, v in (decoder.get("options") or {}).items() if k in generation}
    return out


def training_view(model_config: dict) -> dict:
    """A model config dict without the decoders' generation settings (``generation_settings``):
    what the stages' fingerprints hash."""
    view = json.loads(json.dumps(model_config))
    for modality, settings in generation_settings(model_config).items():
        options = view["outputs"][modality]["decoder"]["options"]
        view["outputs"][modality]["decoder"]["options"] = {k: v for k, v in options.items() if k not in settings}
    return view


def model_dir(root: str | os.PathLike | None = None) -> Path:
    """Where the built toy MMLLM lives: ``<root>/model``."""
    return (Path(root) if root is not None else default_root()) / MODEL_DIR


def is_built(root: str | os.PathLike | None = None) -> bool:
    """True when ``<root>/model`` holds a finished build (its ``build.json`` is written last)."""
    d = model_dir(root)
    return (d / BUILD_INFO).is_file() and (d / "config.json").is_file()


# --------------------------------------------------------------------------- data


def _write_json(path: Path, rows: list) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _qa_conversation(row: dict, turns: int, rng: np.random.Generator, first: Optional[str] = None) -> dict:
    """The QA item's question (or, with ``first``, a question about that attribute), then up
    to ``turns - 1`` more about other attributes of the same media (LLaVA-style multi-turn):
    one encoding of the media serves several answers."""
    spec = world.spec_from_dict(row["spec"])
    if first is None:
        first, question, answer = row["attribute"], row["question"], row["answer"]
    else:
        question, answer, _ = world.question_answer(spec, first, rng)
    others = [a for a in world.attribute_values(spec.modality) if a != first]
    extra = [others[i] for i in rng.permutation(len(others))[:int(rng.integers(turns))]]
    conv = world.conversation_row(question, answer, (row["modality"], row["path"]))
    for attribute in extra:
        q, a, _ = world.question_answer(spec, attribute, rng)
        conv["conversations"] += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return conv


DESCRIBE = {m: (f"Describe the {m}.", f"What is in this {m}?", "Describe it briefly.") for m in world.MODALITIES}


def write_data(directory: Path, settings: DefaultSettings) -> dict[str, list[str]]:
    """The world's train split plus the stage files, under ``directory`` (reused when done).

    Returns ``{"captions": [...], "generation": [...], "conversations": [...]}``: one file
    per input modality for captions and conversations (so batches are not padded across
    modalities), one generation file.
    """
    marker = directory / DONE
    wanted = {"items": settings.items, "dialogues": settings.dialogues, "qa_turns": settings.qa_turns,
              "describe_share": settings.describe_share, "focus_questions": settings.focus_questions,
              "brief_requests": settings.brief_requests, "seed": settings.seed, "frames": VIDEO_FRAMES}
    if not (marker.is_file() and json.loads(marker.read_text()).get("settings") == wanted):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        world.write_dataset(directory, settings.items, seed=settings.seed, split="train", frames=VIDEO_FRAMES,
                            n_dialogues=settings.dialogues)
        _write_stage_files(directory, settings)
        marker.write_text(json.dumps({"settings": wanted}))
    return _stage_files(directory)


def _stage_files(directory: Path) -> dict[str, list[str]]:
    d = str(directory)
    return {"captions": [f"{d}/stage1_captions_{m}.jsonl" for m in world.MODALITIES],
            "generation": [f"{d}/generation.jsonl"],
            "conversations": [f"{d}/stage2_{m}.json" for m in (*world.MODALITIES, "text")],
            "requests": [f"{d}/stage2_text.json"]}  # generation requests (+ text-only dialogues): for align


def _write_stage_files(directory: Path, settings: DefaultSettings) -> None:
    rng = np.random.default_rng([settings.seed, 2024])
    captions = _read_jsonl(directory / "captions.jsonl")
    for m in world.MODALITIES:
        rows = [r for r in captions if r["modality"] == m]
        (directory / f"stage1_captions_{m}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Stage 2: QA and descriptions about an input, generation requests, and the dialogues,
    # grouped by input modality ("text": no input media).
    groups: dict[str, list] = {m: [] for m in (*world.MODALITIES, "text")}
    for r in _read_jsonl(directory / "qa.jsonl"):
        groups[r["modality"]].append(_qa_conversation(r, settings.qa_turns, rng))
        focus = settings.focus_questions.get(r["modality"])
        if focus is not None:
            groups[r["modality"]].append(_qa_conversation(r, settings.qa_turns, rng, first=focus))
    for r in captions:
        m = r["modality"]
        if rng.random() >= settings.describe_share.get(m, 0.5):
            continue
        reply = r["caption"][0].upper() + r["caption"][1:]
        reply += "" if reply.endswith(".") else "."
        groups[m].append(world.conversation_row(DESCRIBE[m][int(rng.integers(3))], reply, (m, r["path"])))
    for r in _read_jsonl(directory / "generation.jsonl"):
        spec = world.spec_from_dict(r["spec"])
        groups["text"].append(world.conversation_row(r["request"], world.generation_reply(spec, rng),
                                           output={"modality": r["modality"], "caption": r["caption"]}))
        share = settings.brief_requests.get(r["modality"], 0.0)
        if share > 0 and rng.random() < share:  # no draw while off: the files stay as they were
            filled, request = world.brief_generation_request(spec, rng)
            groups["text"].append(world.conversation_row(request, world.generation_reply(filled, rng),
                                               output={"modality": r["modality"],
                                                       "caption": world.canonical_caption(filled)}))
    for d in json.loads((directory / "dialogues.json").read_text()):
        m = next((m for m in world.MODALITIES if m in d), "text")
        groups[m].append(d)
    for name, rows in groups.items():
        order = rng.permutation(len(rows))
        _write_json(directory / f"stage2_{name}.json", [rows[i] for i in order])


# --------------------------------------------------------------------------- stages


def _recorded(marker: Path, fingerprint: str, legacy: Optional[str] = None) -> bool:
    """True when the JSON file ``marker`` records ``fingerprint``, or ``legacy`` (the same
    stage fingerprinted the old way, over the whole model config), which it then rewrites as
    ``fingerprint``."""
    if not marker.is_file():
        return False
    info = json.loads(marker.read_text())
    if info.get("fingerprint") == fingerprint:
        return True
    if legacy is None or info.get("fingerprint") != legacy:
        return False
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({**info, "fingerprint": fingerprint}, indent=1))
    os.replace(tmp, marker)
    return True


def _stage_done(out: Path, fingerprint: str, legacy: Optional[str] = None) -> bool:
    return (out / "model" / "config.json").is_file() and _recorded(out / DONE, fingerprint, legacy)


def _relocatable(model: Path, tree: Path) -> None:
    """Rewrite a stage's saved ``config.json`` to name the components under ``tree`` (the toy
    root) relative to itself (``../../../clip``), so a moved root can still resume, rerun
    align from its stage-2 model, or be loaded stage by stage."""
    from mmllm.config import MMLLMConfig
    from mmllm.model import CONFIG_NAME

    config = MMLLMConfig.from_json(model / CONFIG_NAME).resolved(model)
    tmp = model / (CONFIG_NAME + ".tmp")
    config.relative_to(model, tree=tree).to_json(tmp)
    os.replace(tmp, model / CONFIG_NAME)


def _run_stage(name: str, out: Path, fingerprint: str, make_config: Callable, make_model: Callable,
               log: Callable[[str], None], legacy: Optional[str] = None) -> dict:
    """Train one stage into ``out`` unless it is already done; resume from a checkpoint.
    ``legacy``: the stage's old-style fingerprint (``stage_fingerprint(whole_config=True)``),
    accepted too."""
    from mmllm.training import latest_checkpoint, train

    if _stage_done(out, fingerprint, legacy):
        log(f"{name}: reusing {out / 'model'}")
        return json.loads((out / DONE).read_text())
    started = out / "fingerprint.json"
    resume = None
    if _recorded(started, fingerprint, legacy):
        resume = "latest" if latest_checkpoint(out) is not None else None
    else:
        shutil.rmtree(out, ignore_errors=True)  # other settings: start over
        out.mkdir(parents=True)
        started.write_text(json.dumps({"fingerprint": fingerprint}))
    cfg = make_config(resume)
    length = f"{cfg.steps} steps" if cfg.steps > 0 else f"{cfg.epochs} epoch(s)"
    log(f"{name}: training {length} into {out}" + (" (resuming)" if resume else ""))
    t0 = time.time()
    result = train(cfg, model=make_model())
    # First and last quarter of the run (at most 20 steps each): whole cycles of the
    # alternating sources, so the two means compare like with like.
    losses = loss_summary(result.losses, 20) if result.losses else {"first_loss": None, "final_loss": None}
    info = {"fingerprint": fingerprint, "seconds": round(time.time() - t0, 1), "steps": result.steps, **losses,
            "bad_rows": result.bad_rows, "resumed": bool(resume)}
    _relocatable(out / "model", tree=out.parent.parent)
    (out / DONE).write_text(json.dumps(info, indent=1))
    # A sequential mix reads its files one after another, so the two ends are different files.
    ends = " (first and last files of a sequential mix)" if cfg.mix == "sequential" else ""
    log(f"{name}: done in {info['seconds']:.0f} s, loss {info['first_loss']:.3f} -> {info['final_loss']:.3f}{ends}")
    return info


def _run_align(out: Path, fingerprint: str, stage2: Path, conversations: list[str], settings: DefaultSettings,
               device: str, progress: bool, log: Callable[[str], None], legacy: Optional[str] = None) -> dict:
    """Decoding-side alignment of the stage-2 model's output projectors on its cached states
    at the generation conversations' signal tokens (``mmllm.training.align``)."""
    from mmllm.training import align_output_projectors, load_model
    from mmllm.training.config import mixed_precision

    if _stage_done(out, fingerprint, legacy):
        log(f"align: reusing {out / 'model'}")
        return json.loads((out / DONE).read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    autocast = mixed_precision(settings.precision)
    log(f"align: caching signal states (autocast {autocast}), then {settings.align_steps} output-projector steps "
        f"into {out}")
    model = load_model(str(stage2)).to(device)
    result = align_output_projectors(model, conversations=conversations, data_root=str(Path(conversations[0]).parent),
                                     steps=settings.align_steps, batch_size=settings.align_batch,
                                     lr=settings.align_lr, weight_decay=settings.align_weight_decay,
                                     weights=settings.align_weights, seed=settings.seed, progress=progress,
                                     max_examples=settings.align_examples, reinit=settings.align_reinit,
                                     val_examples=settings.align_val_examples, precision=autocast,
                                     standardize=settings.align_standardize, projectors=settings.align_projectors)
    model.save_pretrained(out / "model")
    _relocatable(out / "model", tree=out.parent.parent)
    info = {"fingerprint": fingerprint, "seconds": result.seconds, "steps": result.steps,
            "first_loss": result.first_loss, "final_loss": result.final_loss, "examples": result.examples,
            "bad_rows": result.bad_rows, "val_loss": result.val_loss, "train_loss": result.train_loss,
            "modality_steps": result.modality_steps}
    (out / DONE).write_text(json.dumps(info, indent=1))
    held = ", ".join(f"{m} {v:.3f}" for m, v in sorted(result.val_loss.items()))
    fit = ", ".join(f"{m} {v:.3f}" for m, v in sorted(result.train_loss.items()))
    log(f"align: done in {result.seconds:.0f} s, loss {result.first_loss:.3f} -> {result.final_loss:.3f}"
        + (f"; training L2 {fit}" if fit else "") + (f"; held-back L2 {held}" if held else ""))
    return info


def _stage1_passes(settings: DefaultSettings) -> Optional[list[float]]:
    """``TrainConfig.file_passes`` for stage 1's files (``_stage_files``: one caption file per
    modality, then the generation file) from ``settings.stage1_passes``; None: once each."""
    names = (*world.MODALITIES, "generation")
    unknown = set(settings.stage1_passes) - set(names)
    if unknown:
        raise ValueError(f"DefaultSettings.stage1_passes: unknown file(s) {sorted(unknown)}; use {list(names)}")
    return [float(settings.stage1_passes.get(n, 1)) for n in names] if settings.stage1_passes else None


def _train_config(**kwargs):
    from mmllm.training import TrainConfig

    return TrainConfig(**kwargs)


def build_default(root: str | os.PathLike | None = None, device: str = "cpu", fast: bool = False,
                  settings: Optional[DefaultSettings] = None, progress: bool = True, force: bool = False,
                  config_overrides: Optional[dict] = None, component_settings=None,
                  log: Callable[[str], None] = print) -> Path:
    """Build the toy MMLLM under ``root`` (every missing step) and return ``<root>/model``.

    ``fast`` uses ``build_components(fast=True)`` and ``DefaultSettings.fast()`` (tests);
    ``component_settings`` (a ``components.BuildSettings``) replaces the components' defaults;
    ``force`` retrains both stages (components and data are still reused);
    ``config_overrides`` go to ``toy_config`` (e.g. a tiny random LLM in tests).
    """
    import torch

    from mmllm import MMLLM
    from mmllm.config import LoraConfig, MMLLMConfig
    from mmllm.model import CONFIG_NAME
    from mmllm.training import load_model

    from .preset import toy_config

    root = Path(root) if root is not None else default_root()
    settings = settings or (DefaultSettings.fast() if fast else DefaultSettings())
    timings: dict[str, float] = {}
    t0 = time.time()
    build_components(root, device=device, fast=fast, settings=component_settings, progress=progress, log=log)
    timings["components"] = round(time.time() - t0, 1)
    components = component_info(root)

    t = time.time()
    files = write_data(root / "data", settings)
    timings["data"] = round(time.time() - t, 1)
    if force:
        for s in ("stage1", "stage2", "align"):
            shutil.rmtree(root / "runs" / s, ignore_errors=True)

    common = dict(mix="alternate", precision=settings.precision, log_every=0, progress=progress, seed=settings.seed,
                  save_every=settings.save_every, warmup_ratio=0.05, data_root=str(root / "data"))
    s1, s2 = root / "runs" / "stage1", root / "runs" / "stage2"
    # The whole model config (preset choices included), not just the overrides: a changed
    # preset retrains the stages, unless only the decoders' generation settings changed
    # (``training_view``). Paths relative to the model dir, so a moved or symlinked root
    # keeps its fingerprints.
    final = model_dir(root)
    model_config = toy_config(root, **(config_overrides or {})).relative_to(final).to_dict()
    fp1, fp2, fp3 = (settings.stage_fingerprint(s, components, model_config) for s in ("stage1", "stage2", "align"))
    old1, old2, old3 = (settings.stage_fingerprint(s, components, model_config, whole_config=True)
                        for s in ("stage1", "stage2", "align"))

    def model_for_stage1():
        return MMLLM.from_config(toy_config(root, **(config_overrides or {})), device=device)

    stage1_passes = _stage1_passes(settings)
    t = time.time()
    info1 = _run_stage(
        "stage 1", s1, fp1,
        lambda resume: _train_config(stage="stage1", model="toy", out=str(s1), captions=files["captions"],
                                     generation=files["generation"], steps=settings.stage1_steps,
                                     batch_size=settings.stage1_batch, lr=settings.stage1_lr,
                                     file_passes=stage1_passes, resume=resume,
                                     **{**common, "mix": settings.stage1_mix}),
        model_for_stage1, log, legacy=old1)
    timings["stage1"] = round(time.time() - t, 1)

    t = time.time()
    info2 = _run_stage(
        "stage 2", s2, fp2,
        lambda resume: _train_config(stage="stage2", model=str(s1), out=str(s2),
                                     conversations=files["conversations"], steps=settings.stage2_steps,
                                     batch_size=settings.stage2_batch, lr=settings.stage2_lr,
                                     projector_lr=settings.stage2_projector_lr, lora=LoraConfig(**settings.lora),
                                     group_by_length=settings.stage2_group_by_length, resume=resume,
                                     **{**common, "mix": settings.stage2_mix}),
        lambda: load_model(str(s1)).to(device), log, legacy=old2)
    timings["stage2"] = round(time.time() - t, 1)

    t = time.time()
    s3 = root / "runs" / "align"
    info3 = _run_align(s3, fp3, s2, files["requests"], settings, device, progress, log, legacy=old3)
    timings["align"] = round(time.time() - t, 1)

    built = json.loads((final / BUILD_INFO).read_text()) if is_built(root) else {}
    component_ids = {k: (v or {}).get("build_id") for k, v in components.items()}
    generation = generation_settings(model_config)
    # A rebuilt decoder, or new generation settings, keep the stages but are re-recorded.
    if force or built.get("align") != fp3 or built.get("components") != component_ids or \
            built.get("generation_settings") != generation:
        from mmllm.fileio import atomic_directory

        with atomic_directory(final) as tmp:
            for f in (s3 / "model").iterdir():
                shutil.copy2(f, tmp / f.name)
            # The stage dirs name the components relative to the root (../../../clip); the
            # model dir names its siblings (../clip), so the whole root can move.
            config = MMLLMConfig.from_json(s3 / "model" / CONFIG_NAME).resolved(s3 / "model")
            # The stages may have been trained under other generation settings; the model
            # renders with the current ones (the rest of each decoder's options are fingerprinted).
            for modality, output in config.outputs.items():
                output.decoder.options = dict(model_config["outputs"][modality]["decoder"]["options"])
            config.relative_to(final).to_json(tmp / CONFIG_NAME)
            info = {"stage1": fp1, "stage2": fp2, "align": fp3, "settings": asdict(settings), "device": str(device),
                    "torch_threads": torch.get_num_threads(), "fast": fast, "timings_s": timings,
                    "stage1_run": info1, "stage2_run": info2, "align_run": info3,
                    "components": component_ids, "generation_settings": generation, "built_at": time.time()}
            (tmp / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")  # last: marks it complete
    uses = (f"mmllm.load({str(final)!r}) opens it; MMLLM_DEFAULT={final} makes it the default, in place of the "
            "shipped one; scripts/ship_default.py packs it as the shipped default")
    log(f"toy MMLLM ready in {final} ({time.time() - t0:.0f} s this run; {uses})")
    return final


__all__ = ["DefaultSettings", "build_default", "generation_settings", "is_built", "model_dir",
           "training_view", "write_data"]
