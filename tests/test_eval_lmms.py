"""The lmms-eval model adapter runs a tiny local task (``-m lmms_eval``; skipped without lmms_eval)."""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = pytest.mark.lmms_eval
pytest.importorskip("lmms_eval")

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.new("RGB", (16, 16), tuple(doc["rgb"]))]


def doc_to_text(doc):
    return doc["question"]
'''


def test_lmms_eval_runs_a_local_task_on_the_tiny_model(tiny, tmp_path):
    from lmms_eval import evaluator
    from lmms_eval.models.registry_v2 import ModelRegistryV2
    from lmms_eval.tasks import TaskManager

    from mmllm.eval.lmms import MANIFEST, MMLLMEval

    registry = ModelRegistryV2()
    registry.register_manifest(MANIFEST)  # what the lmms_eval.models entry point hands lmms-eval
    assert registry.get_model_class("mmllm") is MMLLMEval

    rows = [{"question": "What colour is the image?", "answer": "red", "rgb": [255, 0, 0]},
            {"question": "What colour is the image?", "answer": "blue", "rgb": [0, 0, 255]}]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    (tmp_path / "utils.py").write_text(UTILS)
    (tmp_path / "tiny_colour.yaml").write_text(textwrap.dedent(f"""\
        task: mmllm_tiny_colour
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "data.json"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          until: ["\\n\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    model = MMLLMEval(model=tiny, batch_size=2)
    out = evaluator.simple_evaluate(model=model, tasks=["mmllm_tiny_colour"],
                                    task_manager=TaskManager(include_path=str(tmp_path)), limit=2)
    metrics = out["results"]["mmllm_tiny_colour"]
    assert "exact_match,none" in metrics and 0.0 <= metrics["exact_match,none"] <= 1.0
    # loglikelihood: the continuation's log-probability after the templated context.
    from lmms_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, idx=0,
                   arguments=("What colour is the image?", " red", None, 0, "t", "test"))
    (logp, greedy), = model.loglikelihood([req])
    assert logp < 0 and isinstance(greedy, bool)
