"""Standard evaluation: ``mmllm eval TASK`` and ``mmllm.eval.evaluate(task, ...)``.

Two modes: with ``model=`` the model answers the task's data, its predictions are written in
the task's official result format next to the scores, and scored; with ``predictions=`` an
existing predictions file (from mmllm or any other system) is scored on the same scorer.

Tasks are an exact-match registry of lazy ``"module:Class"`` strings, so importing
``mmllm.eval`` loads no scorer, no model and no toy world (``docs/evaluation.md``).
"""

from __future__ import annotations

import datetime
import importlib
import time
from pathlib import Path
from typing import Any

TASKS = {
    "vqav2": "mmllm.eval.tasks:VQAv2",
    "coco_caption": "mmllm.eval.tasks:COCOCaption",
    "pope": "mmllm.eval.tasks:POPE",
    "text_to_image": "mmllm.eval.media_tasks:TextToImage",
    "text_to_audio": "mmllm.eval.media_tasks:TextToAudio",
    "toy": "mmllm.toy.eval_task:Toy",  # the toy world registers as a client of the library
}


def get_task(name: str):
    """The task registered under exactly ``name``; an unknown name lists the valid ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def predictions_path(out: str | Path, task) -> Path:
    """Where the predictions go: beside the result file, ``result.json`` -> ``result.predictions.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".predictions" + (".jsonl" if task.prediction_lines else ".json"))


def evaluate(task: str, model: Any = None, predictions: str | Path | None = None, out: str | Path | None = None, *,
             batch_size: int = 8, max_new_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, limit: int | None = None, prompt: str | None = None, progress: bool = True,
             **options) -> dict:
    """Run and score, or score, one task; returns the result (and writes it to ``out``).

    ``model``: an ``MMLLM``, or a name or path for ``mmllm.load``. ``predictions``: a file in the
    task's official result format, scored instead of running a model. ``options``: the task's
    data paths and settings (``questions=``, ``annotations=``, ``images=``, ...; see
    ``TASKS`` and ``mmllm eval TASK --help``). ``limit``: only the first ``limit`` items.

    The result: ``{"task", "metrics", "n", "model", "settings", "date", "bad_rows",
    "predictions"}``; ``bad_rows`` counts, by reason, the rows that could not be run or scored
    (missing or undecodable media, empty answers, predictions missing or for unknown ids).
    """
    from .core import BadRows, read_json, read_jsonl, versions, write_json

    spec = get_task(task)
    if (model is None) == (predictions is None):
        raise ValueError("pass exactly one of model= (run and score) or predictions= (score a file)")
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items() if v is not None}
    spec.check(options, with_model=model is not None)
    start = time.time()
    bad = BadRows()
    data = spec.load(options, limit)
    settings: dict = {"limit": limit, **{k: v for k, v in options.items() if isinstance(v, (str, int, float))}}
    model_name = None
    pred_file = None
    if model is not None:
        if isinstance(model, (str, Path)):
            import mmllm

            model_name = str(model)
            model = mmllm.load(model_name)
        else:
            model_name = getattr(getattr(model, "config", None), "name", None) or type(model).__name__
        gen = {"batch_size": batch_size, "seed": seed, "temperature": temperature, "top_p": top_p,
               "max_new_tokens": max_new_tokens or spec.default_max_new_tokens,
               "prompt": prompt or spec.default_prompt}
        settings.update(gen)
        out_path = Path(out) if out else None
        preds = spec.predict(model, data, dict(gen), bad, progress, out_path)
        if out_path is not None:
            pred_file = write_json(predictions_path(out_path, spec), preds, lines=spec.prediction_lines)
    else:
        pred_file = Path(predictions)
        preds = (read_jsonl if spec.prediction_lines else read_json)(pred_file, "predictions")
        if isinstance(preds, dict) and "predictions" in preds:
            preds = preds["predictions"]
    metrics, notes, n = spec.score(preds, data, bad, {**options, "_predictions_dir": str(pred_file.parent)
                                                      if pred_file else None})
    settings.update(notes)
    settings["versions"] = versions(spec.extra_versions)
    settings["seconds"] = round(time.time() - start, 1)
    result = {"task": task, "metrics": metrics, "n": n, "model": model_name, "settings": settings,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "bad_rows": bad.report(), "predictions": str(pred_file) if pred_file else preds}
    if out:
        write_json(out, result)
    return result
