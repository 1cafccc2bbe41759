"""What a method is: a module that sits on one target layer and produces that layer's factors (A, B).

A method is one subclass of `Method`, registered under its name (methods/__init__.py). It defines
  factors()          -> (A: (r, in), B: (out, r)), the only thing LoRA-like methods must write;
  options            its own AdapterConfig fields (name -> Option), validated and offered by the CLI;
  parameter_count()  its trainable parameters, as a formula (the invariant tests check it);
  build()            its adapters for all targets at once (RepLoRA needs them together);
and, for DoRA-like methods, its own forward rule (`forward`) and merge rule (`fold`, `merge`, `unmerge`).
The adapted layer (layer.py) calls these; it never asks which method it holds.

What a trained adapter *is* in the standard formats is stated, not guessed: `exports_as` (below). A
method that keeps LoRA's rules inherits "lora"; one that overrides a rule must say what it exports as.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# Annotations name AdapterConfig (config.py) and AdaptedLayer (layer.py) without importing them: both
# import this package, and methods need nothing from them but attributes.


@dataclass(frozen=True)
class Option:
    """A config field that one method reads: its default, its help (used by the CLI) and what it accepts."""

    default: Any
    help: str
    choices: tuple | None = None
    type: type = str  # str, int or float; None is allowed when the default is None

    def check(self, name: str, value: Any) -> None:
        if value is None and self.default is None:
            return
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(map(str, self.choices))}")
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{name} must be a number, got {value!r}")


def lora_A_init_(A: torch.Tensor) -> torch.Tensor:
    # LoRA's init (and PEFT's): kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    return nn.init.kaiming_uniform_(A, a=math.sqrt(5))


def like(layer: AdaptedLayer) -> dict:
    """New adapter tensors take the device and dtype of the layer they adapt; on a quantized layer, float32 whatever
    its compute dtype (as PEFT keeps them): in bfloat16 an AdamW step on a factor is often below its rounding."""
    return {"device": layer.base_layer.weight.device,
            "dtype": torch.float32 if layer.quantized else layer.compute_dtype}


class Method(nn.Module):
    """One adapter on one target layer: y = base(x) + s * B A dropout(x)."""

    name: ClassVar[str]
    summary: ClassVar[str]  # the update it makes, for help texts
    options: ClassVar[dict[str, Option]] = {}
    # What a trained adapter is in standard formats, read by every exporter through `export_form`:
    #   "lora"  plain factors (A, B): PEFT LoRA and llama.cpp's GGUF adapters carry it exactly;
    #   "dora"  the factors and a magnitude `lora_magnitude` (DoRA's rule): PEFT carries it (use_dora);
    #   None    neither: export_peft and export_gguf refuse it (save_adapter and save_merged still work).
    exports_as: ClassVar[str | None] = "lora"
    RULES: ClassVar[tuple[str, ...]] = ("forward", "update", "delta_weight", "fold", "merge", "unmerge")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        overridden = [rule for rule in Method.RULES if rule in cls.__dict__]
        if overridden and "exports_as" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} overrides {', '.join(overridden)}, so its adapters may not be plain LoRA "
                            "factors: state what they export as, exports_as = 'lora', 'dora' or None (exporters "
                            "refuse None)")
        if cls.__dict__.get("exports_as", "lora") not in ("lora", "dora", None):
            raise TypeError(f"{cls.__name__}.exports_as must be 'lora', 'dora' or None, got {cls.exports_as!r}")

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    # --- what a method defines ------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def build(cls, config: AdapterConfig, layers: dict[str, AdaptedLayer],
              model: nn.Module) -> tuple[dict[str, "Method"], dict[str, dict[str, nn.Module]]]:
        """The adapters of all targets ({path: adapted layer}, in model order), keyed by path, and the
        modules several targets share, by the path of the model module that should hold them, by name
        (RepLoRA's seeds and generators: methods/replora.py). Nothing is attached to the model here."""
        return {path: cls(config, layer) for path, layer in layers.items()}, {}

    @classmethod
    def parameter_count(cls, config: AdapterConfig, shapes: dict[str, tuple[int, int]]) -> int:
        """Trainable parameters on targets of these (in, out) shapes, keyed by path."""
        return sum(config.r * (i + o) for i, o in shapes.values())

    # --- the forward and merge rule: LoRA's, which DoRA-like methods override -----------------------
    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, shaped (out, in) like nn.Linear's weight."""
        A, B = self.factors()
        return (B * self.scaling) @ A

    def update(self, x: torch.Tensor, layer: AdaptedLayer,
               factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(s B A dropout(x), dropout(x), the factors used): the low-rank path every method shares, through
        the layer's own operation (a matmul, a convolution, an embedding lookup). `factors`: this forward's
        (A, B) if already asked for (asking twice would make RepLoRA generate its group again)."""
        A, B = self.factors() if factors is None else factors
        B = B * self.scaling  # (out, r): cheaper than scaling the (tokens, out) output
        dropped = layer.lora_input(x, self.dropout, A.dtype)
        return layer.expand(layer.apply_weight(dropped, A), B), dropped, (A, B)

    def forward(self, x: torch.Tensor, result: torch.Tensor, layer: AdaptedLayer) -> torch.Tensor:
        """The adapted layer's output, given its input x and the base layer's output `result`."""
        A, B = self.factors()
        if layer.kind in ("linear", "conv1d") and A.dtype == result.dtype:
            # result + s·(A x) Bᵀ as one addmm: the scaling rides on its alpha, and no (tokens, out) update
            # is made to be added (a training step's overhead over the frozen model is mostly such ops).
            h = layer.apply_weight(layer.lora_input(x, self.dropout, A.dtype), A)
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=self.scaling)
            return flat.view(result.shape)
        return result + self.update(x, layer, (A, B))[0].to(result.dtype)

    def fold(self, W: torch.Tensor) -> torch.Tensor:
        """W (out, in, in merge precision) with this adapter folded in; changes nothing."""
        return W + self.delta_weight().to(W.dtype)

    def merge(self, W: torch.Tensor) -> torch.Tensor:
        """fold(W), keeping whatever `unmerge` needs to undo it."""
        return self.fold(W)

    def unmerge(self, W: torch.Tensor) -> torch.Tensor:
        return W - self.delta_weight().to(W.dtype)
