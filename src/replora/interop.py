"""Interoperability: every method exported as a standard PEFT LoRA (or DoRA) adapter, PEFT adapters
imported, and the merged model saved as a plain transformers folder.

Every method reduces to plain LoRA factors after training (docs/methods.md): MoSLoRA's A' = M A and
RepLoRA's generated (A_t, B_t) are written as lora_A / lora_B, so PEFT, vLLM and friends serve them
at LoRA's cost.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from . import quantized
from .config import AdapterConfig
from .layer import AdaptedLayer
from .methods import export_form
from .model import adaptable_layers, adapted_layers, get_config, require_adapter, saved_modules, shared_modules, walk
from .saving import (CONFIG_NAME, base_model_name, load_tensors, read_adapter_files, task_type, write_adapter_folder,
                     write_folder)
from .version import __version__

PEFT_PREFIX = "base_model.model."
# PEFT LoraConfig options that change what the file means; import refuses them unless at their default.
PEFT_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
                    "lora_bias": False, "bias": "none", "use_qalora": False, "target_parameters": None,
                    "trainable_token_indices": None, "layer_replication": None, "exclude_modules": None,
                    "alora_invocation_tokens": None, "use_bdlora": None}


def _shortest_suffixes(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest name suffixes that select exactly `targets` among the model's adaptable layers
    (["query", "value"] rather than every full path), as PEFT users and servers expect."""
    layers = list(adaptable_layers(model))
    wanted = set(targets)
    for depth in range(1, max(n.count(".") for n in targets) + 2):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in targets})
        if {n for n in layers if any(n == s or n.endswith("." + s) for s in suffixes)} == wanted:
            return suffixes
    return sorted(targets)


