"""The adapted layer: one forward, one merge and one unmerge for every method."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .factors import TargetAdapter

SUPPORTED_LAYERS = (nn.Linear, Conv1D)


class AdaptedLayer(nn.Module):
    """Wraps a frozen nn.Linear or transformers Conv1D (GPT-2's, weight stored (in, out)) and adds
    the active adapter's update: y = base(x) + s * B A dropout(x), or DoRA's rescaled version."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        rows, cols = base_layer.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.lora = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by replora.disable_adapters

    # Code that reads `layer.weight` / `layer.bias` (weight tying, dtype checks) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in), a view of the base layer's weight."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def add_adapter(self, name: str, adapter: TargetAdapter) -> None:
        self.lora[name] = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters or name not in self.lora:
            return result
        adapter = self.lora[name]
        A, B = adapter.factors()
        B = B * adapter.scaling  # (out, r): cheaper than scaling the (tokens, out) output
        dropped = adapter.dropout(x.to(A.dtype))
        update = F.linear(F.linear(dropped, A), B)
        magnitude = adapter.lora_magnitude
        if magnitude is None:
            return result + update.to(result.dtype)
        # DoRA: y = m / ||W0 + sBA|| * (W0 x + sBA x) + b. The norm is detached from the graph, as
        # DoRA §4.3 recommends (less memory, same update direction).
        W0 = self.base_weight()
        with torch.no_grad():
            norm = (W0 + B @ A).norm(dim=1)
        scale = magnitude / norm
        if isinstance(adapter.dropout, nn.Identity) or not adapter.training:
            base = result if self.bias is None else result - self.bias
        else:
            base = F.linear(dropped, W0)  # W0 dropout(x), as the update sees dropout(x)
        return result + ((scale - 1) * base + scale * update).to(result.dtype)

    def _exact(self, t: torch.Tensor) -> torch.Tensor:
        """t in the precision merges are computed in: float32, or the weight's own if wider (float64)."""
        return t.to(torch.promote_types(self.weight.dtype, torch.float32))

    def _fold(self, adapter: TargetAdapter, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W (out, in, merge precision) with the adapter folded in; DoRA also returns the row norms it divided by."""
        target = W + self._exact(adapter.delta_weight())
        if adapter.lora_magnitude is None:
            return target, None
        norm = target.norm(dim=1)
        return target * (self._exact(adapter.lora_magnitude) / norm)[:, None], norm

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """The base weight with adapter `name` folded in, in the base layer's layout and dtype."""
        W, _ = self._fold(self.lora[name], self._exact(self.base_weight()))
        return (W.T if self.fan_in_fan_out else W).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold the adapter into the base weight (computed in at least float32, stored in the weight's dtype)."""
        name = name or self.active_adapter
        if name in self.merged_adapters or name not in self.lora:
            return
        adapter = self.lora[name]
        W = self.base_weight()
        target, norm = self._fold(adapter, self._exact(W))
        if norm is not None:
            adapter.merge_norm = norm  # kept to undo the rescaling exactly in unmerge
            # A row whose magnitude is exactly 0 merges to zeros and cannot be scaled back: keep it as it was.
            adapter.merge_kept_rows = W[adapter.lora_magnitude == 0].clone()
        W.copy_(target.to(W.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first."""
        while self.merged_adapters:
            adapter = self.lora[self.merged_adapters.pop()]
            W = self.base_weight()
            restored = self._exact(W)
            is_dora = adapter.lora_magnitude is not None
            if is_dora:
                restored = restored * (adapter.merge_norm / self._exact(adapter.lora_magnitude))[:, None]
            restored = (restored - self._exact(adapter.delta_weight())).to(W.dtype)
            if is_dora:
                restored[adapter.lora_magnitude == 0] = adapter.merge_kept_rows
                del adapter.merge_norm, adapter.merge_kept_rows
            W.copy_(restored)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged_adapters}"


class SavedModule(nn.Module):
    """A module trained in full with an adapter (modules_to_save). The original stays frozen and each
    adapter trains its own copy, so switching or disabling adapters switches this module too."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.copies:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)  # code that reads e.g. `classifier.weight` keeps working
