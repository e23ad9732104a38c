"""VQAv2 accuracy, scored as the official VQA evaluation scores it.

The algorithm (Antol et al. 2015, and the evaluation code released with VQA v2):

1. Tabs and newlines become spaces; leading and trailing spaces go.
2. When the ten human answers to a question are *not* all the same string, both every human
   answer and the prediction are normalised:

   - punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the
     original text has it next to a space, or when the text has a comma between two digits
     anywhere (``2,000``); otherwise it becomes a space. Then periods not followed by a digit
     are deleted (``3.5`` keeps its period), at most 32 of them, as in the released code;
   - words (lower-cased, split on whitespace): number words ``none``, ``zero`` .. ``ten``
     become digits, the articles ``a``, ``an``, ``the`` go, and apostrophe-less contractions
     get their apostrophes back (``dont`` -> ``don't``) from the released table.

   When all ten agree, the prediction is compared as it is (only step 1): the released code
   does so, which is why LLaVA and lmms-eval normalise their answers before submitting them
   (``normalize_prediction``; ``mmllm eval vqav2 --model`` writes its predictions that way).
3. The question's accuracy is the mean, over the ten ways to leave one human out, of
   ``min(1, (number of the other nine who gave the prediction) / 3)``: two of ten humans
   agreeing scores 0.6, three score 0.9, four or more score 1.
4. ``accuracy`` is the mean over questions times 100, rounded to two places; per answer type
   (``yes/no``, ``number``, ``other``) the same over that type's questions.
"""

from __future__ import annotations

import re
from collections import defaultdict

# Deleted or turned into a space (see the module docstring); the apostrophe and the period are not here.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
MAX_PERIODS = 32  # the released code passes re.UNICODE (32) where re.sub takes its count
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
NUMBER_WORDS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """The released table: apostrophe-less spellings -> the spelling with apostrophes.

    Built from the apostrophe forms: every way of dropping one or more of a word's apostrophes
    maps back to the full form, for the entries the released table lists. A few of its entries
    are kept as they are although they can never fire (capitalised keys, since words are
    lower-cased first) or map the other way (``somebody'd`` -> ``somebodyd``)."""
    full = ("ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
            "how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
            "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll "
            "that's there'd there're there's they'd they'll they're they've wasn't we've weren't what'll what're "
            "what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't "
            "would've wouldn't y'all you'd you'll you're you've").split()
    table = {w.replace("'", ""): w for w in full}
    # Double contractions: the released table lists the two spellings that drop one apostrophe
    # ("couldnt've", "couldn'tve"), and for y'all the three below.
    for w in ("couldn't've hadn't've he'd've it'd've mightn't've shouldn't've somebody'd've someone'd've "
              "something'd've there'd've they'd've we'd've she'd've who'd've wouldn't've you'd've").split():
        first, second = w.index("'"), w.rindex("'")
        table[w[:first] + w[first + 1:]] = w
        table[w[:second] + w[second + 1:]] = w
    table.update({"Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "let's": "let's",
                  "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "she's": "she's",
                  "somebody'd": "somebodyd", "twas": "'twas", "yall'll": "y'all'll", "y'allll": "y'all'll",
                  "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've"})
    return table


CONTRACTIONS = _contractions()


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    out = text
    delete = DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete or p + " " in text or " " + p in text:  # tested on the original text, as released
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=MAX_PERIODS)


def process_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize(text: str) -> str:
    """The official normalisation of one answer (step 2 of the module docstring)."""
    return process_digits_articles(process_punctuation(text))


def normalize_prediction(text: str) -> str:
    """What LLaVA and lmms-eval do to a model's answer before scoring or submitting it (the
    EvalAI answer processor): lower-case, delete commas and question marks, split off ``'s``,
    then the official normalisation."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize(_strip(text))


def question_accuracy(prediction: str, human_answers: list[str]) -> float:
    """One question's accuracy in [0, 1] (steps 1-3 of the module docstring)."""
    humans = [_strip(a) for a in human_answers]
    pred = _strip(prediction)
    if len(set(humans)) > 1:
        humans = [normalize(a) for a in humans]
        pred = normalize(pred)
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1:]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(scores) / len(scores)


def score(predictions: dict[int, str], annotations: dict[int, dict]) -> tuple[dict, dict[int, float]]:
    """``predictions`` question_id -> answer (a missing one scores 0); ``annotations``
    question_id -> the official annotation record. -> (metrics, per-question accuracy)."""
    per_question: dict[int, float] = {}
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, ann in annotations.items():
        acc = question_accuracy(predictions.get(qid, ""), [a["answer"] for a in ann["answers"]])
        per_question[qid] = acc
        by_type[ann.get("answer_type", "other")].append(acc)
    values = list(per_question.values())
    metrics = {"accuracy": round(100 * sum(values) / len(values), 2) if values else 0.0}
    for kind in sorted(by_type):
        metrics[f"accuracy_{kind}"] = round(100 * sum(by_type[kind]) / len(by_type[kind]), 2)
    return metrics, per_question
