"""Signal tokens: the LLM's way of asking for an image, a sound or a clip.

Each output modality owns ``K`` new tokens (``[IMG0]..[IMG3]``). Only their new rows learn:
``SignalEmbedding`` and ``SignalHead`` wrap the LLM's frozen embedding and LM head and add
a small trainable matrix each, so the original matrices are never resized or unfrozen
(NExT-GPT's resize-after-freeze made the whole matrix trainable). ``ForceSignalTokens``
completes a started signal sequence and, given the token budget, starts none that cannot
finish inside it, so ``max_new_tokens`` never cuts one short.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def signal_token_names(prefix: str, count: int) -> list[str]:
    return [f"[{prefix}{i}]" for i in range(count)]


def _init_rows(base_weight: torch.Tensor, n: int) -> torch.Tensor:
    # New rows start near the mean of the existing ones, as resize_token_embeddings does.
    w = base_weight.detach().float()
    return (w.mean(0, keepdim=True) + w.std() * 0.02 * torch.randn(n, w.shape[1])).to(base_weight.dtype)


class SignalEmbedding(nn.Module):
    """Frozen base embedding plus trainable rows for the signal-token ids."""

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        size = max(max(token_ids) + 1, base.num_embeddings)
        slot = torch.full((size,), -1, dtype=torch.long)
        slot[torch.tensor(token_ids)] = torch.arange(len(token_ids))
        self.register_buffer("slot", slot, persistent=False)
        self.new_rows = nn.Parameter(_init_rows(base.weight, len(token_ids)))

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.slot.numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[ids]  # (B, T), -1 for ordinary tokens
        is_new = slot >= 0
        out = self.base(ids.masked_fill(is_new | (ids >= self.base.num_embeddings), 0))  # (B, T, D)
        rows = self.new_rows[slot.clamp(min=0)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), rows, out)


class SignalHead(nn.Module):
    """Frozen LM head plus trainable output rows for the signal-token ids.

    Logits cover ``max(id) + 1`` columns; ids past the base vocabulary that are not signal
    tokens (the input placeholders) get the lowest logit, so they are never generated.
    """

    def __init__(self, base: nn.Linear, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.out_features = max(max(token_ids) + 1, base.out_features)
        self.new_rows = nn.Parameter(_init_rows(base.weight, len(token_ids)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)  # (..., V)
        extra = self.out_features - logits.shape[-1]
        if extra:
            logits = F.pad(logits, (0, extra), value=torch.finfo(logits.dtype).min)
        new = hidden @ self.new_rows.to(hidden.dtype).t()  # (..., K_total)
        return logits.index_copy(-1, self.token_ids, new.to(logits.dtype))


class ForceSignalTokens:
    """A transformers ``LogitsProcessor``: after ``[X0]`` comes ``[X1]`` ... ``[X{K-1}]``.

    It also suppresses the first signal token of modalities that are not allowed, that
    already reached ``max_per_turn`` in this generation, or whose ``K`` tokens no longer fit
    in ``max_new_tokens`` (``input_ids`` holding only the generated tokens, as when
    generating from ``inputs_embeds``).
    """

    def __init__(self, groups: dict[str, list[int]], allowed: set[str] | None = None, max_per_turn: int | None = None,
                 max_new_tokens: int | None = None):
        self.groups = groups
        self.max_new_tokens = max_new_tokens
        self.allowed = set(groups) if allowed is None else set(allowed)
        self.max_per_turn = max_per_turn
        self.next_of = {ids[i]: ids[i + 1] for ids in groups.values() for i in range(len(ids) - 1)}
        self.start_of = {m: ids[0] for m, ids in groups.items()}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        low = torch.finfo(scores.dtype).min
        scores = scores.clone()
        for row in range(scores.shape[0]):
            seq = input_ids[row].tolist()
            last = seq[-1] if seq else None
            if last in self.next_of:
                forced = self.next_of[last]
                keep = scores[row, forced].clone()
                scores[row] = low
                scores[row, forced] = keep if torch.isfinite(keep) and keep > low else 0.0
                continue
            left = None if self.max_new_tokens is None else self.max_new_tokens - len(seq)
            for modality, start in self.start_of.items():
                used = sum(1 for t in seq if t == start)
                capped = self.max_per_turn is not None and used >= self.max_per_turn
                no_room = left is not None and left < len(self.groups[modality])
                if modality not in self.allowed or capped or no_room:
                    scores[row, start] = low
        return scores


def partial_signal_groups(ids: list[int], groups: dict[str, list[int]]) -> list[tuple[str, int, int]]:
    """Signal sequences in ``ids`` that start but do not finish: [(modality, start, tokens present)]."""
    found = []
    for modality, sig in groups.items():
        for pos, t in enumerate(ids):
            if t == sig[0] and ids[pos:pos + len(sig)] != sig:
                have = next((i for i, (a, b) in enumerate(zip(ids[pos:], sig)) if a != b), len(ids) - pos)
                found.append((modality, pos, have))
    return sorted(found, key=lambda x: x[1])
