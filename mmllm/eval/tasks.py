"""Understanding tasks read from their official releases: VQAv2, COCO captions, POPE.

Each task reads its data (``load``), runs a model on it and returns predictions in the task's
official result format (``predict``), and scores predictions (``score``). Scoring never needs
the images, so predictions from any system can be scored on the same scorer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import caption, pope, vqa
from .core import BadRows, generate_all, open_image, read_json, read_jsonl

SHORT_ANSWER = "{question}\nAnswer the question using a single word or phrase."  # LLaVA-1.5's prompt


class Task:
    """The interface of a task (see the module docstring)."""

    name = ""
    options: dict[str, str] = {}  # option -> help; the CLI makes --flags of these
    needs_for_model: tuple[str, ...] = ()
    needs_for_predictions: tuple[str, ...] = ()
    prediction_lines = False  # predictions file: JSON lines (True) or one JSON list
    default_prompt = ""
    default_max_new_tokens = 16
    extra_versions: tuple[str, ...] = ()

    def check(self, opts: dict, with_model: bool) -> None:
        needs = self.needs_for_model if with_model else self.needs_for_predictions
        missing = [k for k in needs if not opts.get(k)]
        if missing:
            flags = ", ".join("--" + k.replace("_", "-") for k in missing)
            raise ValueError(f"{self.name} {'with a model' if with_model else 'scoring predictions'} needs {flags}")
        unknown = sorted(k for k, v in opts.items() if v is not None and k not in self.options)
        if unknown:
            raise ValueError(f"{self.name} takes no {unknown}; it takes {sorted(self.options)}")

    def load(self, opts: dict, limit: int | None) -> Any:
        raise NotImplementedError

    def predict(self, model, data, gen: dict, bad: BadRows, progress: bool, out: Path | None) -> list:
        raise NotImplementedError

    def score(self, predictions: list, data, bad: BadRows, opts: dict) -> tuple[dict, dict, int]:
        """-> (metrics, notes, number of items scored)."""
        raise NotImplementedError


def _match(predictions, key: str, field: str, known, bad, first_wins: bool) -> dict:
    """``{id: str(prediction[field])}`` for the predictions whose ``key`` is a ``known`` id. Unknown
    ids, ids with no prediction and (with ``first_wins``) repeated ids are counted in ``bad``;
    without ``first_wins`` a repeated id keeps its last prediction."""
    found = {}
    for p in predictions:
        pid = p.get(key)
        if pid not in known:
            bad.add(f"unknown_{key}", pid)
        elif first_wins and pid in found:
            bad.add(f"duplicate_{key}", pid)
        else:
            found[pid] = str(p.get(field, ""))
    for pid in known:
        if pid not in found:
            bad.add("missing_prediction", pid)
    return found


def _answer(result, row_id, bad: BadRows) -> str:
    text = result.text.strip()
    if not text:
        bad.add("empty_answer", row_id)
    return text


class VQAv2(Task):
    name = "vqav2"
    options = {
        "questions": "official questions JSON (v2_OpenEnded_mscoco_val2014_questions.json)",
        "annotations": "official annotations JSON (v2_mscoco_val2014_annotations.json)",
        "images": "folder of the COCO images",
        "image_pattern": "image file name from image_id (default COCO_val2014_%%012d.jpg)",
    }
    needs_for_model = ("questions", "annotations", "images")
    needs_for_predictions = ("annotations",)
    default_prompt = SHORT_ANSWER

    def load(self, opts, limit):
        anns = {a["question_id"]: a for a in read_json(opts["annotations"], "annotations")["annotations"]}
        if opts.get("questions"):
            questions = read_json(opts["questions"], "questions")["questions"]
        else:  # scoring only: every annotated question
            questions = [{"question_id": q, "image_id": a["image_id"], "question": ""} for q, a in anns.items()]
        questions = questions[:limit] if limit else questions
        unannotated = [q["question_id"] for q in questions if q["question_id"] not in anns]
        if unannotated:
            raise ValueError(f"{len(unannotated)} questions have no annotation (e.g. {unannotated[:3]}); "
                             "pass the annotations file of the same split")
        return {"questions": questions, "annotations": {q["question_id"]: anns[q["question_id"]] for q in questions},
                "images": opts.get("images"), "pattern": opts.get("image_pattern") or "COCO_val2014_%012d.jpg"}

    def predict(self, model, data, gen, bad, progress, out):
        folder = Path(data["images"])
        prompt = gen.pop("prompt")

        def load(q):
            image = open_image(folder / (data["pattern"] % q["image_id"]), bad, q["question_id"])
            return None if image is None else {"prompt": prompt.format(question=q["question"]), "image": image}

        results = generate_all(model, data["questions"], gen, progress, "vqav2", load)
        # Answers go through the EvalAI answer processor, as LLaVA and lmms-eval submit them.
        return [{"question_id": q["question_id"], "answer": vqa.normalize_prediction(_answer(r, q["question_id"], bad))}
                for q, r in zip(data["questions"], results) if r is not None]

    def score(self, predictions, data, bad, opts):
        # A missing prediction scores 0, as an unanswered question does; a repeated id keeps the last.
        answers = _match(predictions, "question_id", "answer", data["annotations"], bad, first_wins=False)
        metrics, _ = vqa.score(answers, data["annotations"])
        return metrics, {}, len(data["annotations"])


class COCOCaption(Task):
    name = "coco_caption"
    options = {
        "annotations": "official captions JSON (captions_val2014.json, or a Karpathy-split file in its layout)",
        "images": "folder of the COCO images (read by each image's file_name)",
        "java_metrics": "on (default) or off: METEOR and SPICE, which need Java",
    }
    needs_for_model = ("annotations", "images")
    needs_for_predictions = ("annotations",)
    default_prompt = "Provide a one-sentence caption for the provided image."  # lmms-eval's coco_cap prompt
    default_max_new_tokens = 64
    extra_versions = ("pycocoevalcap",)

    def load(self, opts, limit):
        data = read_json(opts["annotations"], "annotations")
        refs: dict = {}
        for a in data["annotations"]:
            refs.setdefault(a["image_id"], []).append(a["caption"])
        images = [im for im in data["images"] if im["id"] in refs]
        images = images[:limit] if limit else images
        return {"images": images, "references": {im["id"]: refs[im["id"]] for im in images},
                "folder": opts.get("images")}

    def predict(self, model, data, gen, bad, progress, out):
        folder = Path(data["folder"])
        prompt = gen.pop("prompt")

        def load(im):
            image = open_image(folder / im["file_name"], bad, im["id"])
            return None if image is None else {"prompt": prompt, "image": image}

        results = generate_all(model, data["images"], gen, progress, "coco_caption", load)
        return [{"image_id": im["id"], "caption": _answer(r, im["id"], bad)}
                for im, r in zip(data["images"], results) if r is not None]

    def score(self, predictions, data, bad, opts):
        # A missing prediction is not scored, as COCOEvalCap scores the results given.
        captions = _match(predictions, "image_id", "caption", data["references"], bad, first_wins=True)
        if not captions:
            raise ValueError("no prediction matches an annotated image; nothing to score")
        java = str(opts.get("java_metrics", "on")).lower()
        if java not in ("on", "off", "true", "false"):
            raise ValueError(f"java_metrics {java!r}: use on or off")
        metrics, notes = caption.score(captions, data["references"], java_metrics=java in ("on", "true"))
        return metrics, notes, len(captions)


class POPE(Task):
    name = "pope"
    options = {
        "questions": "POPE question file (JSON lines: question_id, image, text, label)",
        "images": "folder of the images the question file names (COCO val2014 for POPE-COCO)",
    }
    needs_for_model = ("questions", "images")
    needs_for_predictions = ("questions",)
    prediction_lines = True
    default_prompt = SHORT_ANSWER

    def load(self, opts, limit):
        rows = read_jsonl(opts["questions"], "questions")
        rows = rows[:limit] if limit else rows
        return {"questions": rows, "folder": opts.get("images")}

    def predict(self, model, data, gen, bad, progress, out):
        folder = Path(data["folder"])
        prompt = gen.pop("prompt")

        def load(q):
            image = open_image(folder / q["image"], bad, q["question_id"])
            return None if image is None else {"prompt": prompt.format(question=q["text"]), "image": image}

        results = generate_all(model, data["questions"], gen, progress, "pope", load)
        # LLaVA's answers-file layout, which its eval_pope.py reads.
        return [{"question_id": q["question_id"], "prompt": q["text"], "text": _answer(r, q["question_id"], bad)}
                for q, r in zip(data["questions"], results) if r is not None]

    def score(self, predictions, data, bad, opts):
        by_id = {}
        for p in predictions:
            by_id[p.get("question_id")] = str(p.get("text", p.get("answer", "")))
        answers, labels = [], []
        for q in data["questions"]:
            if q["question_id"] not in by_id:
                bad.add("missing_prediction", q["question_id"])  # read as POPE reads an empty answer: yes
            answers.append(by_id.get(q["question_id"], ""))
            labels.append(q["label"])
        known = {q["question_id"] for q in data["questions"]}
        for qid in by_id:
            if qid not in known:
                bad.add("unknown_question_id", qid)
        return pope.score(answers, labels), {}, len(answers)
