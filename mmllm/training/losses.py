"""The training objective as a module, so DDP/FSDP see every trainable parameter used in forward."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class TrainingModule(nn.Module):
    """``MMLLM`` plus its training loss.

    loss = lm_scale * CE(supervised tokens) + sum_m l2_scale[m] * MSE(project_signals_m, target_m)

    The CE covers caption tokens (encoding side), signal tokens (decoding side) or assistant
    turns (stage 2), whichever the labels mark. The L2 term (NExT-GPT / GILL) pulls each
    signal sequence's projected states towards the frozen decoder's own text conditioning.
    """

    def __init__(self, model: nn.Module, lm_scale: float = 1.0, l2_scale: dict | None = None):
        super().__init__()
        self.model = model
        self.lm_scale = lm_scale
        self.l2_scale = dict(l2_scale or {})

    def forward(self, input_ids, attention_mask, labels, media=None, media_sample=None, features=None,
                targets=None, target_index=None):
        targets = targets or {}
        out = self.model(input_ids, attention_mask, media, media_sample, labels,
                         output_hidden_states=bool(targets), features=features)
        loss = out.loss * self.lm_scale
        parts = {"lm": out.loss.detach()}
        if targets:
            pred = self.model.project_signals(input_ids, out.hidden_states)
            for m, target in targets.items():
                if m not in pred:
                    raise ValueError(f"the batch has {m} L2 targets but no complete {m} signal-token sequence")
                p = pred[m][target_index[m]]  # (n, *shape)
                l2 = F.mse_loss(p.float(), target.to(p.device).float())
                loss = loss + self.l2_scale.get(m, 1.0) * l2
                parts[f"l2_{m}"] = l2.detach()
        parts["loss"] = loss.detach()
        return loss, parts
