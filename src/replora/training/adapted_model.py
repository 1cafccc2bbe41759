"""replora.from_pretrained: the core's from_pretrained (replora/auto.py) plus what the training app knows: run
folders of `replora train` (settings.json and adapter/) and the packaged model names (minilm, smollm2, ...,
dinov2-small and efficientnet-lite0, built as `replora train` builds them); and model_path, a packaged model's
folder for transformers' own from_pretrained.

The base model is the one the folder records (the run's model, or the adapter's base_model_name_or_path), or
`model=`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .. import auto
from ..saving import CONFIG_NAME, WEIGHTS_NAME, read_adapter_files
from .evaluation import model_and_adapter
from .pretrained import HEADS, quantized_loading, resolve_model
from .vision_models import dinov2_small_path, load_image_classifier

RUN_TASKS = {"sft": "CAUSAL_LM"}  # a run's task, for adapter files that record no task_type (classifiers save a head)


def from_pretrained(folder: str | os.PathLike, model: str | os.PathLike | nn.Module | None = None,
                    adapter_name: str = "default", **load_kwargs) -> nn.Module:
    """The base model with the adapter of `folder` loaded (as load_adapter loads it: ready to run, or to resume
    training; `replora.merge` it for inference at the base model's cost).

    folder: an adapter folder (replora's, or a PEFT LoRA / DoRA one) or a run folder of `replora train`.
    model: the base model to use instead of the one the folder records: a transformers folder, a packaged name
      (minilm, smollm2, ...) or a hub id; or a model object, which gets the adapter (PeftModel.from_pretrained).
    load_kwargs: passed to transformers' from_pretrained (dtype=..., device_map=..., num_labels=...).

    A run trained with `--quantize 4bit|8bit` gives its base model back quantized as the run loaded it (the model
    it trained, on this process's device, its head unquantized), unless load_kwargs has quantization_config: your
    own BitsAndBytesConfig, or None for the base model in full precision. (PEFT leaves quantization to the
    caller; a run folder records it, so the same model comes back.) The adapter then runs beside the quantized
    layers: `replora.merge` is refused there, `replora.save_merged` writes a full-precision merged model.
    """
    base, adapter, run, where = _locate(folder, model)
    if isinstance(model, nn.Module):
        return auto.from_pretrained(adapter, model, adapter_name, **load_kwargs)
    if "quantization_config" in load_kwargs:
        if load_kwargs["quantization_config"] is None:
            load_kwargs = {k: v for k, v in load_kwargs.items() if k != "quantization_config"}
    elif run.get("quantize"):
        loading = quantized_loading(run["quantize"], skip=HEADS if run.get("task") != "sft" else ())
        load_kwargs = {**loading, **load_kwargs}  # (a device_map given wins)
    config, tensors = read_adapter_files(adapter)
    try:
        if base == "efficientnet-lite0" or run.get("image_size"):  # built as the run built it
            built = _packaged_image_classifier(base, config, tensors, run.get("image_size"), load_kwargs)
            return auto.from_pretrained(adapter, built, adapter_name)
        path = str(dinov2_small_path()) if base == "dinov2-small" else resolve_model(base)
        base_model = auto.load_base(path, config, tensors, RUN_TASKS.get(run.get("task")), load_kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the base model is {where}: pass model= to load another)") from None
    return auto.from_pretrained(adapter, base_model, adapter_name)


def _locate(folder, model) -> tuple[str, Path, dict, str]:
    """(base model name, adapter folder, the run's settings or {}, where the base model's name came from)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"replora.from_pretrained: {folder} does not exist; give the folder that save_adapter, "
                                "Trainer.save_model or `replora train --output` wrote")
    given = None if model is None else "<the model given>" if isinstance(model, nn.Module) else os.fspath(model)
    try:
        base, adapter, run = model_and_adapter(str(folder), given)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} is neither an adapter folder ({CONFIG_NAME} and {WEIGHTS_NAME}) nor a run "
                                "folder of replora train (settings.json and adapter/)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder}: its settings.json or {CONFIG_NAME} is not valid JSON ({e}); restore it or "
                         "save the adapter again") from None
    except (KeyError, ValueError):
        raise ValueError(f"{folder} does not record its base model (base_model_name_or_path in {CONFIG_NAME}, or a "
                         "run's model in settings.json): pass model= (the base model's folder, a packaged name such as "
                         "minilm, or a hub id)") from None
    if given is not None:
        where = f"model={given!r}"
    elif run:
        where = f"{base!r}, the model in {folder / 'settings.json'}"
    else:
        where = f"{base!r}, the base_model_name_or_path in {adapter / CONFIG_NAME}"
    return base, adapter, run, where


def _packaged_image_classifier(name: str, config: dict, tensors: dict, image_size: int | None, load_kwargs: dict):
    """The image classifier as `replora train` builds it (EfficientNet-Lite0, or DINOv2 at a run's image size),
    with a head as wide as the adapter's."""
    from transformers import AutoConfig, AutoModelForImageClassification

    if load_kwargs:
        raise ValueError(f"from_pretrained: {name!r} is built as replora train builds it, which takes no loading "
                         f"options ({', '.join(load_kwargs)}); call it without them, then move the model (.to(...))")
    if name == "efficientnet-lite0":  # not a transformers model: its head is `classifier`
        head = {k.removeprefix(auto.PEFT_PREFIX): t for k, t in tensors.items()}.get("classifier.weight")
        num_labels = None if head is None else head.shape[0]
    else:
        path = dinov2_small_path() if name == "dinov2-small" else resolve_model(name)
        with auto.quiet_loading(name):
            num_labels = auto.head_width(AutoModelForImageClassification, AutoConfig.from_pretrained(path), tensors)
    if num_labels is None:
        raise ValueError(f"the adapter holds no classification head for {name!r}, so its label count is unknown; "
                         "load the base model yourself and call replora.load_adapter(model, folder)")
    return load_image_classifier(name, num_labels, image_size)[0]


def model_path(name: str) -> str:
    """The folder of a model, for transformers' `from_pretrained`: a packaged name (`minilm`, `smollm2`,
    `gemma3-270m`, `dinov2-small`; the GGUF-packaged ones are made into a plain folder in the cache once), a
    local transformers folder (checked), or a hub id (returned as given). For example
    `AutoModelForSequenceClassification.from_pretrained(model_path("minilm"), num_labels=2)`.
    `efficientnet-lite0` is a PyTorch package, not a transformers folder: it is refused with where to use it."""
    if name == "dinov2-small":
        return str(dinov2_small_path())
    if name == "efficientnet-lite0":
        raise ValueError("efficientnet-lite0 is packaged as PyTorch weights, not a transformers folder, so it has "
                         "no path to load: train it with `replora train --model efficientnet-lite0` and load the run "
                         "with replora.from_pretrained(run_folder)")
    return resolve_model(name)
