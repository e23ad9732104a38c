"""Score a model on the toy world with its ground-truth oracles and print a table.

    python scripts/evaluate.py                           # the built toy default, held-in and held-out
    python scripts/evaluate.py --model DIR --split test --n 48
    python scripts/evaluate.py --tasks understanding     # skip generation (no diffusion decoding)
    python scripts/evaluate.py --tasks generation decoder  # generation against its ceiling
    python scripts/evaluate.py --tasks conditioning      # what the output projectors ask the decoders for (no rendering)
    python scripts/evaluate.py --tasks brief             # requests that leave attributes out ("Draw a blue square.")
    python scripts/evaluate.py --tasks decoder --decoder-setting guidance_rescale=0.0  # another decoder setting
    python scripts/evaluate.py --out report.json         # also write the full report with examples
    python scripts/evaluate.py --newcomer                # only the README check: every colour x shape, large

Understanding: captions and per-attribute questions on rendered media, read with
analyse_text. Generation: requests such as "Draw a red circle.", the produced media read
back with analyse_image/audio/video. See mmllm.toy.evaluate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mmllm.config import parse_setting
from mmllm.generation import DECODER_SETTINGS
from mmllm.toy.evaluate import TASKS, evaluate, newcomer_check, newcomer_table, table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="model directory or name for mmllm.load (default: toy)")
    parser.add_argument("--split", choices=("train", "test", "both"), default="both",
                        help="train: held-in attribute pairs; test: held-out pairs")
    parser.add_argument("--n", type=int, default=24, help="items per modality and split (understanding)")
    parser.add_argument("--gen-n", type=int, default=None, help="generation requests per modality and split, and dialogues per split (default --n)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["understanding", "generation", "dialogue"],
                        help="decoder: the decoders fed the generation requests' true captions (the ceiling "
                             "of generation); brief: image and audio requests that leave attributes out "
                             "(neither runs by default); conditioning: the output projectors' conditioning for "
                             "the generation requests, read by its nearest caption (no rendering)")
    parser.add_argument("--modalities", nargs="+", choices=("image", "audio", "video"),
                        default=["image", "audio", "video"])
    parser.add_argument("--batch", type=int, default=16, help="requests decoded together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--newcomer", action="store_true",
                        help="only the README's newcomer check: 'What is in this picture?' on every colour x shape")
    parser.add_argument("--decoder-setting", dest="decoder_settings", action="append", default=[],
                        metavar="KEY=VALUE", help="a decoder setting for the generation, brief, decoder and dialogue "
                        "tasks, over the model's own (repeatable), e.g. guidance_rescale=0.7")
    parser.add_argument("--out", default=None, help="write the full report (with example answers) as JSON")
    args = parser.parse_args(argv)
    decoder_settings = {}
    for text in args.decoder_settings:
        try:
            key, value = parse_setting(text)
        except ValueError as e:
            parser.error(str(e))
        if key not in DECODER_SETTINGS:
            parser.error(f"--decoder-setting {key!r} is not a decoder setting; use one of {list(DECODER_SETTINGS)}")
        decoder_settings[key] = value

    import mmllm

    start = time.time()
    model = mmllm.load(args.model, device=args.device)
    if args.newcomer:
        result = newcomer_check(model, batch=args.batch)
        print(newcomer_table(result))
        print(f"\n{result['right']} of {result['total']} named right (*: held-out pair)")
        report = {"newcomer": result, "settings": {"model": args.model}}
    else:
        splits = ("train", "test") if args.split == "both" else (args.split,)
        report = evaluate(model, splits=splits, n=args.n, gen_n=args.gen_n, seed=args.seed, tasks=args.tasks,
                          modalities=args.modalities, batch=args.batch, **decoder_settings,
                          progress=lambda s: print(f"[{time.time() - start:5.0f} s] {s}", file=sys.stderr, flush=True))
        print(table(report))
    report["settings"].update(model=args.model, decoder_settings=decoder_settings,
                              seconds=round(time.time() - start, 1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
