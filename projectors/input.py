"""Input projectors: frozen-encoder features -> LLM input space."""

from __future__ import annotations

import torch
from torch import nn


class InputProjector(nn.Module):
    """``forward(features (B, N, D_enc)) -> (B, M, D_llm)``.

    ``kind`` is ``"tokens"`` (spliced into the prompt at the placeholder) or ``"prefix"``
    (attended by the LLM's upper layers; the placeholder takes no positions).
    """

    kind = "tokens"

    def num_output_tokens(self, num_in_tokens: int) -> int:
        return num_in_tokens


class LinearProjector(InputProjector):
    """LLaVA v1 / NExT-GPT legacy: one linear map per token."""

    def __init__(self, in_dim: int, out_dim: int, num_in_tokens: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x):
        return self.proj(x)


class MLPProjector(InputProjector):
    """LLaVA-1.5 ``mlp2x_gelu``: Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, num_in_tokens: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class FlattenMLPProjector(InputProjector):
    """All of the encoder's tokens flattened into one vector, then an MLP to ``num_tokens``
    LLM tokens (C-Abstractor / LDP-style token compression, here as one dense map).

    A per-token projector hands the LLM one token per patch, and the LLM's attention must
    find the patch that holds the object before it can name the object's shape; a map over
    all tokens reads such position-dependent features directly and hands over fewer tokens.
    It needs the encoder's token count to be fixed (``num_in_tokens``), which holds for
    fixed-size images, fixed-length audio and a fixed number of frames.

    A dense map over positions can also learn combinations rather than attributes (on the
    toy world's held-out colour x direction videos it named the colour seen in training
    with that direction). ``hidden=0`` makes the map one linear layer;
    ``summary_token=True`` puts one position-invariant token first: the mean of all
    encoder tokens through its own ``mlp2x_gelu``. ``per_token=True`` also appends every
    encoder token through a shared ``mlp2x_gelu`` (LLaVA-1.5's projector), so an attribute
    that every patch shows on its own (colour) reaches the LLM token by token as well as
    mixed into the flattened map.
    """

    def __init__(self, in_dim: int, out_dim: int, num_in_tokens: int, num_tokens: int = 4,
                 hidden: int | None = None, summary_token: bool = False, per_token: bool = False):
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"flatten_mlp needs num_tokens >= 1, got {num_tokens}")
        self.num_in_tokens = num_in_tokens
        self.num_tokens = num_tokens
        hidden = out_dim if hidden is None else hidden
        self.norm = nn.LayerNorm(in_dim)
        flat_dim = num_in_tokens * in_dim
        if hidden:
            self.mlp = nn.Sequential(nn.Linear(flat_dim, hidden), nn.GELU(), nn.Linear(hidden, num_tokens * out_dim))
        else:  # hidden=0: one linear map
            self.mlp = nn.Linear(flat_dim, num_tokens * out_dim)
        self.summary = MLPProjector(in_dim, out_dim, 1) if summary_token else None
        self.per_token = MLPProjector(in_dim, out_dim, num_in_tokens) if per_token else None

    def num_output_tokens(self, num_in_tokens: int) -> int:
        return (self.summary is not None) + self.num_tokens + (num_in_tokens if self.per_token is not None else 0)

    def forward(self, x):
        if x.shape[1] != self.num_in_tokens:
            raise ValueError(f"flatten_mlp was built for {self.num_in_tokens} encoder tokens but got {x.shape[1]}; "
                             "it needs a fixed token count (fixed image size, audio length and frame count), or "
                             "use a per-token projector (mlp2x_gelu) or the resampler")
        flat = self.norm(x).flatten(1)  # (B, N * D_enc)
        parts = [self.mlp(flat).view(x.shape[0], self.num_tokens, -1)]  # (B, num_tokens, D_llm)
        if self.summary is not None:
            parts.insert(0, self.summary(x.mean(1, keepdim=True)))
        if self.per_token is not None:
            parts.append(self.per_token(x))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class ResamplerProjector(InputProjector):
    """Learned queries cross-attend to the features: a fixed ``num_queries`` tokens out,
    whatever the encoder's token count (Perceiver/Q-Former style)."""

    def __init__(self, in_dim: int, out_dim: int, num_in_tokens: int, num_queries: int = 8, depth: int = 1,
                 heads: int = 4, width: int | None = None):
        super().__init__()
        width = width or in_dim
        if width % heads:
            raise ValueError(f"resampler width {width} must be divisible by heads={heads}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.kv_in = nn.Linear(in_dim, width)
        layer = nn.TransformerDecoderLayer(width, heads, dim_feedforward=4 * width, batch_first=True, norm_first=True,
                                           dropout=0.0)
        self.blocks = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def num_output_tokens(self, num_in_tokens: int) -> int:
        return self.num_queries

    def forward(self, x):
        memory = self.kv_in(x)  # (B, N, W)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, W)
        return self.out(self.norm(self.blocks(q, memory)))  # (B, Q, D_llm)


class GatedPrefixProjector(InputProjector):
    """LLaMA-Adapter-V2-style gated prefix.

    Holds learned adaption prompts ``(num_layers, prompt_len, D_llm)`` for the top
    ``num_layers`` LLM layers and one ``tanh`` gate per layer and head, initialised to 0.
    The pooled media feature is projected and added to every prompt. The LLM's attention
    in those layers also attends to the prompts, scaled by the gate (``mmllm.prefix``), so at
    initialisation the model is exactly the base LLM.
    """

    kind = "prefix"

    def __init__(self, in_dim: int, out_dim: int, num_in_tokens: int, prompt_len: int = 10, num_layers: int = 8,
                 num_heads: int | None = None):
        super().__init__()
        self.prompt_len = prompt_len
        self.num_layers = num_layers
        self.prompts = nn.Parameter(torch.randn(num_layers, prompt_len, out_dim) * 0.02)
        self.media_proj = nn.Linear(in_dim, out_dim)
        # One gate per layer and head; the head count is set by the model once the LLM is known.
        self.gates = nn.Parameter(torch.zeros(num_layers, num_heads or 1))

    def num_output_tokens(self, num_in_tokens: int) -> int:
        return 0

    def forward(self, x):
        media = self.media_proj(x.mean(1))  # (B, D)
        return self.prompts.unsqueeze(0) + media[:, None, None, :]  # (B, L, P, D)

    def empty_prefix(self, batch: int) -> torch.Tensor:
        """Prompts without media, for samples that carry none: (B, L, P, D)."""
        return self.prompts.unsqueeze(0).expand(batch, -1, -1, -1)