def export_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write an adapter (default: the active one) as a PEFT LoRA adapter folder that
    `peft.PeftModel.from_pretrained(base_model, path)` loads with no missing or unexpected keys."""
    name = require_adapter(model, adapter_name)
    config = get_config(model, name)
    form = export_form(config.method)
    if form is None:
        raise ValueError(f"method {config.method!r} states that its adapters are neither LoRA nor DoRA factors "
                         "(exports_as = None), so PEFT cannot load them as they compute; save it with "
                         "replora.save_adapter, or merge it (replora.save_merged)")
    layers = {p: layer for p, layer in adapted_layers(model).items() if name in layer.lora}
    kinds = {layer.fan_in_fan_out for layer in layers.values() if layer.kind in ("linear", "conv1d")}
    if len(kinds) > 1:
        conv = sorted(p for p, layer in layers.items() if layer.kind == "conv1d")[:2]
        linear = sorted(p for p, layer in layers.items() if layer.kind == "linear")[:2]
        raise ValueError("PEFT cannot express this adapter: its targets mix transformers Conv1D layers "
                         f"({', '.join(conv)}) and nn.Linear layers ({', '.join(linear)}), but PEFT's "
                         "fan_in_fan_out is one flag per adapter; export an adapter whose targets are all of one kind")
    odd = [p for p, layer in layers.items() if layer.kind == "conv2d" and (
        set(layer.base_layer.dilation) != {1} or layer.base_layer.padding_mode != "zeros"
        or type(layer.base_layer).forward is not nn.Conv2d.forward)]
    if odd:
        raise ValueError(f"PEFT cannot express this adapter: PEFT's Conv2d LoRA ignores the dilation and padding mode "
                         f"of {', '.join(odd[:3])} (and any padding a Conv2d subclass adds in its forward), so it "
                         "would compute another update; save it with replora.save_adapter, or merge it "
                         "(replora.save_merged), or leave these layers out of target_modules")
    tensors = {}
    with torch.no_grad():
        for p, layer in layers.items():
            adapter = layer.lora[name]
            tensors.update({f"{PEFT_PREFIX}{p}.{key}": t for key, t in _peft_tensors(layer, adapter, form).items()})
        saved = {p: m.copies[name] for p, m in saved_modules(model).items() if name in m.copies}
        for p, module in saved.items():
            for pname, param in module.named_parameters():
                tensors[f"{PEFT_PREFIX}{p}.{pname}"] = param
    peft_config = {
        "peft_type": "LORA", "task_type": task_type(model), "base_model_name_or_path": base_model_name(model),
        "r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora, "use_dora": form == "dora",
        "target_modules": _shortest_suffixes(model, list(layers)), "fan_in_fan_out": kinds == {True},
        "modules_to_save": sorted(saved) or None, "bias": "none", "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }
    meta = {"format": "pt", "exported_by": f"replora {__version__}", "replora_method": config.method}
    return write_adapter_folder(path, tensors, peft_config, meta)


def _peft_tensors(layer: AdaptedLayer, adapter, form: str) -> dict[str, torch.Tensor]:
    """One target's tensors in PEFT's names and shapes: a Conv2d's factors are convolution kernels
    (A: (r, in_channels, kh, kw), B: (out, r, 1, 1)), an Embedding's are lora_embedding_A / _B; a "dora"
    form adds the magnitude."""
    A, B = adapter.factors()
    magnitude = adapter.lora_magnitude if form == "dora" else None
    if layer.kind == "embedding":
        tensors = {"lora_embedding_A": A, "lora_embedding_B": B}
    elif layer.kind == "conv2d":
        tensors = {"lora_A.weight": A.reshape(A.shape[0], *layer.weight.shape[1:]), "lora_B.weight": B[:, :, None, None]}
        magnitude = None if magnitude is None else magnitude.view(1, -1, 1, 1)
    else:
        tensors = {"lora_A.weight": A, "lora_B.weight": B}
    if magnitude is not None:
        tensors["lora_magnitude_vector"] = magnitude
    return tensors


def import_peft(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT LoRA or DoRA adapter folder into `model` as a replora adapter (to continue training
    it here, or to compare). On any error the model is left as it was."""
    data, tensors = read_adapter_files(path)
    where = Path(path) / CONFIG_NAME
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type is {data.get('peft_type')!r}; import_peft reads PEFT LoRA and DoRA "
                         "adapters (peft_type 'LORA')")
    for option, default in PEFT_UNSUPPORTED.items():
        value = data.get(option, default)
        if value != default and value not in (None, {}, [], False):
            raise ValueError(f"{where}: option {option}={data[option]!r} has no replora equivalent; "
                             "replora imports LoRA/DoRA adapters with one rank and alpha for every target")
    saved = data.get("modules_to_save")
    if saved:  # PEFT lists both "classifier" and "score" for every SEQ_CLS adapter, and skips what a model lacks
        names = [n for n, _ in model.named_modules()]
        saved = [k for k in saved if any(n == k or n.endswith("." + k) for n in names)
                 or any(f".{k}." in f".{key}" for key in tensors)] or None
    try:
        config = AdapterConfig(method="dora" if data.get("use_dora") else "lora", r=data["r"],
                               lora_alpha=data.get("lora_alpha", 8), lora_dropout=data.get("lora_dropout", 0.0),
                               target_modules=data.get("target_modules"), use_rslora=data.get("use_rslora", False),
                               modules_to_save=saved)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    renamed, file_keys = {}, {}
    for key, tensor in tensors.items():
        ours = _from_peft_key(key)
        if ours.endswith((".lora_A", ".lora_B")) and tensor.dim() == 4:  # a Conv2d's kernels: (out, in) here
            tensor = tensor.flatten(1)
        elif ours.endswith(".lora_magnitude"):
            tensor = tensor.flatten()  # (1, out, 1, 1) for a Conv2d
        renamed[ours], file_keys[ours] = tensor, key
    tables = _embedding_tables(model, renamed, where)
    load_tensors(model, config, renamed, adapter_name, source=str(path), file_keys=file_keys)
    with torch.no_grad():
        for module, table in tables:
            module.weight.copy_(table)
    return model


