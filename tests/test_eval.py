"""``mmllm eval``: the scorers agree with the official ones (VQA accuracy derived by hand,
BLEU and CIDEr against pycocoevalcap itself), and the tiny model runs the tasks end to end on
fixture files in the official layouts, with ``--predictions`` reproducing the metrics."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mmllm.eval import evaluate, get_task, vqa
from mmllm.eval import pope as pope_scorer

# ---------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize("text, expected", [
    ("2,000 dogs.", "2000 dogs"),          # comma between digits: every punctuation mark deleted
    ("black-and-white", "black and white"),  # a hyphen with no space beside it becomes a space
    ("left - right", "left right"),        # next to a space it is deleted
    ("Yes.", "yes"),                       # periods not before a digit go, then lower-case
    ("3.5", "3.5"),                        # a period before a digit stays
    ("The Two cats!", "2 cats"),           # articles go, number words become digits
    ("none", "0"),
    ("dont know", "don't know"),           # contractions get their apostrophes back
    ("its (red)", "its red"),
    ("hello;world", "hello world"),
    ("twas", "'twas"),
    ("Im", "im"),                          # the released table's capitalised keys never fire
])
def test_vqa_normalisation_rules(text, expected):
    assert vqa.normalize(text) == expected


def test_vqa_normalize_prediction_is_the_evalai_processor():
    assert vqa.normalize_prediction("Yes, it's TWO.") == "yes it 's 2"
    assert vqa.normalize_prediction("What?") == "what"


@pytest.mark.parametrize("agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_accuracy_counts_leave_one_out(agree, expected):
    # k humans agree: the k subsets without one of them see k-1 matches, the others k.
    humans = ["red"] * agree + ["blue", "green", "pink", "gray", "tan", "teal", "navy", "gold", "lime", "plum"][:10 - agree]
    assert vqa.question_accuracy("Red.", humans) == pytest.approx(expected)


def test_vqa_unanimous_answers_compare_the_prediction_unnormalised():
    assert vqa.question_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa.question_accuracy("Yes", ["yes"] * 10) == 0.0  # the released code does not normalise here
    assert vqa.question_accuracy(vqa.normalize_prediction("Yes"), ["yes"] * 10) == 1.0


def _vqa_fixture(root):
    """Three COCO-named images (the third missing), four questions, official layouts."""
    images = root / "val2014"
    images.mkdir()
    for image_id, colour in ((1, (255, 0, 0)), (2, (0, 0, 255))):
        Image.new("RGB", (32, 32), colour).save(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [{"image_id": 1, "question": "What colour is it?", "question_id": 10},
                 {"image_id": 1, "question": "Is it red?", "question_id": 11},
                 {"image_id": 2, "question": "How many shapes?", "question_id": 20},
                 {"image_id": 3, "question": "What is this?", "question_id": 30}]

    def ann(qid, image_id, kind, answers):
        return {"question_id": qid, "image_id": image_id, "answer_type": kind, "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}

    anns = [ann(10, 1, "other", ["red"] * 2 + ["pink"] * 8), ann(11, 1, "yes/no", ["yes"] * 10),
            ann(20, 2, "number", ["2"] * 3 + ["two"] * 1 + ["3"] * 6), ann(30, 3, "other", ["cat"] * 10)]
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": anns}))
    return root


def test_vqa_scores_by_answer_type_by_hand(tmp_path):
    root = _vqa_fixture(tmp_path)
    preds = [{"question_id": 10, "answer": "Red"}, {"question_id": 11, "answer": "yes"},
             {"question_id": 20, "answer": "two"}]  # 30 unanswered: scores 0, and is reported
    (root / "preds.json").write_text(json.dumps(preds))
    result = evaluate("vqav2", predictions=root / "preds.json", annotations=root / "annotations.json",
                      questions=root / "questions.json")
    # 10: 2 of 10 -> 0.6; 11: 1.0; 20: "two" == "2" after normalising, 4 of 10 -> 1.0; 30: 0.
    assert result["metrics"] == {"accuracy": 65.0, "accuracy_number": 100.0, "accuracy_other": 30.0,
                                 "accuracy_yes/no": 100.0}
    assert result["n"] == 4
    assert result["bad_rows"]["missing_prediction"] == {"count": 1, "examples": [30]}


# ---------------------------------------------------------------------------- captions


CAPTIONS = {1: "A man riding a wave on top of a surfboard.", 2: "two dogs don't play in the park's grass",
            3: "A red bus"}
REFERENCES = {1: ["A surfer rides a large wave.", "a man on a surfboard riding a wave", "Man surfing."],
              2: ["Two dogs playing in the grass.", "dogs in a park", "Two brown dogs run on grass."],
              3: ["A red double-decker bus on a street.", "a bus parked by the road", "Red bus."]}


@pytest.mark.parametrize("use_java", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer needs Java"))])
def test_caption_metrics_equal_pycocoevalcap(use_java):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    from mmllm.eval import caption

    metrics, notes = caption.score(CAPTIONS, REFERENCES, use_java=use_java, java_metrics=False)
    gts, _ = caption.tokenize({i: [{"caption": c} for c in REFERENCES[i]] for i in CAPTIONS}, use_java)
    res, _ = caption.tokenize({i: [{"caption": c}] for i, c in CAPTIONS.items()}, use_java)
    bleu, _ = Bleu(4).compute_score(gts, res)
    assert [metrics[f"Bleu_{k}"] for k in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert metrics["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert metrics["ROUGE_L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert notes["tokenizer"] == ("ptb" if use_java else "python-ptb-fallback")
    assert set(notes["skipped"]) == {"METEOR", "SPICE"}


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_fallback_tokenizer_matches_ptb_on_plain_captions():
    from mmllm.eval import caption

    texts = [*CAPTIONS.values(), *sum(REFERENCES.values(), []), "The cat's toys aren't here: they're gone!",
             "A \"big\" (small) cat, 3.5 feet long; isn't it?", "A U.S. flag near Mr. Smith's car at 10:30."]
    captions = {i: [{"caption": t}] for i, t in enumerate(texts)}
    assert caption.tokenize(captions, use_java=False)[0] == caption.tokenize(captions, use_java=True)[0]


# ---------------------------------------------------------------------------- POPE


def test_pope_parsing_and_metrics_by_hand(tmp_path):
    assert pope_scorer.parse_answer("Yes, there is a dog.") == "yes"
    assert pope_scorer.parse_answer("No.") == "no"
    assert pope_scorer.parse_answer("There is not a dog") == "no"
    assert pope_scorer.parse_answer("Yes. No dog here.") == "yes"  # only the first sentence counts
    rows = [{"question_id": i, "image": "x.jpg", "text": "Is there a dog in the image?", "label": lab}
            for i, lab in enumerate(["yes", "yes", "no", "no", "yes"])]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = ["Yes", "No", "Yes", "no", "yes"]  # TP 2, FN 1, FP 1, TN 1
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question_id": i, "text": a}) + "\n"
                                              for i, a in enumerate(answers)))
    m = evaluate("pope", predictions=tmp_path / "a.jsonl", questions=tmp_path / "q.jsonl")["metrics"]
    assert (m["accuracy"], m["precision"], m["recall"], m["F1"], m["yes_ratio"]) == pytest.approx(
        (3 / 5, 2 / 3, 2 / 3, 2 / 3, 3 / 5))


# ---------------------------------------------------------------------------- end to end


def test_vqav2_end_to_end_and_rescored_from_predictions(tiny, tmp_path):
    from mmllm.cli import main

    root = _vqa_fixture(tmp_path)
    out = tmp_path / "vqa.json"
    result = evaluate("vqav2", model=tiny, out=out, questions=root / "questions.json",
                      annotations=root / "annotations.json", images=root / "val2014", max_new_tokens=4,
                      batch_size=2, progress=False)
    written = json.loads(out.read_text())
    assert set(written) >= {"task", "metrics", "n", "model", "settings", "date", "bad_rows"}
    assert written["settings"]["seed"] == 0 and written["settings"]["versions"]["torch"] == importlib.metadata.version("torch")
    assert written["bad_rows"]["missing_image"]["examples"] == [30]
    preds = json.loads((tmp_path / "vqa.predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [10, 11, 20] and all(set(p) == {"question_id", "answer"} for p in preds)
    assert written["metrics"]["accuracy"] == result["metrics"]["accuracy"]

    again = tmp_path / "again.json"
    assert main(["eval", "vqav2", "--predictions", str(tmp_path / "vqa.predictions.json"),
                 "--annotations", str(root / "annotations.json"), "--questions", str(root / "questions.json"),
                 "--out", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"] == written["metrics"]


def test_coco_caption_end_to_end_and_rescored_from_predictions(tiny, tmp_path):
    from mmllm.cli import main

    (tmp_path / "val2014").mkdir()
    images, anns = [], []
    for k, image_id in enumerate((42, 73, 99)):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(np.full((24, 24, 3), 60 * k, np.uint8)).save(tmp_path / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "height": 24, "width": 24})
        anns += [{"id": 10 * image_id + j, "image_id": image_id, "caption": c}
                 for j, c in enumerate(REFERENCES[k + 1])]
    (tmp_path / "val2014" / images[2]["file_name"]).write_bytes(b"not a jpeg")  # undecodable: reported
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    out = tmp_path / "cap.json"
    evaluate("coco_caption", model=tiny, out=out, annotations=tmp_path / "captions.json",
             images=tmp_path / "val2014", max_new_tokens=6, java_metrics="off", progress=False)
    written = json.loads(out.read_text())
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(written["metrics"]) and written["n"] == 2
    assert written["bad_rows"]["undecodable_image"]["examples"] == [99]
    assert set(written["settings"]["skipped"]) == {"METEOR", "SPICE"}
    preds = json.loads((tmp_path / "cap.predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [42, 73] and all(set(p) == {"image_id", "caption"} for p in preds)

    again = tmp_path / "again.json"
    assert main(["eval", "coco_caption", "--predictions", str(tmp_path / "cap.predictions.json"),
                 "--annotations", str(tmp_path / "captions.json"), "--java-metrics", "off", "--out", str(again)]) == 0
    assert json.loads(again.read_text())["metrics"] == written["metrics"]


# ---------------------------------------------------------------------------- registry and CLI


def test_unknown_task_lists_the_valid_ones(capsys):
    from mmllm.cli import main

    with pytest.raises(ValueError, match="use one of vqav2, coco_caption, pope, text_to_image"):
        get_task("vqa")
    assert main(["eval", "vqa", "--predictions", "p.json"]) == 2
    assert "unknown task 'vqa'" in capsys.readouterr().err


def test_importing_the_package_loads_no_scorer_and_no_toy_world():
    import subprocess
    import sys

    code = ("import sys, mmllm.eval, mmllm.cli; mmllm.cli.build_parser(); "
            "print([m for m in sys.modules if m.startswith(('pycocoevalcap', 'torchmetrics', 'mmllm.toy'))])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ---------------------------------------------------------------------------- generation metrics


class _MeanColour(torch.nn.Module):
    """A tiny FID feature extractor: uint8 (N, 3, H, W) -> per-channel means and spreads (N, 6)."""

    num_features = 6

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)


def test_text_to_image_fid_is_torchmetrics_and_the_shared_frechet_formula(tmp_path):
    from mmllm.eval.media_tasks import FID_SIZE, frechet_distance

    rng = np.random.default_rng(0)
    (tmp_path / "gen").mkdir()
    (tmp_path / "ref").mkdir()
    preds = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "gen" / f"{i}.png")
        Image.fromarray(rng.integers(0, 128, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i}.png")
        preds.append({"prompt": f"picture {i}", "image": f"gen/{i}.png"})
    preds.append({"prompt": "lost", "image": "gen/missing.png"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    result = evaluate("text_to_image", predictions=tmp_path / "p.jsonl", reference_images=tmp_path / "ref",
                      fid_feature=_MeanColour())

    def features(folder):
        ims = [np.asarray(Image.open(p).convert("RGB").resize((FID_SIZE, FID_SIZE), Image.BICUBIC))
               for p in sorted(folder.glob("*.png"))]
        return _MeanColour()(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2))

    assert result["metrics"]["FID"] == pytest.approx(frechet_distance(features(tmp_path / "gen"),
                                                                      features(tmp_path / "ref")), rel=1e-4)
    assert result["n"] == 4 and result["bad_rows"]["missing_image"]["count"] == 1
    assert "CLIPScore" in result["settings"]["skipped"]
