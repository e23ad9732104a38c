"""The toy world's oracle tasks behind ``mmllm eval toy`` (``mmllm.toy.evaluate``, imported
only when the task runs). The oracles read the model's own media, so there is no separate
predictions file to score: the report is written as the predictions and scored as it is."""

from __future__ import annotations

from mmllm.eval.tasks import Task


class Toy(Task):
    name = "toy"
    options = {"splits": "train, test or both", "n": "items per modality and split"}
    default_max_new_tokens = 48

    def check(self, opts, with_model):
        if not with_model:
            raise ValueError("toy scores the model's own outputs with oracles; run it with --model")
        super().check(opts, with_model)

    def load(self, opts, limit):
        splits = opts.get("splits") or "both"
        if splits not in ("train", "test", "both"):
            raise ValueError(f"--splits {splits!r}: use train, test or both")
        return {"splits": ("train", "test") if splits == "both" else (splits,), "n": int(limit or opts.get("n") or 24)}

    def predict(self, model, data, gen, bad, progress, out):
        import sys

        from mmllm.toy.evaluate import evaluate

        def say(step):
            if progress:
                print(f"toy: {step}", file=sys.stderr, flush=True)

        report = evaluate(model, splits=data["splits"], n=data["n"], seed=gen["seed"],
                          batch=gen["batch_size"], progress=say)
        return [report]

    def score(self, predictions, data, bad, opts):
        report = predictions[0]
        metrics = {k: v for k, v in report.items() if k != "settings"}
        return metrics, {"toy": report.get("settings", {})}, data["n"]
