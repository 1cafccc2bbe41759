"""The modules replora puts into a model: the adapted layer (one forward, one merge and one unmerge for
every method: each method's rule is its own, in methods/), the trained copies of modules_to_save, and
the holder of modules several targets share (RepLoRA's seeds and generators)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .methods import Method

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

    def add_adapter(self, name: str, adapter: Method) -> None:
        self.lora[name] = adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name in self.merged_adapters or name not in self.lora:
            return result
        return self.lora[name](x, result, self)

    def _exact(self, W: torch.Tensor) -> torch.Tensor:
        """W (out, in) in the precision merges are computed in: float32, or the weight's own if wider (float64)."""
        return W.to(torch.promote_types(self.weight.dtype, torch.float32))

    def _store(self, W: torch.Tensor) -> torch.Tensor:
        """W (out, in) back in the base layer's layout and dtype."""
        return (W.T if self.fan_in_fan_out else W).to(self.weight.dtype)

    @torch.no_grad()
    def merged_weight(self, name: str) -> torch.Tensor:
        """The base weight with adapter `name` folded in, in the base layer's layout and dtype; changes nothing."""
        return self._store(self.lora[name].fold(self._exact(self.base_weight())))

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold the adapter into the base weight (computed in at least float32, stored in the weight's dtype)."""
        name = name or self.active_adapter
        if name in self.merged_adapters or name not in self.lora:
            return
        self.weight.copy_(self._store(self.lora[name].merge(self._exact(self.base_weight()))))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first."""
        while self.merged_adapters:
            adapter = self.lora[self.merged_adapters.pop()]
            self.weight.copy_(self._store(adapter.unmerge(self._exact(self.base_weight()))))

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


class SharedModules(nn.ModuleDict):
    """`lora_shared` of a model module: per adapter name, the modules several of its targets share
    (RepLoRA's seeds and generators of the block it sits in)."""
