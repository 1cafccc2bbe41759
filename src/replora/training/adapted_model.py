"""replora.from_pretrained: a base model and its adapter in one call, from the adapter's folder.

Named as PEFT users look for it (`AutoPeftModelForCausalLM.from_pretrained(folder)`,
`PeftModel.from_pretrained(model, folder)`): one function for every task, which reads the task from the folder.

The folder is an adapter folder (save_adapter, Trainer.save_model, export_peft or PEFT itself wrote it) or a run
folder of `replora train` (settings.json and adapter/), resolved as `replora eval --adapter` resolves it
(evaluation.model_and_adapter). The base model is the one the folder records (base_model_name_or_path, or the run's
model, a packaged name such as minilm or smollm2 included), or `model=`; it is loaded with the transformers Auto
class of the adapter's task_type (PEFT's names), a classification head as wide as the adapter's saved head.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..interop import PEFT_PREFIX, import_peft
from ..saving import CONFIG_NAME, PEFT_TASK_TYPES, WEIGHTS_NAME, load_adapter, read_adapter_files
from .evaluation import model_and_adapter
from .pretrained import _pad_with_eos, loading, resolve_model
from .settings import EvalSettings
from .vision_models import dinov2_small_path, load_image_classifier

IMAGE_CLS = "IMAGE_CLS"  # not a PEFT task type: an image classifier (PEFT records none for it)
# The transformers Auto class of each task_type.
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
                IMAGE_CLS: "AutoModelForImageClassification"}
LABELLED = ("SEQ_CLS", "TOKEN_CLS", IMAGE_CLS)  # tasks whose head has one output per label
# The task of a transformers class, by the ending of its name: for a folder that records no task_type.
CLASS_TASKS = {**PEFT_TASK_TYPES, "ForImageClassification": IMAGE_CLS}
GIVEN = "<the model given>"  # stands for a model object given as model=, whose name does not matter


def from_pretrained(folder: str | os.PathLike, model: str | os.PathLike | nn.Module | None = None,
                    adapter_name: str = "default", **load_kwargs) -> nn.Module:
    """The base model with the adapter of `folder` loaded (as load_adapter loads it: ready to run, or to resume
    training; `replora.merge` it for inference at the base model's cost).

    folder: an adapter folder (replora's, or a PEFT LoRA / DoRA one) or a run folder of `replora train`.
    model: the base model to use instead of the one the folder records: a transformers folder, a packaged name
      (minilm, smollm2, ...) or a hub id; or a model object, which gets the adapter (PeftModel.from_pretrained).
    load_kwargs: passed to transformers' from_pretrained (dtype=..., device_map=..., num_labels=...).
    """
    base, adapter, run, where = _locate(folder, model)
    config, tensors = read_adapter_files(adapter)
    load = import_peft if "peft_type" in config else load_adapter
    if isinstance(model, nn.Module):
        if load_kwargs:
            raise TypeError(f"from_pretrained: loading options ({', '.join(load_kwargs)}) apply to a base model it "
                            "loads; load the model object with them yourself, or pass model= as a name")
        return load(model, adapter, adapter_name)
    try:
        base_model = _load_base(base, config, tensors, run, load_kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the base model is {where}: pass model= to load another)") from None
    return load(base_model, adapter, adapter_name)


def _locate(folder, model) -> tuple[str, Path, dict, str]:
    """(base model name, adapter folder, the run's settings or {}, where the base model's name came from)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"replora.from_pretrained: {folder} does not exist; give the folder that save_adapter, "
                                "Trainer.save_model or `replora train --output` wrote")
    given = None if model is None else GIVEN if isinstance(model, nn.Module) else os.fspath(model)
    try:
        base, adapter, run = model_and_adapter(EvalSettings(adapter=str(folder), model=given))
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


def _load_base(name: str, config: dict, tensors: dict[str, torch.Tensor], run: dict, load_kwargs: dict) -> nn.Module:
    """The base model `name` for the adapter's task, with a head of the adapter's width."""
    import transformers

    task = config.get("task_type")
    if task is not None and task not in AUTO_CLASSES:
        raise ValueError(f"{CONFIG_NAME}: task_type {task!r} is not one from_pretrained loads "
                         f"({', '.join(AUTO_CLASSES)}); load the base model yourself and call "
                         "replora.load_adapter(model, folder)")
    weights = {key.removeprefix(PEFT_PREFIX): t for key, t in tensors.items()}
    if name == "efficientnet-lite0":  # a packaged image classifier, not a transformers model: its head is `classifier`
        head = weights.get("classifier.weight")
        return _packaged_image_classifier(name, None if head is None else head.shape[0], None, load_kwargs)
    path = str(dinov2_small_path()) if name == "dinov2-small" else resolve_model(name)
    with loading(name):
        try:
            base_config = transformers.AutoConfig.from_pretrained(path)
        except ValueError as e:
            raise FileNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    task = task or _task_of(run, base_config, config)
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = dict(load_kwargs)
    num_labels = None
    if task in LABELLED and "num_labels" not in kwargs:
        with loading(name):
            num_labels = _head_width(auto, base_config, weights)
        if num_labels is not None:  # a folder saved with another head size gets one of the adapter's size
            kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True, **kwargs}
    if task == IMAGE_CLS and run.get("image_size"):  # the run's own image size, as it trained
        return _packaged_image_classifier(name, num_labels, run["image_size"], load_kwargs)
    with loading(name):
        model = auto.from_pretrained(path, **kwargs)
    if task == "SEQ_CLS" and model.config.pad_token_id is None:  # a decoder classifier reads the last real token
        _pad_as_trained(model, path, name)
    return model


