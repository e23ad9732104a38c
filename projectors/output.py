"""Output projectors: signal-token states -> a frozen decoder's text-conditioning space."""

from __future__ import annotations

import math

import torch
from torch import nn


class OutputProjector(nn.Module):
    """``forward(hidden (B, K, D_llm), embeds (B, K, D_llm)) -> (B, *target_shape)``.

    ``target_shape`` is ``(S, W)`` for token-level conditioning (SD: 77x768) or ``(W,)`` for
    pooled conditioning (AudioLDM: 512); it is read from the decoder, never typed in.
    """

    def __init__(self, llm_dim: int, target_shape: tuple, num_signal_tokens: int):
        super().__init__()
        if len(target_shape) not in (1, 2):
            raise ValueError(f"target_shape must be (S, W) or (W,), got {target_shape}")
        self.target_shape = tuple(int(s) for s in target_shape)
        self.pooled = len(self.target_shape) == 1
        self.num_signal_tokens = num_signal_tokens

    @property
    def target_len(self) -> int:
        return 1 if self.pooled else self.target_shape[0]

    @property
    def target_width(self) -> int:
        return self.target_shape[-1]


class LinearOutputProjector(OutputProjector):
    """Per-token linear to the target width, then a linear map over the token axis
    (K signal tokens -> S conditioning tokens, or K -> 1 for pooled targets)."""

    def __init__(self, llm_dim: int, target_shape: tuple, num_signal_tokens: int):
        super().__init__(llm_dim, target_shape, num_signal_tokens)
        self.width = nn.Linear(llm_dim, self.target_width)
        self.tokens = nn.Linear(num_signal_tokens, self.target_len)

    def forward(self, hidden, embeds=None):
        x = hidden if embeds is None else hidden + embeds  # (B, K, D)
        x = self.width(x)  # (B, K, W)
        x = self.tokens(x.transpose(1, 2)).transpose(1, 2)  # (B, S, W)
        return x[:, 0] if self.pooled else x

    @property
    def input_linear(self) -> nn.Linear:
        """The linear layer that reads hidden + embeds first (``training.align`` folds input scaling into it)."""
        return self.width


class TransformerOutputProjector(OutputProjector):
    """GILL / NExT-GPT mapper: Linear(D_llm -> d) on hidden + input embeddings, an
    encoder-decoder ``nn.Transformer`` whose decoder reads S learned queries, Linear(d -> W)."""

    def __init__(self, llm_dim: int, target_shape: tuple, num_signal_tokens: int, d_model: int = 512,
                 heads: int = 4, encoder_layers: int = 4, decoder_layers: int = 4, ff: int = 2048,
                 dropout: float = 0.0):
        super().__init__(llm_dim, target_shape, num_signal_tokens)
        self.down = nn.Linear(llm_dim, d_model)
        self.transformer = nn.Transformer(
            d_model=d_model, nhead=heads, num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers,
            dim_feedforward=ff, dropout=dropout, batch_first=True,
        )
        self.queries = nn.Parameter(torch.randn(self.target_len, d_model) / math.sqrt(d_model))
        self.up = nn.Linear(d_model, self.target_width)

    def forward(self, hidden, embeds=None):
        x = hidden if embeds is None else hidden + embeds  # (B, K, D)
        src = self.down(x)  # (B, K, d)
        tgt = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, S, d)
        out = self.up(self.transformer(src, tgt))  # (B, S, W)
        return out[:, 0] if self.pooled else out

    @property
    def input_linear(self) -> nn.Linear:
        """The linear layer that reads hidden + embeds first (``training.align`` folds input scaling into it)."""
        return self.down
