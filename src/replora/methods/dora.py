"""DoRA (Liu et al., 2024): W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖, row norms; LoRA's factors plus a magnitude m."""
from __future__ import annotations

import torch
from torch import nn

from .lora import LoRA


class DoRA(LoRA):
    name = "dora"
    summary = "m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖"
    exports_as = "dora"  # PEFT's use_dora: the factors and lora_magnitude; not a llama.cpp LoRA adapter

    def __init__(self, config, layer):
        super().__init__(config, layer)
        # m starts at the row norms of W0, so the adapted layer starts as the base layer.
        W0 = layer.base_weight().detach()
        self.lora_magnitude = nn.Parameter(W0.float().norm(dim=1).to(W0.dtype))

    @classmethod
    def parameter_count(cls, config, shapes):
        return super().parameter_count(config, shapes) + sum(o for _, o in shapes.values())

    def forward(self, x, result, layer):
        # y = m / ||W0 + sBA|| * (W0 x + sBA x) + b. The norm is detached from the graph, as DoRA §4.3
        # recommends (less memory, same update direction).
        update, dropped, (A, B) = self.update(x, layer)
        W0 = layer.base_weight()
        with torch.no_grad():
            norm = (W0 + B @ A).norm(dim=1)
        scale = layer.per_output(self.lora_magnitude / norm)
        if isinstance(self.dropout, nn.Identity) or not self.training or layer.kind == "embedding":
            base = result if layer.bias is None else result - layer.per_output(layer.bias)
        else:
            base = layer.apply_weight(dropped, W0)  # W0 dropout(x), as the update sees dropout(x)
        return result + ((scale - 1) * base + scale * update).to(result.dtype)

    def fold(self, W):
        return self._fold(W)[0]

    def _fold(self, W):
        target = W + self.delta_weight().to(W.dtype)
        norm = target.norm(dim=1)
        return target * (self.lora_magnitude.to(W.dtype) / norm)[:, None], norm

    def merge(self, W):
        merged, self.merge_norm = self._fold(W)  # kept to undo the rescaling exactly in unmerge
        # A row whose magnitude is exactly 0 merges to zeros and cannot be scaled back: keep it as it was.
        self.merge_kept_rows = W[self.lora_magnitude == 0].clone()
        return merged

    def unmerge(self, W):
        restored = W * (self.merge_norm / self.lora_magnitude.to(W.dtype))[:, None] - self.delta_weight().to(W.dtype)
        restored[self.lora_magnitude == 0] = self.merge_kept_rows
        del self.merge_norm, self.merge_kept_rows
        return restored
