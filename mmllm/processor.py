"""Turning conversations and media into model inputs.

Chats are rendered with the tokenizer's own chat template; no per-model template is
written here. Each modality has a placeholder (``<image>``, ``<audio>``, ``<video>``) added
to the tokenizer as a special token. After tokenisation every placeholder is expanded to
the number of positions its projector produces (0 for a gated prefix), and the media
features are later written into those positions (``MMLLM.embed``).

Message text is untrusted: control tokens typed into it (``<|im_end|>``, ``<|im_start|>``,
the signal tokens ``[IMG0]``...) are tokenized as plain text, the way chat servers do it, so
a user cannot close their turn, open a system turn or emit a signal token by typing. Only the
chat template's own markers and the media placeholders (the documented way to place media)
stay special.
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

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize a chat; control tokens typed inside a message stay text.

        Text without control-token strings (all ordinary text) tokenizes exactly as
        ``tokenize(render(...))``; in a message that holds some, the tokens they cover are
        re-tokenized as text (placeholders kept).
        """
        text = self.render(messages, add_generation_prompt)
        strings = self._control_strings()
        typed = [i for i, m in enumerate(messages) if any(c in str(m.get("content") or "") for c in strings)]
        if not typed:
            return self.tokenize(text)
        spans = self._content_spans(messages, add_generation_prompt, text)
        if spans is None:
            i = typed[0]
            found = next(c for c in strings if c in messages[i]["content"])
            raise ValueError(
                f"message {i} contains the control token {found!r}, and this chat template changes message text, "
                "so it cannot be kept as plain text; remove it from the message"
            )
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        control = self._control_ids()
        for i in reversed(typed):
            a, b = spans[i]
            inside = [k for k, (start, end) in enumerate(offsets) if start < b and end > a]
            if not any(ids[k] in control for k in inside):
                continue
            lo, hi = min(offsets[k][0] for k in inside), max(offsets[k][1] for k in inside)
            ids[inside[0]:inside[-1] + 1] = self._text_ids(text[lo:hi])  # last span first: earlier indices hold
        return ids

    def _control_ids(self) -> set[int]:
        """Special token ids other than the media placeholders."""
        tok = self.tokenizer
        ids = set(tok.all_special_ids)
        ids |= {i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
        return ids - {s.token_id for s in self.modalities.values()}

    def _control_strings(self) -> list[str]:
        return [s for s in self.tokenizer.convert_ids_to_tokens(sorted(self._control_ids())) if s]

    def _text_ids(self, text: str) -> list[int]:
        """``text`` tokenized with every special token as plain text, except the placeholders."""
        import re

        by_text = {s.placeholder: s.token_id for s in self.modalities.values()}
        out: list[int] = []
        pattern = "(" + "|".join(re.escape(p) for p in by_text) + ")" if by_text else None
        for piece in (re.split(pattern, text) if pattern else [text]):
            if piece in by_text:
                out.append(by_text[piece])
            elif piece:
                out += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return out

    def _content_spans(self, messages: list[dict], add_generation_prompt: bool, text: str):
        """Character spans of each message's content in ``text``, found by rendering the chat with
        a marker for each content; None when the template does not copy content verbatim."""
        marks = [f"MMLLMCONTENT{i}MARK" for i in range(len(messages))]
        marked = self.render([{**m, "content": k} for m, k in zip(messages, marks)], add_generation_prompt)
        pieces, pos = [], 0
        for k in marks:
            j = marked.find(k, pos)
            if j < 0:
                return None
            pieces.append(marked[pos:j])
            pos = j + len(k)
        spans, rebuilt = [], ""
        for piece, m in zip(pieces, messages):
            rebuilt += piece
            spans.append((len(rebuilt), len(rebuilt) + len(m["content"])))
            rebuilt += m["content"]
        return spans if rebuilt + marked[pos:] == text else None

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
            ids = self.encode(conv, add_generation_prompt)
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
