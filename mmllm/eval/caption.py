"""COCO captioning metrics through pycocoevalcap, under its own names.

``Bleu_1`` .. ``Bleu_4``, ``ROUGE_L`` and ``CIDEr`` always; ``METEOR`` and ``SPICE`` when Java is
on the PATH (both are Java programs; SPICE also fetches Stanford CoreNLP models on first use,
and is reported as skipped with the reason when that fails). Captions are tokenised as the
official evaluation does, with the Stanford PTB tokenizer (``-preserveLines -lowerCase``, then
punctuation tokens dropped), which also needs Java. Without Java a Python tokenizer stands in:
it gives the same tokens as PTB on plain English captions (lower-cased words, punctuation split
off and dropped, ``n't`` and ``'s`` split off as PTB splits them), but not on every unusual
string, and the result's ``settings.tokenizer`` says which one ran.
"""

from __future__ import annotations

import re
import shutil

# PTB tokens the official evaluation drops after tokenising.
PUNCTUATION_TOKENS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                      "...", ";"}
_CLITICS = re.compile(r"(?i)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_ABBREVIATIONS = "mr|mrs|ms|dr|st|jr|sr|vs|etc|inc|ltd|mt|ft|ave"
_TOKEN = re.compile(r"n't|'s|'re|'ve|'ll|'d|'m|\.\.\.|--"
                    r"|(?:[a-z]\.){2,}"  # acronyms keep their periods: u.s.
                    rf"|(?:{_ABBREVIATIONS})\.(?= )"  # and so do common abbreviations: mr.
                    r"|\d+(?::\d+)+"  # times: 10:30
                    r"|[a-z0-9]+(?:[.'/&-][a-z0-9]+)*|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_ptb_tokenize(text: str) -> str:
    """A Python stand-in for ``PTBTokenizer -preserveLines -lowerCase`` plus the punctuation
    filter: lower-case words joined by single spaces."""
    text = text.replace("\n", " ").lower()
    text = _CLITICS.sub(r" \1", text)
    tokens = []
    for tok in _TOKEN.findall(text):
        if tok.endswith("n't") and tok != "n't":  # "don't" was split above; keep the pieces
            tokens.extend([tok[:-3], "n't"])
        elif tok in _BRACKETS:
            tokens.append(_BRACKETS[tok])  # lower-cased, PTB's -LRB- etc. escape the filter
        elif tok == '"':
            continue  # PTB turns quotes into `` and '', which the filter drops
        elif tok not in PUNCTUATION_TOKENS:
            tokens.append(tok)
    return " ".join(tokens)


def tokenize(captions: dict, use_java: bool | None = None) -> tuple[dict, str]:
    """``{image_id: [{"caption": str}, ...]}`` -> (``{image_id: [tokenised str, ...]}``, tokenizer name)."""
    use_java = java_available() if use_java is None else use_java
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(captions), "ptb"
    return {k: [simple_ptb_tokenize(c["caption"]) for c in v] for k, v in captions.items()}, "python-ptb-fallback"


def score(predictions: dict, references: dict, use_java: bool | None = None) -> tuple[dict, dict]:
    """``predictions`` image_id -> caption; ``references`` image_id -> [captions]; scored over the
    predicted images, as pycocoevalcap's ``COCOEvalCap`` does. -> (metrics, notes)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError("coco_caption needs pycocoevalcap: pip install 'mmllm[eval]'") from err
    use_java = java_available() if use_java is None else use_java
    ids = sorted(predictions)
    gts, tokenizer = tokenize({i: [{"caption": c} for c in references[i]] for i in ids}, use_java)
    res, _ = tokenize({i: [{"caption": predictions[i]}] for i in ids}, use_java)
    metrics: dict = {}
    notes: dict = {"tokenizer": tokenizer}
    bleu, _ = Bleu(4).compute_score(gts, res)
    metrics.update({f"Bleu_{k + 1}": float(v) for k, v in enumerate(bleu)})
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not use_java:
        notes["skipped"] = {"METEOR": "needs Java (not on PATH)", "SPICE": "needs Java (not on PATH)"}
        return metrics, notes
    skipped = {}
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        metrics["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    except Exception as err:  # a Java program: report why, keep the other metrics
        skipped["METEOR"] = " ".join(str(err).split())[:200] or type(err).__name__
    try:
        from pycocoevalcap.spice.spice import Spice

        metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
    except Exception as err:  # fetches Stanford CoreNLP models on first use
        skipped["SPICE"] = " ".join(str(err).split())[:200] or type(err).__name__
    if skipped:
        notes["skipped"] = skipped
    return metrics, notes
