"""Build mmllm's embedded default model: toy components, world data, stage 1, stage 2.

    python scripts/build_default.py                    # everything missing, under ~/.cache/mmllm/toy
    python scripts/build_default.py --quick            # under 30 minutes on 2 CPU cores, weaker model
    python scripts/build_default.py --device cuda      # the same on a GPU (untested here)
    python scripts/build_default.py --fast --root DIR  # 2 steps of everything, tiny data (tests)
    python scripts/build_default.py --smoke --root DIR # every loss falls, in about a minute (checks an install)
    python scripts/build_default.py --force            # retrain both stages (components, data reused)
    python scripts/build_default.py --threads 1        # on a CPU shared with other jobs
    python scripts/build_default.py --root DIR --set inputs.video.projector.type=mlp2x_gelu  # another recipe

Every step is cached (a second run rebuilds nothing) and an interrupted stage resumes from
its last checkpoint. The result, <root>/model, is what mmllm.load() opens by default.
See mmllm.toy.mmllm_build and docs/research/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from mmllm.cliargs import add_dataclass_args, dataclass_overrides
from mmllm.config import parse_setting
from mmllm.toy.components import BuildSettings, default_root
from mmllm.toy.mmllm_build import DefaultSettings, build_default
from mmllm.training.config import MIXES

# DefaultSettings fields with a flag of their own (--stage1-steps for stage1_steps).
FLAG_FIELDS = ("items", "dialogues", "stage1_steps", "stage1_batch", "stage1_lr", "stage1_mix", "stage1_passes",
               "stage2_steps", "stage2_batch", "stage2_lr", "stage2_projector_lr", "stage2_group_by_length",
               "stage2_mix", "align_steps", "align_lr", "align_weight_decay", "align_weights", "align_examples",
               "align_projectors", "precision", "seed")


def _setting(text: str) -> tuple:
    try:
        return parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help=f"output directory (default {default_root()})")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    parser.add_argument("--fast", action="store_true", help="2 steps of everything, tiny data (tests)")
    parser.add_argument("--quick", action="store_true",
                        help="a sixth of stage 2 after an image-first stage 1: under 30 minutes from nothing on "
                             "2 CPU cores, a weaker model (docs/research/README.md; "
                             "DefaultSettings.quick)")
    parser.add_argument("--smoke", action="store_true",
                        help="enough steps of everything for each loss to fall, in about a minute")
    parser.add_argument("--force", action="store_true", help="retrain both stages")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--component-split", choices=("train", "all"), default=None,
                        help="world split every frozen component trains on (default: train, the audio decoder "
                             "all; the stages always train on the train split), see docs/toy.md")
    parser.add_argument("--no-align-standardize", action="store_true",
                        help="fit the align step on unscaled states (DefaultSettings.align_standardize)")
    parser.add_argument("--set", dest="overrides", action="append", type=_setting, default=[], metavar="KEY=VALUE",
                        help="model-config override, dotted, value as JSON (repeatable), e.g. "
                             "'inputs.video.projector.options={\"num_tokens\":4,\"per_token\":true}'; "
                             "the stages fingerprint the whole config but the decoders' generation settings, so "
                             "any other change retrains them")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads; 1 is up to 10x faster on a CPU shared with other jobs "
                             "(OpenMP threads wait for each other), see docs/research/README.md")
    add_dataclass_args(parser.add_argument_group("recipe settings (DefaultSettings; default: the chosen recipe's)"),
                       DefaultSettings, FLAG_FIELDS, defaults=DefaultSettings(),
                       choices={"stage1_mix": MIXES, "stage2_mix": MIXES, "precision": ("fp32", "bf16", "auto")})
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    profile = [name for name in ("fast", "quick", "smoke") if getattr(args, name)]
    if len(profile) > 1:
        parser.error(f"--{' and --'.join(profile)} are alternatives; pick one")
    profile = profile[0] if profile else None
    settings = DefaultSettings.from_recipe(profile or "default")
    settings = dataclasses.replace(settings, **dataclass_overrides(args, DefaultSettings, FLAG_FIELDS))
    if args.no_align_standardize:
        settings.align_standardize = False
    components = BuildSettings.from_recipe(profile or "default")
    if args.component_split:
        components.split = args.component_split
    start = time.time()
    path = build_default(args.root, device=args.device, fast=args.fast, settings=settings,
                         progress=not args.no_progress, force=args.force, component_settings=components,
                         config_overrides=dict(args.overrides) or None)
    print(f"built {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
