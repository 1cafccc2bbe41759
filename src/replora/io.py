"""save_adapter / load_adapter: `adapter_config.json` + `adapter_model.safetensors`, written atomically.

Tensor names leave out the adapter's name, so an adapter saved under one name loads under any other:
  <target path>.lora_A / .lora_B / .lora_mixer / .lora_magnitude   per target layer
  replora.groups.<group>.lora_A_seed, replora.generators.<unit>.lora_A_generator.*   RepLoRA
  <module path>.<param>                                              modules_to_save
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import AdapterConfig
from .model import STATE_ATTR, adapted_layers, adapter_state, find_modules_to_save, get_config, inject, unload

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors (and its modules_to_save), keyed as in the saved file."""
    config = get_config(model, adapter_name)
    tensors = {}
    for path, layer in adapted_layers(model).items():
        for name, param in layer.lora[adapter_name].named_parameters():
            tensors[f"{path}.{name}"] = param
    bank = adapter_state(model).banks[adapter_name] if adapter_name in adapter_state(model).banks else None
    if bank is not None:
        for name, param in bank.named_parameters():
            tensors[f"{STATE_ATTR}.{name}"] = param
    for path, module in find_modules_to_save(model, config).items():
        for name, param in module.named_parameters():
            tensors[f"{path}.{name}"] = param
    return tensors


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the adapter to the folder `path`. A new folder appears whole or not at all; in an existing
    folder each file is replaced atomically, and other files there are left alone."""
    config = get_config(model, adapter_name)
    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model, adapter_name).items()}
    meta = {"format": "pt", "replora_version": __version__, "method": config.method}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.tmp-") as tmp:
        tmp = Path(tmp)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata=meta)
        payload = {**config.to_dict(), "replora_version": __version__,
                   "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        for f in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / f)
        if not path.exists():
            os.rename(tmp, path)  # the folder appears complete, in one step
            os.makedirs(tmp)  # left for the context manager to remove
        else:
            if not path.is_dir():
                raise NotADirectoryError(f"cannot save an adapter to {path}: it exists and is not a folder")
            for f in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / f, path / f)
    return path


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder without touching any model."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"no adapter at {path}: {f.name} is missing (an adapter folder holds "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}, as written by replora.save_adapter)")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}); restore it or save the adapter again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object, found {type(data).__name__}")
    data = {k: v for k, v in data.items() if k not in ("replora_version", "base_model_name_or_path")}
    try:
        config = AdapterConfig.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from None
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_file} is truncated or corrupted ({e}); restore it or save the adapter again") from None
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_file}: tensor {key!r} has dtype {tensor.dtype}; adapter tensors are floating point")
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Load a saved adapter into `model`: a plain base model is adapted first (as at save time); a model
    that already has this adapter with the same config gets its weights replaced (to resume training).
    On any error the model is left as it was."""
    config, tensors = read_adapter(path)
    state = adapter_state(model)
    injected_here = state is None
    if injected_here:
        inject(model, config, adapter_name)
    elif get_config(model, adapter_name).to_dict() != config.to_dict():
        raise ValueError(f"the model's adapter {adapter_name!r} was built with a different config than {path}; "
                         "call replora.unload(model) first, or load into a fresh base model")
    try:
        expected = adapter_state_dict(model, adapter_name)
        _check_match(expected, tensors, path)
    except ValueError:
        if injected_here:
            unload(model, merge=False)
        raise
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key])
    return model


def _check_match(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise ValueError(f"adapter {path} does not fit this model: {'; '.join(parts)}. Was it saved from a "
                         "different base model or with other target_modules?")
    for key, param in expected.items():
        if tuple(found[key].shape) != tuple(param.shape):
            raise ValueError(f"adapter {path} does not fit this model: tensor {key!r} has shape "
                             f"{tuple(found[key].shape)} in the file but {tuple(param.shape)} in the model; "
                             "the adapter was trained on a base model of other dimensions")
