"""Examples -> a padded ``TrainBatch``: media decoded here (lazily), L2 targets looked up."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmllm.processor import decode_media
from pipelines.decoders import TargetCache

from .data import DataReport, Example


@dataclass
class TrainBatch:
    """Model inputs plus the decoding-side targets.

    targets: modality -> (n, *conditioning_shape) decoder embeddings of the captions;
    target_index: modality -> (n,) which signal sequence (row-major order of appearance in
    the batch) each target belongs to; sequences without a caption get no L2 loss.
    """

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where unsupervised
    media: dict = field(default_factory=dict)  # modality -> preprocessed (M, ...)
    media_sample: dict = field(default_factory=dict)  # modality -> (M,)
    features: dict = field(default_factory=dict)  # modality -> cached encoder output (M, N, D)
    targets: dict = field(default_factory=dict)
    target_index: dict = field(default_factory=dict)
    num_examples: int = 0

    def to(self, device) -> "TrainBatch":
        mv = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return TrainBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                          mv(self.media), mv(self.media_sample), mv(self.features), mv(self.targets),
                          mv(self.target_index), self.num_examples)

    def inputs(self) -> dict:
        """Keyword arguments of ``TrainingModule.forward``."""
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, labels=self.labels,
                    media=self.media, media_sample=self.media_sample, features=self.features,
                    targets=self.targets, target_index=self.target_index)


class Collator:
    """``list[Example] -> TrainBatch | None`` (None when every example in it was bad).

    Media that cannot be decoded make their example a bad row (recorded in ``report``).
    With a ``feature_cache`` (``mmllm.training.cache.FeatureCache``), encoder outputs and
    targets found there are used instead of running the frozen encoders / text encoders.
    """

    def __init__(self, model, report: DataReport, feature_cache=None):
        self.model = model
        self.processor = model.processor
        self.report = report
        self.feature_cache = feature_cache
        self.target_caches = {m: TargetCache() for m in model.signal_groups}

    def _decode(self, ex: Example) -> dict[str, list]:
        out = {}
        for m, paths in ex.media.items():
            if self.feature_cache is not None and all(self.feature_cache.has_feature(m, p) for p in paths):
                out[m] = [("cached", p) for p in paths]
            else:
                out[m] = [decode_media(m, p, self.processor.modalities[m]) for p in paths]
        return out

    def __call__(self, examples: list[Example]) -> TrainBatch | None:
        kept, decoded = [], []
        for ex in examples:
            try:
                decoded.append(self._decode(ex))
                kept.append(ex)
            except Exception as err:  # any decoding failure is this row's fault
                self.report.bad(ex.source, ex.row, f"cannot decode media ({err})")
        if not kept:
            return None
        ids, mask, labels = self.processor.pad([e.ids for e in kept], "right", labels=[e.labels for e in kept])
        media, owners, features = {}, {}, {}
        for m, spec in self.processor.modalities.items():
            items = [(i, x) for i, d in enumerate(decoded) for x in d.get(m, [])]
            if not items:
                continue
            owners[m] = torch.tensor([i for i, _ in items], dtype=torch.long)
            if all(isinstance(x, tuple) and x and x[0] == "cached" for _, x in items):
                features[m] = torch.stack([self.feature_cache.feature(m, x[1]) for _, x in items])
            else:
                live = [x if not (isinstance(x, tuple) and x and x[0] == "cached") else
                        decode_media(m, x[1], spec) for _, x in items]
                media[m] = spec.encoder.preprocess(live)
        targets, index = {}, {}
        for m in self.model.signal_groups:
            caps = [c for e in kept for c in e.targets.get(m, [])]
            which = [k for k, c in enumerate(caps) if c is not None]
            if not which:
                continue
            wanted = [caps[k] for k in which]
            targets[m] = self._targets(m, wanted)
            index[m] = torch.tensor(which, dtype=torch.long)
        return TrainBatch(ids, mask, labels, media, owners, features, targets, index, len(kept))

    def _targets(self, modality: str, captions: list[str]) -> torch.Tensor:
        fc = self.feature_cache
        if fc is not None and all(fc.has_target(modality, c) for c in captions):
            return torch.stack([fc.target(modality, c) for c in captions])
        decoder = self.model.decoders[modality]
        return decoder.encode_text(captions, cache=self.target_caches[modality]).cpu()
