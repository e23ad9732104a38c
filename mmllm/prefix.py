"""LLaMA-Adapter-style gated prefix attention, through forward hooks on the LLM's attention.

For each of the top ``L`` layers, the layer's own query projection attends to the adaption
prompt's keys and values (made with the layer's own ``k_proj`` / ``v_proj``). That
attention has its own softmax, is scaled per head by ``tanh(gate)`` and passed through
``o_proj``'s weight (without bias), then added to the attention output. With every gate at
0 the added term is exactly zero, so the LLM's outputs are bit-identical to the base model.
The LLM itself is never modified: the hooks are removed with ``PrefixAttention.remove()``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PrefixAttention:
    """Installs the gated prefix on ``llm``'s top ``gates.shape[0]`` decoder layers."""

    def __init__(self, llm: nn.Module, gates: nn.Parameter):
        layers = llm.get_decoder().layers
        num_layers = gates.shape[0]
        if num_layers > len(layers):
            raise ValueError(f"gated prefix asks for {num_layers} layers but the LLM has {len(layers)}; lower num_layers")
        conf = llm.config
        self.num_heads = conf.num_attention_heads
        self.num_kv_heads = getattr(conf, "num_key_value_heads", None) or self.num_heads
        if gates.shape[1] != self.num_heads:
            raise ValueError(f"gated prefix has {gates.shape[1]} gates per layer; the LLM has {self.num_heads} heads")
        self.gates = gates
        self.prefix: torch.Tensor | None = None  # (B, L, P, D) while a forward runs
        self.first_layer = len(layers) - num_layers
        self.handles = [
            layer.self_attn.register_forward_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers[self.first_layer:])
        ]

    @contextlib.contextmanager
    def use(self, prefix: torch.Tensor | None):
        self.prefix = prefix
        try:
            yield
        finally:
            self.prefix = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, index: int):
        def hook(attn, args, kwargs, output):
            if self.prefix is None:
                return output
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, D)
            b, t, _ = hidden.shape
            prompt = self.prefix[:, index].to(hidden.dtype)  # (B, P, D)
            head_dim = attn.head_dim
            q = attn.q_proj(hidden).view(b, t, self.num_heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
            pos = kwargs.get("position_embeddings")
            if pos is not None:
                cos, sin = (p.unsqueeze(1) for p in pos)  # (B, 1, T, hd)
                q = q * cos + _rotate_half(q) * sin
            p = prompt.shape[1]
            k = attn.k_proj(prompt).view(b, p, self.num_kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(prompt).view(b, p, self.num_kv_heads, head_dim).transpose(1, 2)
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, P, hd)
            extra = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd), its own softmax over P
            gate = torch.tanh(self.gates[index]).to(extra.dtype).view(1, -1, 1, 1)
            extra = (gate * extra).transpose(1, 2).reshape(b, t, self.num_heads * head_dim)
            extra = F.linear(extra, attn.o_proj.weight)  # o_proj without its bias: zero in, zero out
            if isinstance(output, tuple):
                return (output[0] + extra,) + tuple(output[1:])
            return output + extra

        return hook
