"""Compare settings of the align step (decoding-side alignment) on one cache of a model's states.

    python scripts/align_sweep.py                                  # the toy build's stage-2 model
    python scripts/align_sweep.py --variants 400:2000 400:4000 800:4000:64:2e-3 --val 100
    python scripts/align_sweep.py --model runs/x/model --conversations data.json --cache-file /tmp/c.pt

The LLM runs once over the requests and its states at every signal sequence are cached (the
costly part: about 0.1 s a request on 2 CPU cores in fp32, about half that with ``--precision
bf16`` on a CPU with AVX512-BF16; ``--cache-file`` keeps them for the next call). Each variant
``TRAIN:STEPS[:BATCH[:LR[:WD[:DROPOUT[:WEIGHTS[:STD]]]]]]`` then fits fresh output projectors, as the
build's align step does (``align_output_projectors(reinit=True)``), on the first TRAIN cached
sequences per modality, and scores them on the same last ``--val`` ones (held-back L2).
Prints a Markdown table. docs/research/README.md has a run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mmllm.training import SignalCache, align_output_projectors, cache_signal_states, load_model
from mmllm.training.config import PRECISIONS


FIELDS = "TRAIN:STEPS[:BATCH[:LR[:WD[:DROPOUT[:WEIGHTS[:STD]]]]]]"


def parse_variant(text: str) -> dict:
    """``TRAIN:STEPS[:BATCH[:LR[:WD[:DROPOUT[:WEIGHTS[:STD]]]]]]``; a field left out or empty
    takes its default. BATCH, LR, WD (AdamW's weight decay), WEIGHTS (each modality's share of
    the steps, ``image=2,video=1.5``) and STD (1: fit on standardised inputs, 0: on the raw
    states) default to the toy build's (``DefaultSettings``), DROPOUT (inside the output
    projectors that have one) to the model config's."""
    from mmllm.toy.mmllm_build import DefaultSettings

    parts = text.split(":")
    if not 2 <= len(parts) <= 8 or not parts[0] or not parts[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {FIELDS}, e.g. 400:4000, 400:4000:64:2e-3:0.01:0.1 "
                                         f"or 400:4000:::::image=2")
    parts += [""] * (8 - len(parts))
    build = DefaultSettings()
    try:
        weights = dict(build.align_weights)
        for item in filter(None, parts[6].split(",")):
            modality, _, share = item.partition("=")
            weights[modality.strip()] = float(share)
        return {"train": int(parts[0]), "steps": int(parts[1]),
                "batch": int(parts[2]) if parts[2] else build.align_batch,
                "lr": float(parts[3]) if parts[3] else build.align_lr,
                "wd": float(parts[4]) if parts[4] else build.align_weight_decay,
                "dropout": float(parts[5]) if parts[5] else None, "weights": weights,
                "standardize": bool(int(parts[7])) if parts[7] else build.align_standardize}
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err} (expected {FIELDS})") from err


@contextlib.contextmanager
def projector_dropout(model, dropout: float | None):
    """Within the block, the ``dropout`` option in ``model.config`` (read when the output
    projectors are rebuilt) is ``dropout`` for every output projector type that has one;
    ``None`` leaves the config as it is. Yields the modalities it was set for."""
    from projectors import OUTPUT_PROJECTORS

    old = {m: dict(o.projector.options) for m, o in model.config.outputs.items()}
    has = [m for m, o in model.config.outputs.items()
           if "dropout" in inspect.signature(OUTPUT_PROJECTORS.get(o.projector.type)).parameters]
    if dropout is not None and not has:
        raise SystemExit("no output projector of this model has a dropout; leave DROPOUT out of the variants")
    try:
        for m in has if dropout is not None else []:
            model.config.outputs[m].projector.options["dropout"] = dropout
        yield has if dropout is not None else []
    finally:
        for m, o in model.config.outputs.items():
            o.projector.options = old[m]


def load_cache(model, args) -> SignalCache:
    """The model's signal states over the requests; with ``--cache-file``, read from it when it
    holds the same model and data, written to it when it does not exist yet."""
    path = Path(args.cache_file) if args.cache_file else None
    source = {"model": args.model, "generation": args.generation, "conversations": args.conversations,
              "precision": args.precision}
    if path is not None and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.pop("source", None) != source:
            raise SystemExit(f"{path} caches another model, data file or precision than {source}; "
                             f"delete it or pass another --cache-file")
        return SignalCache(**saved)
    start = time.time()
    cache = cache_signal_states(model, generation=args.generation, conversations=args.conversations,
                                data_root=args.data_root, progress=not args.no_progress, precision=args.precision)
    print(f"cached {sum(cache.counts().values())} sequences in {time.time() - start:.0f} s "
          f"(precision {args.precision})")
    if path is not None:
        torch.save({"source": source, **asdict(cache)}, path)
    return cache


def main(argv=None) -> list[dict]:
    from mmllm.toy.components import default_root

    root = default_root()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(root / "runs/stage2/model"), help="model dir or preset (default: the toy build's stage-2 model)")
    p.add_argument("--conversations", default=None, help="conversation file with <gen:MOD> turns (default: the toy build's stage2_text.json)")
    p.add_argument("--generation", default=None, help="generation-pair file, instead of or beside --conversations")
    p.add_argument("--data-root", default=None, help="where relative media paths resolve (default: the data file's folder)")
    p.add_argument("--variants", nargs="+", type=parse_variant, default=[parse_variant(v) for v in ("400:2000", "400:4000", "800:4000")],
                   metavar=FIELDS)
    p.add_argument("--val", type=int, default=100, help="held-back sequences per modality, the same for every variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="the LLM pass's autocast, as the build's --precision (auto: bf16 where native)")
    p.add_argument("--cache-file", default=None,
                   help="save the cache here, or load it if the file exists (for the same --model and data files)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.conversations is None and args.generation is None:
        args.conversations = str(root / "data/stage2_text.json")
    args.data_root = args.data_root or str(Path(args.conversations or args.generation).parent)

    model = load_model(args.model)
    cache = load_cache(model, args)
    print(f"cached sequences per modality: {cache.counts()}")
    start = copy.deepcopy(model.output_projectors)
    rows = []
    names = " / ".join(sorted(cache.counts()))
    print(f"| train | steps | batch | lr | weight decay | dropout | weights | standardised | seconds "
          f"| training L2 {names} | held-back L2 {names} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in args.variants:
        model.output_projectors = copy.deepcopy(start)
        with projector_dropout(model, v["dropout"]):
            result = align_output_projectors(model, steps=v["steps"], batch_size=v["batch"], lr=v["lr"],
                                             weight_decay=v["wd"], weights=v["weights"],
                                             standardize=v["standardize"], seed=args.seed,
                                             progress=not args.no_progress, reinit=True, val_examples=args.val,
                                             cache=cache.take(v["train"], args.val))
        rows.append({**v, "seconds": result.seconds, "train_loss": result.train_loss, "val_loss": result.val_loss})
        fit, l2 = (" / ".join(f"{loss[m]:.3f}" for m in sorted(loss)) for loss in (result.train_loss, result.val_loss))
        dropout = "config" if v["dropout"] is None else f"{v['dropout']:g}"
        weights = ", ".join(f"{m} {w:g}" for m, w in sorted(v["weights"].items())) or "equal"
        print(f"| {v['train']} | {v['steps']} | {v['batch']} | {v['lr']:g} | {v['wd']:g} | {dropout} | {weights} | "
              f"{'yes' if v['standardize'] else 'no'} | {result.seconds:.0f} | {fit} | {l2} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
