"""Command-line flags shared by ``scripts/train_stage1.py`` and ``scripts/train_stage2.py``.

Precedence: TrainConfig defaults < ``--config file.json`` < explicit flags.
"""

from __future__ import annotations

import argparse
import json

from .config import TrainConfig

# flag -> (TrainConfig field, type, help)
FLAGS = {
    "--model": ("model", str, "preset name, save_pretrained dir, or a previous stage's --out dir"),
    "--captions": ("captions", str, "caption pairs (.jsonl/.csv: modality, path, caption), encoding side"),
    "--generation": ("generation", str, "generation pairs (.jsonl/.csv: modality, caption), decoding side"),
    "--conversations": ("conversations", str, "LLaVA conversations (.json list or .jsonl)"),
    "--data-root": ("data_root", str, "media paths are relative to this (default: each data file's folder)"),
    "--out": ("out", str, "output dir: checkpoints/, logs/, model/ (the finished stage), bad_rows.json"),
    "--steps": ("steps", int, "optimiser steps (0: use --epochs)"),
    "--epochs": ("epochs", int, "passes over the data when --steps is 0"),
    "--batch-size": ("batch_size", int, "samples per micro-batch per process"),
    "--grad-accum": ("grad_accum", int, "micro-batches per optimiser step"),
    "--lr": ("lr", float, "learning rate (LoRA, signal-token rows)"),
    "--projector-lr": ("projector_lr", float, "learning rate of the projectors (default: --lr)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay"),
    "--warmup-ratio": ("warmup_ratio", float, "share of steps with linear warmup before cosine decay"),
    "--precision": ("precision", str,
                    "fp32 | bf16 | fp16 (mixed precision through accelerate) | auto (bf16 where native, else fp32)"),
    "--save-every": ("save_every", int, "checkpoint every N steps (0: never)"),
    "--eval-every": ("eval_every", int, "run the evaluation hook every N steps (library use)"),
    "--log-every": ("log_every", int, "TensorBoard scalars every N steps"),
    "--resume": ("resume", str, "checkpoint dir to resume from, or 'latest'"),
    "--nan-policy": ("nan_policy", str, "skip | stop on a NaN/Inf loss"),
    "--mix": ("mix", str, "mixed | alternate | spread | sequential: how several data files share batches"),
    "--shuffle-buffer": ("shuffle_buffer", int, "streaming shuffle buffer size (0: file order)"),
    "--group-by-length": ("group_by_length", int, "batch similar lengths together within windows of N batches (0: off)"),
    "--feature-cache": ("feature_cache", str, "dir written by scripts/cache_features.py"),
    "--seed": ("seed", int, "random seed"),
}


def build_parser(description: str, stages: tuple[str, ...]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=str, default=None, help="TrainConfig JSON (e.g. configs/train/stage1.json); flags override it")
    if len(stages) > 1:
        p.add_argument("--stage", choices=stages, default=None, help="which side(s) to align (default from config: stage1)")
    for flag, (_, tp, help_) in FLAGS.items():
        p.add_argument(flag, type=tp, default=None, help=help_)
    p.add_argument("--strict", action="store_true", default=None, help="fail at the first bad data row (with its row number)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute LLM activations in backward")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide the tqdm bar")
    p.add_argument("--file-passes", type=float, nargs="+", default=None, metavar="N",
                   help="passes per epoch over each data file, in the order captions, generation, conversations "
                        "(2: twice, 0.5: the first half; with --mix spread, each file's share of the batches)")
    p.add_argument("--l2-scale", type=str, default=None, help='per-modality L2 weight as JSON, e.g. \'{"video": 2}\'')
    return p


def config_from_args(args: argparse.Namespace, stage: str | None = None) -> TrainConfig:
    data = TrainConfig.from_json(args.config).to_dict() if args.config else {}
    for flag, (name, _, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            data[name] = value
    for name in ("strict", "gradient_checkpointing", "progress"):
        if getattr(args, name, None) is not None:
            data[name] = getattr(args, name)
    if args.file_passes is not None:
        data["file_passes"] = args.file_passes
    if args.l2_scale:
        data["l2_scale"] = {**data.get("l2_scale", TrainConfig().l2_scale), **json.loads(args.l2_scale)}
    if getattr(args, "stage", None):
        data["stage"] = args.stage
    if stage is not None:
        data["stage"] = stage
    data.setdefault("stage", "stage1")
    return TrainConfig.from_dict(data)
