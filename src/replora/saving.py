"""save_adapter / load_adapter: `adapter_config.json` + `adapter_model.safetensors`, written atomically.

Tensor names are the model's own parameter names without the adapter's name, so an adapter saved under
one name loads under any other:
  <target path>.lora_A / .lora_B / .lora_mixer / .lora_magnitude       per target layer
  <block path>.lora_shared.group.lora_A_seed / .generators.*          RepLoRA's seeds and generators
  <module path>.<param>                                                modules_to_save
adapter_config.json says which layout (`replora_format`, version.ADAPTER_FORMAT); files of format 1
(replora 0.1, no such key: RepLoRA's tensors under `replora.groups.*` / `replora.generators.*`) load too.

An adapted transformers model also saves and resumes this way under transformers' Trainer and TRL's trainers:
see trainer.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .legacy import format1_names, options_of_layout
from .files import write_folder  # noqa: F401 - part of this module's API since 0.1
from .model import (adapted_layers, adapter_state, add_adapter, delete_adapter, get_config, inject, require_adapter,
                    saved_modules, shared_modules, unload)
from .version import ADAPTER_FORMAT, __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _state(module: nn.Module):
    """(name, tensor) of a module's parameters and persistent buffers: what a method keeps is saved."""
    yield from module.named_parameters()
    for name, buffer in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield name, buffer


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (parameters and persistent buffers, and its modules_to_save), keyed as in the
    saved file."""
    name = require_adapter(model, adapter_name)
    tensors = {}
    for path, layer in adapted_layers(model).items():
        if name in layer.lora:
            tensors.update({f"{path}.{key}": t for key, t in _state(layer.lora[name])})
    for path, holder in shared_modules(model).items():
        if name in holder:
            tensors.update({f"{path}.lora_shared.{key}".lstrip("."): t for key, t in _state(holder[name])})
    for path, module in saved_modules(model).items():
        if name in module.copies:
            tensors.update({f"{path}.{key}": t for key, t in _state(module.copies[name])})
    return tensors


def write_adapter_folder(path, tensors: dict[str, torch.Tensor], config: dict, metadata: dict) -> Path:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_folder(path, write)


def base_model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


# PEFT's task types by the ending of a transformers class name. A saved adapter records its model's, as PEFT does,
# so that replora.from_pretrained loads the base model with the right head (the same table as interop.py's).
PEFT_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                   "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def task_type(model: nn.Module) -> str | None:
    """The PEFT task_type of the model's class, or None for a class PEFT has no task for (a bare encoder, an
    image classifier, a plain nn.Module)."""
    name = type(model).__name__
    return next((task for ending, task in PEFT_TASK_TYPES.items() if name.endswith(ending)), None)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> Path:
    """Write an adapter (default: the active one) to the folder `path`."""
    return write_adapter(model, path, adapter_name, adapter_state_dict(model, adapter_name))


def write_adapter(model: nn.Module, path, adapter_name: str | None, tensors: dict[str, torch.Tensor]) -> Path:
    """save_adapter's folder for the adapter `adapter_name` (None: the active one), with these tensors."""
    config = get_config(model, adapter_name)
    payload = {**config.to_dict(), "replora_version": __version__, "replora_format": ADAPTER_FORMAT,
               "base_model_name_or_path": base_model_name(model), "task_type": task_type(model)}
    meta = {"format": "pt", "replora_version": __version__, "replora_format": str(ADAPTER_FORMAT), "method": config.method}
    return write_adapter_folder(path, tensors, payload, meta)


def read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); restore it or save the adapter again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, found {type(data).__name__}")
    return data


def read_adapter_files(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The raw config dict and tensors of an adapter folder, checked to be readable."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"no adapter at {path}: {f.name} is missing (an adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    data = read_json(config_file)
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_file} is truncated or corrupted ({e}); restore it or save the adapter again") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_file}: tensor {key!r} has dtype {tensor.dtype}; adapter tensors are floating point")
    return data, tensors


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read and check a replora adapter folder without touching any model."""
    config, tensors, _ = _read(path)
    return config, tensors


# What adapter_config.json records beside the AdapterConfig: where and for what the adapter was made.
RECORDS = ("replora_version", "base_model_name_or_path", "task_type")

def _read(path) -> tuple[AdapterConfig, dict[str, torch.Tensor], int]:
    data, tensors = read_adapter_files(path)
    where = Path(path) / CONFIG_NAME
    if "peft_type" in data:
        raise ValueError(f"{where} is a Hugging Face PEFT adapter; load it with replora.import_peft")
    layout = data.pop("replora_format", 1)
    if layout not in range(1, ADAPTER_FORMAT + 1):
        raise ValueError(f"{where}: replora_format {layout!r} is newer than this replora ({__version__}) reads; "
                         "upgrade replora (pip install -U replora)")
    data = {k: v for k, v in data.items() if k not in RECORDS}
    data = {**options_of_layout(data.get("method", "lora"), layout), **data}
    try:
        config = AdapterConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config, tensors, layout


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a saved adapter into `model` under `adapter_name`: a plain base model is adapted first (as at
    save time); a model with other adapters gets this one added (set_adapter makes it run); a model
    that has this adapter with the same config gets its weights replaced (to resume training).
    Files of every replora release load. On any error the model is left as it was."""
    config, tensors, layout = _read(path)
    return load_tensors(model, config, tensors, adapter_name, source=str(path), layout=layout)


def load_tensors(model: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor], adapter_name: str,
                 source: str, file_keys: dict[str, str] | None = None, layout: int = ADAPTER_FORMAT) -> nn.Module:
    """Adapt `model` with `config` if needed, then copy `tensors` (keyed as adapter_state_dict, or as
    format `layout` wrote them) in."""
    state = adapter_state(model)
    if state is None:
        inject(model, config, adapter_name)
        undo = lambda: unload(model, merge=False)  # noqa: E731
    elif adapter_name not in state.configs:
        add_adapter(model, config, adapter_name)
        undo = lambda: delete_adapter(model, adapter_name)  # noqa: E731
    elif state.configs[adapter_name].to_dict() != config.to_dict():
        raise ValueError(f"the model's adapter {adapter_name!r} was built with a different config than {source}; "
                         "load it under another name, or into a fresh base model")
    else:
        undo = None
    try:
        expected = adapter_state_dict(model, adapter_name)
        if layout == 1:
            adapters = {p: layer.lora[adapter_name] for p, layer in adapted_layers(model).items()
                        if adapter_name in layer.lora}
            old = format1_names(config, adapters)
            expected = {old.get(id(param), key): param for key, param in expected.items()}
        check_match(expected, tensors, source, file_keys or {})
    except ValueError:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return model


def check_match(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source, file_keys: dict) -> None:
    def show(keys):
        keys = [file_keys.get(k, k) for k in keys]
        return f"{keys[:3]}{' ...' if len(keys) > 3 else ''}"

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = ([f"missing tensors {show(missing)}"] if missing else []) + (
            [f"unexpected tensors {show(unexpected)}"] if unexpected else [])
        raise ValueError(f"adapter {source} does not fit this model: {'; '.join(parts)}. Was it saved from a "
                         "different base model or with other target_modules?")
    for key, param in expected.items():
        if tuple(found[key].shape) != tuple(param.shape):
            raise ValueError(f"adapter {source} does not fit this model: tensor {file_keys.get(key, key)!r} has shape "
                             f"{tuple(found[key].shape)} in the file but {tuple(param.shape)} in the model; "
                             "the adapter was trained on a base model of other dimensions")
