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

import contextlib
import re
import shutil
import sys
from pathlib import Path

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


def _meteor(gts: dict, res: dict, timeout: float) -> float:
    """pycocoevalcap's METEOR, given ``timeout`` seconds (its Java process loads paraphrase
    tables first, and waits forever when it cannot start)."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    box: dict = {}

    def work():
        try:
            box["meteor"] = Meteor()
            box["score"] = float(box["meteor"].compute_score(gts, res)[0])
        except Exception as err:  # re-raised below
            box["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    if "score" in box:
        return box["score"]
    process = getattr(box.get("meteor"), "meteor_p", None)
    if process is not None:
        process.kill()
    raise box.get("error") or TimeoutError(f"METEOR gave no score within {timeout:.0f} s")


def score(predictions: dict, references: dict, use_java: bool | None = None, java_metrics: bool = True,
          java_timeout: float = 600.0) -> tuple[dict, dict]:
    """``predictions`` image_id -> caption; ``references`` image_id -> [captions]; scored over the
    predicted images, as pycocoevalcap's ``COCOEvalCap`` does. ``java_metrics=False`` skips
    METEOR and SPICE (slow to start). -> (metrics, notes)."""
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
    with contextlib.redirect_stdout(sys.stderr):  # BleuScorer prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    metrics.update({f"Bleu_{k + 1}": float(v) for k, v in enumerate(bleu)})
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if not use_java:
        notes["skipped"] = {"METEOR": "needs Java (not on PATH)", "SPICE": "needs Java (not on PATH)"}
        return metrics, notes
    skipped = {}
    if not java_metrics:
        notes["skipped"] = {"METEOR": "turned off (java_metrics=False)", "SPICE": "turned off (java_metrics=False)"}
        return metrics, notes
    try:
        metrics["METEOR"] = _meteor(gts, res, java_timeout)
    except Exception as err:  # a Java program: report why, keep the other metrics
        skipped["METEOR"] = " ".join(str(err).split())[:200] or type(err).__name__
    try:
        from pycocoevalcap.spice import get_stanford_models as corenlp
        from pycocoevalcap.spice.spice import Spice

        jar = Path(corenlp.SPICEDIR) / corenlp.SPICELIB / f"{corenlp.JAR}.jar"
        if not jar.exists():  # Spice() would try to download it, and hang without a network
            raise FileNotFoundError("needs Stanford CoreNLP 3.6.0 in pycocoevalcap/spice/lib (pycocoevalcap "
                                    "downloads it on first use: run `python -c 'from pycocoevalcap.spice.spice "
                                    "import Spice; Spice()'` once with a network)")
        metrics["SPICE"] = float(Spice().compute_score(gts, res)[0])
    except Exception as err:  # fetches Stanford CoreNLP models on first use
        skipped["SPICE"] = " ".join(str(err).split())[:200] or type(err).__name__
    if skipped:
        notes["skipped"] = skipped
    return metrics, notes
