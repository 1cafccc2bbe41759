"""The modules replora puts into a model: the adapted layer (one forward, one merge and one unmerge for
every method: each method's rule is its own, in methods/), the trained copies of modules_to_save, and
the holder of modules several targets share (RepLoRA's seeds and generators)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import quantized
from .methods import Method

SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)
LINEAR_LAYERS = (nn.Linear, Conv1D)  # what target_modules="all-linear" means


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer (of a supported type, or any the user named) cannot take an adapter, or None."""
    reason = quantized.refusal(module)  # another library's quantized layer, possibly an nn.Linear subclass
    if reason:
        return reason
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return (f"it is a grouped (depthwise) Conv2d, groups={module.groups}, whose update is not one low-rank "
                "matrix; target the 1x1 (pointwise) convolutions around it instead")
    return None


class AdaptedLayer(nn.Module):
    """Wraps a frozen nn.Linear, transformers Conv1D (GPT-2's, weight stored (in, out)), nn.Conv2d or
    nn.Embedding and adds the active adapter's update: y = base(x) + s * B A dropout(x), or DoRA's.

    Every kind is seen as one (out, in) matrix W, so methods only ever produce (A: (r, in), B: (out, r)):
    a Conv2d's in is in_channels * kh * kw (A is a conv with the layer's kernel, stride and padding, B a
    1x1 conv: PEFT's layout), an Embedding maps a one-hot vocabulary (in) to its dimension (out).
    A bitsandbytes Linear4bit / Linear8bitLt (an nn.Linear whose weight is packed) is a "linear" kind too: it
    runs its own forward, and base_weight() dequantizes it (quantized.py)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.kind = ("conv1d" if isinstance(base_layer, Conv1D) else "conv2d" if isinstance(base_layer, nn.Conv2d)
                     else "embedding" if isinstance(base_layer, nn.Embedding) else "linear")
        self.fan_in_fan_out = self.kind == "conv1d"
        self.quantized = quantized.is_quantized(base_layer)
        if self.quantized:  # its weight is packed (a 4-bit one is (n, 1) bytes): the layer says its shape
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            rows = base_layer.weight.shape[0]
            cols = base_layer.weight[0].numel()
            self.in_features, self.out_features = (cols, rows) if self.kind in ("linear", "conv2d") else (rows, cols)
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
        return getattr(self.base_layer, "bias", None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of W0 as base_weight() gives it: the weight's own, or a quantized layer's compute dtype."""
        return quantized.compute_dtype(self.base_layer) if self.quantized else self.base_layer.weight.dtype

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in): a view of the base layer's weight, or a quantized layer's weight dequantized (a new
        tensor in the compute dtype)."""
        if self.quantized:
            return quantized.dequantize(self.base_layer)
        w = self.base_layer.weight
        if self.kind == "conv2d":
            return w.flatten(1)
        return w.T if self.kind in ("conv1d", "embedding") else w

    # --- the kind's own operations on (out, in)-shaped matrices: what makes one forward serve all kinds ---
    def apply_weight(self, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """x through the layer's own operation with weight W (rows, in) instead of W0, no bias: W x for a
        Linear, the convolution with W's rows as kernels, the lookup of W's columns for an Embedding."""
        base = self.base_layer
        if self.kind == "conv2d":
            kernels = W.view(W.shape[0], *base.weight.shape[1:])
            padding = base.padding
            if base.padding_mode != "zeros":
                x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
            static = getattr(base, "static_padding", None)  # "same"-padding subclasses (EfficientNet) pad in forward
            if isinstance(static, nn.Module):
                x = static(x)
            return F.conv2d(x, kernels, None, base.stride, padding, base.dilation)
        if self.kind == "embedding":
            return F.embedding(x, W.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                               base.sparse)
        return F.linear(x, W)

    def expand(self, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """B (out, r) applied to the rank-r path h: a 1x1 convolution for Conv2d."""
        return F.conv2d(h, B[:, :, None, None]) if self.kind == "conv2d" else F.linear(h, B)

    def per_output(self, v: torch.Tensor) -> torch.Tensor:
        """A vector over output features shaped to broadcast over the output (channels are dim 1 of a conv)."""
        return v[:, None, None] if self.kind == "conv2d" else v

    def lora_input(self, x: torch.Tensor, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        # An Embedding's input is token ids: no dropout, no cast (as PEFT).
        return x if self.kind == "embedding" else dropout(x.to(dtype))

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
        return W.to(torch.promote_types(self.compute_dtype, torch.float32))

    def _store(self, W: torch.Tensor) -> torch.Tensor:
        """W (out, in) back in the base layer's layout and dtype (a quantized layer's: plain, in its compute dtype)."""
        if self.kind == "conv2d":
            return W.reshape(self.weight.shape).to(self.weight.dtype)
        return (W.T if self.kind in ("conv1d", "embedding") else W).to(self.compute_dtype)

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
        if self.quantized:  # refused, not approximated: see quantized.merge_refusal (model.merge names the layers)
            raise ValueError(quantized.merge_refusal([f"a {type(self.base_layer).__name__}"]))
        self.weight.copy_(self._store(self.lora[name].merge(self._exact(self.base_weight()))))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge, last first."""
        while self.merged_adapters:
            adapter = self.lora[self.merged_adapters.pop()]
            self.weight.copy_(self._store(adapter.unmerge(self._exact(self.base_weight()))))

    def extra_repr(self) -> str:
        return (f"{self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"merged={self.merged_adapters}")


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