def _task_of(run: dict, base_config, config: dict) -> str:
    """The task of an adapter that records none (files of replora before task_type, image classifiers): the
    run's task, else the base model's class, else a classifier if the adapter trains a head in full."""
    vision = getattr(base_config, "vision_config", None) is not None or hasattr(base_config, "num_channels")
    if run.get("task") == "sft":
        return "CAUSAL_LM"
    if run.get("task") in ("classification", "multiple-choice"):
        return IMAGE_CLS if vision else "SEQ_CLS"
    for architecture in getattr(base_config, "architectures", None) or []:
        for ending, task in CLASS_TASKS.items():
            if architecture.endswith(ending):
                return task
    if config.get("modules_to_save"):
        return IMAGE_CLS if vision else "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def _head_width(auto, base_config, weights: dict[str, torch.Tensor]) -> int | None:
    """The label count of the head the adapter saved: the model is built twice without weights (on the meta
    device), with 2 and 3 labels; the parameters whose shape changes are the head's, and the adapter's tensor for
    one of them has the label count as its first dimension. None when the adapter holds no head."""
    shapes = []
    for labels in (2, 3):
        shape_config = copy.deepcopy(base_config)
        shape_config.num_labels = labels
        with torch.device("meta"):
            shell = auto.from_config(shape_config)
        shapes.append({key: tuple(p.shape) for key, p in shell.named_parameters()})
    for key, shape in shapes[0].items():
        if shape != shapes[1].get(key) and key in weights:
            return weights[key].shape[0]
    return None


def _packaged_image_classifier(name: str, num_labels: int | None, image_size: int | None, load_kwargs: dict):
    """The image classifier as `replora train` builds it (EfficientNet-Lite0, or a run's image size)."""
    if load_kwargs:
        raise ValueError(f"from_pretrained: {name!r} is built as replora train builds it, which takes no loading "
                         f"options ({', '.join(load_kwargs)}); call it without them, then move the model (.to(...))")
    if num_labels is None:
        raise ValueError(f"the adapter holds no classification head for {name!r}, so its label count is unknown; "
                         "load the base model yourself and call replora.load_adapter(model, folder)")
    return load_image_classifier(name, num_labels, image_size)[0]


def _pad_as_trained(model: nn.Module, path: str, name: str) -> None:
    """A decoder classifier with no pad token: pad with its tokenizer's pad (or EOS) token, as replora train's
    load_model does; without a tokenizer in the folder the model is left as it is."""
    import transformers

    try:
        with loading(name):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError, KeyError):
        return
    _pad_with_eos(model, tokenizer)
