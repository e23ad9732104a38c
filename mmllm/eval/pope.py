"""POPE (object hallucination): yes/no answers scored as POPE's ``evaluate.py`` (and LLaVA's
``eval_pope.py``) score them.

Parsing: only the text before the first period counts; commas are deleted; the answer is
``no`` when its space-separated words include ``No``, ``no`` or ``not``, and ``yes`` otherwise.
Metrics over the questions, with ``yes`` the positive class: ``accuracy``, ``precision``,
``recall``, ``F1`` and ``yes_ratio`` (the share answered ``yes``), as fractions in [0, 1].
"""

from __future__ import annotations


def parse_answer(text: str) -> str:
    """-> ``"yes"`` or ``"no"``, as POPE reads a free-form answer."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score(answers: list[str], labels: list[str]) -> dict:
    """``answers`` free-form model answers and ``labels`` ``"yes"``/``"no"``, in the same order."""
    preds = [parse_answer(a) == "yes" for a in answers]
    truth = [str(lab).strip().lower() == "yes" for lab in labels]
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    tn = sum(not p and not t for p, t in zip(preds, truth))
    fn = sum(not p and t for p, t in zip(preds, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(preds)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "F1": f1,
            "yes_ratio": sum(preds) / n if n else 0.0, "TP": tp, "FP": fp, "TN": tn, "FN": fn}
