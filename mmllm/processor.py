"""Turning conversations and media into model inputs.

Chats are rendered with the tokenizer's own chat template; no per-model template is
written here. Each modality has a placeholder (``<image>``, ``<audio>``, ``<video>``) added
to the tokenizer as a special token. After tokenisation every placeholder is expanded to
the number of positions its projector produces (0 for a gated prefix), and the media
features are later written into those positions (``MMLLM.embed``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .modalities import MODALITIES, NAMES

MODALITY_LOADERS = NAMES


@dataclass
class ModalitySpec:
    """What the processor needs to know about one input modality."""

    placeholder: str
    token_id: int
    num_tokens: int  # positions per item in the LLM sequence (0 for a gated prefix)
    encoder: Any  # an ``mmllm.encoders.Encoder`` (for ``preprocess`` and ``sample_rate``)


@dataclass
class Batch:
    """Model inputs: token ids, mask and per-modality media tensors in order of appearance."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (M, ...)
    media_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (M,) sample index
    labels: torch.Tensor | None = None  # (B, T), -100 where not supervised

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.attention_mask), {k: mv(v) for k, v in self.media.items()},
                     {k: mv(v) for k, v in self.media_sample.items()}, mv(self.labels))


def decode_media(modality: str, item: Any, spec: ModalitySpec):
    """Files / PIL / arrays / tensors -> the decoded form the encoder's ``preprocess`` takes."""
    if modality in MODALITIES:
        return MODALITIES[modality].load(item, getattr(spec.encoder, "sample_rate", None))
    raise ValueError(f"unknown modality {modality!r}; this model takes {MODALITY_LOADERS}")


class MMLLMProcessor:
    def __init__(self, tokenizer, modalities: dict[str, ModalitySpec], system_prompt: str | None = None,
                 max_length: int | None = None):
        self.tokenizer = tokenizer
        self.modalities = modalities
        self.system_prompt = system_prompt
        self.max_length = max_length

    # ------------------------------------------------------------------ text

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + list(messages)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text: str) -> list[int]:
        # The chat template already wrote BOS and role markers; add nothing.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def expand(self, ids: list[int]) -> list[int]:
        """Repeat every placeholder id ``num_tokens`` times (dropping it for prefix modalities)."""
        out: list[int] = []
        by_id = {s.token_id: s for s in self.modalities.values()}
        for t in ids:
            spec = by_id.get(t)
            out.extend([t] * spec.num_tokens if spec is not None else [t])
        return out

    def count_placeholders(self, ids: Sequence[int]) -> dict[str, int]:
        return {m: sum(1 for t in ids if t == s.token_id) for m, s in self.modalities.items()}

    # ------------------------------------------------------------------ media

    def preprocess_media(self, media: list[dict[str, list]]) -> tuple[dict, dict]:
        """Per-sample media dicts -> (modality -> (M, ...) tensor, modality -> (M,) sample index)."""
        tensors, owners = {}, {}
        for modality, spec in self.modalities.items():
            items, owner = [], []
            for i, sample in enumerate(media):
                for item in sample.get(modality, []) or []:
                    items.append(decode_media(modality, item, spec))
                    owner.append(i)
            if items:
                tensors[modality] = spec.encoder.preprocess(items)
                owners[modality] = torch.tensor(owner, dtype=torch.long)
        for i, sample in enumerate(media):
            unknown = sorted(set(sample) - set(self.modalities))
            if unknown and any(sample[m] for m in unknown):
                raise ValueError(
                    f"sample {i} has media for {unknown}, but this model takes only {sorted(self.modalities)}"
                )
        return tensors, owners

    def check_counts(self, ids: Sequence[int], sample: dict[str, list], index: int) -> None:
        counts = self.count_placeholders(ids)
        for modality, spec in self.modalities.items():
            given = len(sample.get(modality, []) or [])
            if counts[modality] != given:
                raise ValueError(
                    f"sample {index}: the text has {counts[modality]} {spec.placeholder} placeholder(s) but "
                    f"{given} {modality} input(s) were given; put one {spec.placeholder} in the text per {modality}"
                )

    # ------------------------------------------------------------------ batches

    def pad(self, sequences: list[list[int]], padding_side: str = "left",
            labels: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        width = max(len(s) for s in sequences)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        lab = torch.full((len(sequences), width), -100, dtype=torch.long) if labels is not None else None
        for i, s in enumerate(sequences):
            sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
            ids[i, sl] = torch.tensor(s, dtype=torch.long)
            mask[i, sl] = 1
            if lab is not None:
                lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        return ids, mask, lab

    def __call__(self, conversations: list[list[dict]], media: list[dict[str, list]] | None = None,
                 add_generation_prompt: bool = True, padding_side: str = "left") -> Batch:
        """Chats (lists of ``{"role", "content"}``) and their media -> a padded ``Batch``."""
        media = media or [{} for _ in conversations]
        if len(media) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(media)} media dicts; give one per conversation")
        seqs = []
        for i, (conv, sample) in enumerate(zip(conversations, media)):
            ids = self.tokenize(self.render(conv, add_generation_prompt))
            self.check_counts(ids, sample, i)
            ids = self.expand(ids)
            if self.max_length and len(ids) > self.max_length:
                raise ValueError(
                    f"sample {i} is {len(ids)} tokens long (media included), over the model's max_length "
                    f"{self.max_length}; shorten the prompt or history, or raise max_length"
                )
            seqs.append(ids)
        input_ids, attention_mask, _ = self.pad(seqs, padding_side)
        tensors, owners = self.preprocess_media(media)
        return Batch(input_ids, attention_mask, tensors, owners)
