"""Build the toy world's frozen encoders and decoders (mmllm's embedded default model).

    python scripts/build_toy.py                       # everything missing, under ~/.cache/mmllm/toy
    python scripts/build_toy.py --device cuda         # the same on a GPU
    python scripts/build_toy.py --fast --root /tmp/t  # a few steps each (tests, smoke runs)
    python scripts/build_toy.py --evaluate            # then score them with the oracles
    python scripts/build_toy.py --root /tmp/v --only clip --steps clip=1000 --clip-shape-groups 0
                                                      # a CLIP variant (probe it: scripts/probe_clip.py)
    python scripts/build_toy.py --root /tmp/a --split all   # components that see the held-out pairs too
    python scripts/build_toy.py --root /tmp/m --only video_decoder --video-unet motion
                                                      # an AnimateDiff video decoder (``animatediff``)
    python scripts/build_toy.py --root /tmp/e --only video_decoder --text-tuning video_decoder=embeddings
                                                      # a video decoder that learns its text tower's word embeddings

Components already complete are skipped; see ``mmllm.toy.components`` for the layout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from mmllm.toy.components import (COMPONENTS, DECODER_COMPONENTS, TEXT_TUNING, VIDEO_UNETS, BuildSettings,
                                  build_components, default_root)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help=f"output directory (default {default_root()})")
    parser.add_argument("--device", default="cpu", help="torch device to train on: cpu, cuda, cuda:1 ...")
    parser.add_argument("--fast", action="store_true", help="a few steps per component (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=COMPONENTS, help="build only these (and their dependencies)")
    parser.add_argument("--force", action="store_true", help="rebuild even complete components")
    parser.add_argument("--steps", nargs="+", default=[], metavar="NAME=N",
                        help="override step counts, e.g. image_decoder=800 clip=400")
    parser.add_argument("--clip-shape-groups", type=int, default=None, metavar="N",
                        help="groups of shape hard negatives per CLIP batch (default: BuildSettings')")
    parser.add_argument("--split", choices=("train", "all"), default=None,
                        help="world split the components train on (default: BuildSettings': train, "
                             "the audio decoder all)")
    parser.add_argument("--video-unet", choices=VIDEO_UNETS, default=None,
                        help="video decoder UNet: unet3d (TextToVideoSDPipeline, the default) or motion "
                             "(the image UNet with AnimateDiff motion modules, AnimateDiffPipeline)")
    parser.add_argument("--text-tuning", nargs="+", default=[], metavar="DECODER=WHAT",
                        help=f"train part of a decoder's text encoder with its UNet, WHAT one of {list(TEXT_TUNING)} "
                             "(default: BuildSettings': the video decoder all, the others frozen)")
    parser.add_argument("--text-lr-scale", type=float, default=None, metavar="F",
                        help="learning rate of a tuned text encoder as a fraction of its decoder's "
                             "(default: BuildSettings')")
    parser.add_argument("--evaluate", action="store_true", help="score with the oracles; writes quality.json")
    parser.add_argument("--eval-n", type=int, default=48, help="prompts per split and modality when evaluating")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)

    steps = {}
    for item in args.steps:
        name, _, n = item.partition("=")
        if not n.isdigit():
            parser.error(f"--steps takes NAME=N pairs, got {item!r}")
        steps[name] = int(n)
    tuning = {}
    for item in args.text_tuning:
        name, _, what = item.partition("=")
        if name not in DECODER_COMPONENTS or what not in TEXT_TUNING:
            parser.error(f"--text-tuning takes DECODER=WHAT with DECODER one of {list(DECODER_COMPONENTS)} "
                         f"and WHAT one of {list(TEXT_TUNING)}, got {item!r}")
        tuning[name] = what
    start = time.time()
    settings = BuildSettings.fast() if args.fast else BuildSettings()
    if args.clip_shape_groups is not None:
        settings = replace(settings, clip_shape_groups=args.clip_shape_groups)
    if args.split is not None:
        settings = replace(settings, split=args.split)
    if args.video_unet is not None:
        settings = replace(settings, video_unet=args.video_unet)
    if tuning:
        settings = replace(settings, text_tuning={**settings.text_tuning, **tuning})
    if args.text_lr_scale is not None:
        settings = replace(settings, text_lr_scale=args.text_lr_scale)
    paths = build_components(args.root, device=args.device, seed=args.seed, steps=steps, settings=settings,
                             only=args.only, force=args.force, progress=not args.no_progress)
    print(f"toy components ready in {time.time() - start:.0f} s under {paths['clip'].parent}")
    if args.evaluate:
        from mmllm.toy.quality import evaluate_components

        report = evaluate_components(paths["clip"].parent, n=args.eval_n, device=args.device,
                                     progress=not args.no_progress)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
