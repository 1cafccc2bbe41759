"""Quantized base layers (QLoRA): the one place that knows how a quantized weight is stored.

replora adapts bitsandbytes' `Linear4bit` (NF4 and FP4, any compute dtype) and `Linear8bitLt`, as transformers'
`BitsAndBytesConfig(load_in_4bit=True)` / `load_in_8bit=True` load them. Such a layer stays as it was (packed,
frozen, its own forward); the adapter's factors are float32 tensors (methods/base.like), and
whatever needs W0 itself (DoRA's row norms, save_merged) reads it dequantized (`dequantize`).

bitsandbytes stays optional: nothing here imports it first. A bitsandbytes layer can only exist once bitsandbytes
is imported, so `sys.modules` says whether to look for one.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager

import torch
from torch import nn

# Class names of other libraries' quantized layers (GPTQ/AWQ/HQQ/quanto/torchao/FP8 ...), which store their weight
# in a layout replora cannot read: refused by name (`refusal`) rather than adapted wrongly or skipped silently.
QUANTIZED_NAME = re.compile(r"quant|4bit|8bit|int8|int4|nf4|fp4|fp8|gptq|awq|hqq|marlin|exllama|qlinear|bnb",
                            re.IGNORECASE)
WEIGHT_NAME = re.compile(r"(^|_)(q?weight|w_q)$", re.IGNORECASE)
SUPPORTED = "bitsandbytes Linear4bit (NF4, FP4) and Linear8bitLt layers"
FIX = ("load the base model unquantized, or quantized with bitsandbytes (transformers' BitsAndBytesConfig("
       "load_in_4bit=True) or load_in_8bit=True), whose linear layers replora adapts")


def _bnb_classes() -> tuple[type, ...]:
    if sys.modules.get("bitsandbytes") is None:  # never imported (or blocked): no layer of it can exist
        return ()
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a quantized layer replora adapts (bitsandbytes Linear4bit or Linear8bitLt)."""
    classes = _bnb_classes()
    return bool(classes) and isinstance(module, classes)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype W0 is dequantized to, and save_merged writes: the 4-bit layer's compute dtype (its matmuls run
    in it; float32 when transformers left it unset), float32 for an 8-bit layer (whose int8 weight names no
    float dtype)."""
    weight = module.weight
    if weight.is_floating_point():  # not quantized (yet): e.g. Linear8bitLt(has_fp16_weights=True)
        return weight.dtype
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def unpack(module: nn.Module) -> None:
    """A Linear4bit's weight back in the layout bitsandbytes saves, if it was repacked for its CPU kernel.

    bitsandbytes (on a CPU with AVX512-BF16) repacks a Linear4bit's weight in place at its first forward in eval
    mode without grad. Its matmul then takes a kernel whose backward gives the input no gradient (so every adapter
    before it stops learning), and dequantize_4bit cannot read that layout. bitsandbytes' own state_dict undoes
    the repacking the same way."""
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


CPU_PACKING, HELD = "support_avx512bf16_for_cpu", "_replora_held_cpu_packing"


def hold_layouts(model: nn.Module) -> None:
    """While a model is adapted, none of its 4-bit layers (targets or not) is repacked for bitsandbytes' CPU kernel
    (see unpack): gradients reach every adapter in eval-then-train loops, outputs do not depend on whether the
    model was evaluated before, and the base weights stay as they are (a repacking before inject, undone here, has
    already rounded the layer's absmax to bfloat16: bitsandbytes' doing). unload lets bitsandbytes repack again."""
    for module in model.modules():
        if is_quantized(module):
            unpack(module)
            if module.__dict__.get(CPU_PACKING):
                module.__dict__[HELD] = True
                setattr(module, CPU_PACKING, False)


def release_layouts(model: nn.Module) -> None:
    for module in model.modules():
        if module.__dict__.pop(HELD, False):
            setattr(module, CPU_PACKING, True)


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """W0 of a quantized layer as an (out, in) tensor in its compute dtype: what the layer's forward multiplies
    by (up to its own rounding), so DoRA's norms and save_merged see the weight that was trained on."""
    import bitsandbytes as bnb  # present: `module` is one of its layers

    weight = module.weight
    if weight.is_floating_point():
        return weight.detach().to(compute_dtype(module))
    if isinstance(module, bnb.nn.Linear4bit):
        unpack(module)
        W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        # Int8 rows with one absmax scale each (SCB), kept on the weight and, once it ran, the layer's state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        W = bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    return W.reshape(module.out_features, module.in_features).to(compute_dtype(module))


