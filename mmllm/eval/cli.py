"""``mmllm eval TASK``: run a model on a task and score it, or score a predictions file.

    mmllm eval vqav2 --model llava-1.5-7b --questions Q.json --annotations A.json --images val2014/ --out r.json
    mmllm eval vqav2 --predictions r.predictions.json --annotations A.json --out r2.json
    mmllm eval coco_caption --model M --annotations captions_val2014.json --images val2014/ --out r.json
    mmllm eval pope --model M --questions coco_pope_random.json --images val2014/ --out r.json
    mmllm eval text_to_image --model M --prompts prompts.jsonl --clip CLIP_DIR --inception W.pth --reference-images DIR --out r.json
    mmllm eval text_to_audio --model M --prompts prompts.txt --clap CLAP_DIR --reference-audio DIR --out r.json
    mmllm eval toy --model toy --out r.json

The result file holds ``task``, ``metrics``, ``n``, ``model``, ``settings`` (seeds, decoding,
package versions), ``date`` and ``bad_rows``; with --model the predictions are written beside
it (``r.json`` -> ``r.predictions.json``). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys

# Every task's options (data paths and settings); each task says which it needs.
OPTIONS = {
    "questions": "questions file (vqav2: official questions JSON; pope: question JSON lines)",
    "annotations": "annotations file (vqav2: official annotations JSON; coco_caption: official captions JSON)",
    "images": "folder of the task's images",
    "image_pattern": "vqav2: image file name from image_id (default COCO_val2014_%%012d.jpg)",
    "prompts": "text_to_image / text_to_audio: prompts, JSON lines with a 'prompt' field or one per line",
    "clip": "text_to_image: a local Hugging Face CLIP directory (CLIPScore)",
    "inception": "text_to_image: local weights of torchmetrics' FID Inception (pt_inception-2015-12-05)",
    "reference_images": "text_to_image: folder of real images for FID",
    "clap": "text_to_audio: a local Hugging Face CLAP directory (CLAP score, FAD embeddings)",
    "reference_audio": "text_to_audio: folder of real audio clips for FAD",
    "java_metrics": "coco_caption: on (default) or off, METEOR and SPICE (Java programs, slow to start)",
    "splits": "toy: train, test or both (default both)",
    "n": "toy: items per modality and split (default 24)",
}
INT_OPTIONS = {"n"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import TASKS

    p.add_argument("task", metavar="TASK", help=f"one of: {', '.join(TASKS)}")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--model", help="run this model (preset name or directory) on the task, then score it")
    mode.add_argument("--predictions", help="score this predictions file (the task's official result format)")
    p.add_argument("--out", help="result JSON (with --model, the predictions are written beside it)")
    data = p.add_argument_group("data (each task says which it needs)")
    for name, text in OPTIONS.items():
        data.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                          type=int if name in INT_OPTIONS else str, help=text)
    run = p.add_argument_group("running the model")
    run.add_argument("--limit", type=int, default=None, help="only the first N items")
    run.add_argument("--batch-size", type=int, default=8, help="requests decoded together")
    run.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the task's own)")
    run.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    run.add_argument("--seed", type=int, default=0, help="seed; batch k runs with seed + k")
    run.add_argument("--prompt", default=None, help="prompt template, {question} for the question "
                     "(default: the task's own, as LLaVA-1.5 and lmms-eval ask)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from . import evaluate

    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    result = evaluate(args.task, model=args.model, predictions=args.predictions, out=args.out,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed, limit=args.limit, prompt=args.prompt,
                      progress=not args.no_progress, **options)
    print(json.dumps({"task": result["task"], "n": result["n"], "metrics": result["metrics"],
                      "bad_rows": {k: v["count"] for k, v in result["bad_rows"].items()}}, indent=1))
    if args.out:
        print(f"result written to {args.out}", file=sys.stderr)
    return 0