def _embedding_tables(model: nn.Module, renamed: dict[str, torch.Tensor], where: Path) -> list:
    """PEFT saves the whole table of a targeted embedding (`<path>.base_layer.weight`), for vocabularies
    resized before training; taken out of `renamed`, checked, and returned as (embedding, table) to load
    after the adapter (the same table as the model's, the usual case, changes nothing)."""
    tables = []
    for key in [k for k in renamed if k.endswith(".base_layer.weight")]:
        path = key[: -len(".base_layer.weight")]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # check_match names it as unexpected
        module = getattr(module, "base_layer", module)
        table = renamed.pop(key)
        if not isinstance(module, nn.Embedding):
            raise ValueError(f"{where}: the file holds base weights for {path}, which is not an embedding")
        if table.shape != module.weight.shape:
            raise ValueError(f"{where}: the adapter was trained with a {tuple(table.shape)} token table for {path}, "
                             f"this model's is {tuple(module.weight.shape)}; resize the model's token embeddings "
                             "(model.resize_token_embeddings) to match first")
        tables.append((module, table))
    return tables


def _from_peft_key(key: str) -> str:
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    key = re.sub(r"\.lora_([AB])(?:\.[^.]+)?\.weight$", r".lora_\1", key)
    key = re.sub(r"\.lora_embedding_([AB])(?:\.[^.]+)?$", r".lora_\1", key)
    return re.sub(r"\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$", ".lora_magnitude", key)


def merged_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict the plain model would have after unload(merge=True) with this adapter active,
    computed without changing `model`. Quantized layers (bitsandbytes) are written as plain ones, dequantized
    in their compute dtype, and the adapter is merged into the dequantized weights: the model that was trained."""
    name = require_adapter(model, adapter_name)
    layers, saved = adapted_layers(model), saved_modules(model)
    shared = tuple(f"{path}.lora_shared.".lstrip(".") for path in shared_modules(model))
    plain = {}
    for key, tensor in model.state_dict().items():
        if key.startswith(shared):
            continue  # RepLoRA's seeds and generators: folded into the merged weights
        owner = _owner(key, layers, saved)
        if owner is None:
            plain[key] = tensor
            continue
        path, wrapper = owner
        rest = key[len(path) + 1:]
        # An adapted layer keeps its base layer's tensors; a saved module, the adapter's own copy.
        if isinstance(wrapper, AdaptedLayer):
            keep = "base_layer."
        else:
            keep = f"copies.{name}." if name in wrapper.copies else "original_module."
        if rest.startswith(keep):
            plain[f"{path}.{rest[len(keep):]}"] = tensor
    packed = {p: m for p, m in walk(model) if quantized.is_quantized(m)}
    packed.update({p: layer.base_layer for p, layer in layers.items() if layer.quantized})
    quantized.dequantized_state_dict(plain, packed)
    for path, layer in layers.items():
        if name in layer.lora and name not in layer.merged_adapters:
            plain[f"{path}.weight"] = layer.merged_weight(name)
    return plain


def _owner(key: str, layers: dict, saved: dict):
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix, layers[prefix]
        if prefix in saved:
            return prefix, saved[prefix]
    return None


def save_merged(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None, tokenizer=None,
                **kwargs) -> Path:
    """Save the model with an adapter (default: the active one) merged in, as a plain transformers folder
    that `AutoModel...from_pretrained(path)` loads with no replora installed. `model` is not changed.
    `tokenizer` (a tokenizer or processor: anything with save_pretrained) is written into the same folder, so
    `AutoTokenizer.from_pretrained(path)` and pipelines run from the folder alone; without it the folder holds the
    model only. Extra keyword arguments go to the model's `save_pretrained`. A quantized model (bitsandbytes) is
    written unquantized: the adapter merged into the dequantized weights, in the compute dtype, with no
    quantization_config."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged needs a transformers model (with save_pretrained), got {type(model).__name__}; "
                        "for a plain PyTorch model use replora.unload(model) and torch / safetensors directly")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"save_merged(tokenizer=...) takes a tokenizer or processor (with save_pretrained), got "
                        f"{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(...) first")
    state_dict = merged_state_dict(model, adapter_name)
    # The class's method: the model's own save_pretrained writes the adapter alone (trainer.AdapterSavePretrained).
    save = type(model).save_pretrained

    def write(folder):
        with quantized.saved_unquantized(model):  # else transformers saves the quantized state dict instead of ours
            save(model, folder, state_dict=state_dict, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return write_folder(path, write)