def refusal(module: nn.Module) -> str | None:
    """Why `module` is a quantized layer replora cannot adapt, or None: another library's quantized layer, or a
    bitsandbytes one other than Linear4bit / Linear8bitLt (Embedding4bit, ...)."""
    if is_quantized(module):
        return None
    weight = getattr(module, "weight", None)
    stored_as_int = any(WEIGHT_NAME.search(name) and not t.is_floating_point() and t.dim() >= 1
                        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
    floating = isinstance(weight, torch.Tensor) and weight.is_floating_point()
    if not stored_as_int and (floating or not QUANTIZED_NAME.search(type(module).__name__)):
        return None
    cls = type(module)
    return (f"it is a quantized layer ({cls.__module__}.{cls.__qualname__}) whose weight replora cannot read; "
            f"replora adapts {SUPPORTED}: {FIX}")


def refuse_training(path: str, module: nn.Module) -> None:
    """modules_to_save trains a copy of the module in full: a quantized one has integer weights that cannot."""
    packed = [type(m).__name__ for m in module.modules() if is_quantized(m) or refusal(m)]
    if packed:
        leaf = path.rsplit(".", 1)[-1]
        raise ValueError(f"modules_to_save entry {path!r} is quantized ({packed[0]}), and quantized weights cannot be "
                         "trained; load the model with the module left unquantized, e.g. BitsAndBytesConfig(..., "
                         f"llm_int8_skip_modules=[{leaf!r}]) (it applies to 4-bit loading too)")


def merge_refusal(paths: list[str]) -> str:
    shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
    # Not exact, so refused: W0 + dW stored back in 4 or 8 bits is rounded to the quantization grid, which would
    # change the trained model silently (and unmerge could not restore W0).
    return (f"cannot merge into quantized layers ({shown}): the merged weight would be requantized, which "
            "rounds away part of the trained update and changes the model. Use replora.save_merged(model, "
            "folder), which writes the merged model in the compute dtype from the dequantized weights, or load "
            "the base model unquantized to merge in place")


def dequantized_state_dict(state_dict: dict[str, torch.Tensor],
                           layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """`state_dict` (a plain model's keys) with the quantized layers `layers` ({path: bitsandbytes layer}) stored
    as plain ones: `<path>.weight` dequantized in the compute dtype and `<path>.bias`, nothing of the
    quantization's own (absmax, quant_map, SCB ...)."""
    for path, layer in layers.items():
        prefix = f"{path}."
        for key in [k for k in state_dict if k.startswith(prefix) and k != f"{prefix}bias"]:
            del state_dict[key]
        state_dict[f"{prefix}weight"] = dequantize(layer)
    return state_dict


@contextmanager
def saved_unquantized(model: nn.Module):
    """Within this block transformers' save_pretrained writes `model` as a plain model: without its quantizer
    (which would replace the state dict given with the quantized one) and without quantization_config."""
    config = getattr(model, "config", None)
    quantizer = model.__dict__.get("hf_quantizer", None)
    had_config = config is not None and "quantization_config" in config.__dict__
    saved_config = config.__dict__.pop("quantization_config") if had_config else None
    if quantizer is not None:
        model.hf_quantizer = None
    try:
        yield model
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = saved_config


def prepare_for_quantized_training(model: nn.Module, gradient_checkpointing: bool = True,
                                   gradient_checkpointing_kwargs: dict | None = None,
                                   heads: tuple[str, ...] = ("classifier", "score")) -> nn.Module:
    """Make a (quantized) base model ready to train an adapter on, as PEFT's prepare_model_for_kbit_training does;
    call it before or after replora.inject. Returns the model.

    - Normalisation layers (LayerNorm, RMSNorm, ... and any module whose class name ends in "Norm") and the
      classification head (`heads`: modules of these names, e.g. a SequenceClassification model's `score`,
      newly initialised and trained with the adapter through modules_to_save) get float32 parameters: in 16 bits
      their small updates and statistics are lost to rounding. So does an unquantized LM head (the model's output
      embeddings), which reads the float32 final norm's output: left in 16 bits its matmul would refuse the mix.
      Quantized weights and the input embeddings stay as they are (upcasting those would cost the memory
      quantization saved; an LM head tied to the input embeddings is one tensor, upcast with it).
    - gradient_checkpointing=True: turns on transformers' activation checkpointing (gradient_checkpointing_kwargs
      go to it) and makes the input embeddings' output require grad. With the whole base frozen, a checkpointed
      block would otherwise get inputs without grad, and reentrant checkpointing then gives its adapters no
      gradient at all.
    Nothing is frozen or unfrozen here: replora.inject freezes the base model.
    """
    heads = tuple(heads)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)) or \
            type(module).__name__.endswith("Norm")
        is_head = leaf in heads or any(f".{h}." in f".{name}." for h in heads) or (
            output is not None and module is output)
        if not (is_norm or is_head) or is_quantized(module):
            continue
        for param in module.parameters(recurse=is_head):
            if param.is_floating_point() and param.dtype != torch.float32 and not is_quantized_param(param):
                param.data = param.data.float()
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5's name
        if enable is not None:
            enable(gradient_checkpointing_kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable (it is not a transformers "
                             "model): pass gradient_checkpointing=False and checkpoint its blocks yourself")
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def values_in(param: torch.Tensor) -> int:
    """How many values a parameter holds: a packed 4-bit weight holds two a byte."""
    if type(param).__name__ == "Params4bit" and not param.is_floating_point():
        return param.numel() * param.element_size() * 2
    return param.numel()


def is_quantized_param(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")
