"""A base model and its adapter in one call, from an adapter folder: the core of `replora.from_pretrained`.

Named as PEFT users look for it (`AutoPeftModelForCausalLM.from_pretrained(folder)`,
`PeftModel.from_pretrained(model, folder)`): one function for every task, which reads the task from the folder.
The base model is a transformers folder, a hub id or a model object; it is loaded with the transformers Auto class
of the adapter's task_type (PEFT's names) and a classification head as wide as the adapter's saved head.
Run folders of `replora train` and the names of the models it packages belong to the training app,
whose `replora.training.from_pretrained` (what `replora.from_pretrained` is) resolves them and then calls this.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .interop import PEFT_PREFIX, import_peft
from .saving import CONFIG_NAME, PEFT_TASK_TYPES, WEIGHTS_NAME, load_adapter, read_adapter_files

IMAGE_CLS = "IMAGE_CLS"  # not a PEFT task type: an image classifier (PEFT records none for it)
# The transformers Auto class of each task_type.
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel",
                IMAGE_CLS: "AutoModelForImageClassification"}
LABELLED = ("SEQ_CLS", "TOKEN_CLS", IMAGE_CLS)  # tasks whose head has one output per label
# The task of a transformers class, by the ending of its name: for a folder that records no task_type.
CLASS_TASKS = {**PEFT_TASK_TYPES, "ForImageClassification": IMAGE_CLS}


def from_pretrained(folder: str | os.PathLike, model: str | os.PathLike | nn.Module | None = None,
                    adapter_name: str = "default", *, task_type: str | None = None, **load_kwargs) -> nn.Module:
    """The base model with the adapter of `folder` loaded (as load_adapter loads it: ready to run, or to resume
    training; `replora.merge` it for inference at the base model's cost).

    folder: an adapter folder (replora's, or a PEFT LoRA / DoRA one).
    model: the base model to use instead of the folder's base_model_name_or_path: a transformers folder or a hub
      id; or a model object, which gets the adapter (PeftModel.from_pretrained).
    task_type: the task (PEFT's names), for adapter files that record none.
    load_kwargs: passed to transformers' from_pretrained (dtype=..., device_map=..., num_labels=...).
    """
    folder = Path(folder)
    if not ((folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()):
        raise FileNotFoundError(f"{folder} is not an adapter folder ({CONFIG_NAME} and {WEIGHTS_NAME}); give the "
                                "folder that save_adapter, Trainer.save_model or `replora train --output` wrote")
    config, tensors = read_adapter_files(folder)
    load = import_peft if "peft_type" in config else load_adapter
    if isinstance(model, nn.Module):
        if load_kwargs:
            raise TypeError(f"from_pretrained: loading options ({', '.join(load_kwargs)}) apply to a base model it "
                            "loads; load the model object with them yourself, or pass model= as a name")
        return load(model, folder, adapter_name)
    name = os.fspath(model) if model is not None else config.get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{folder} does not record its base model (base_model_name_or_path in {CONFIG_NAME}): pass "
                         "model= (the base model's folder or hub id, or the model itself)")
    where = f"model={name!r}" if model is not None else f"{name!r}, the base_model_name_or_path in {folder / CONFIG_NAME}"
    try:
        base_model = load_base(name, config, tensors, task_type, load_kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the base model is {where}: pass model= to load another)") from None
    return load(base_model, folder, adapter_name)


def load_base(path: str, config: dict, tensors: dict[str, torch.Tensor], task_type: str | None,
              load_kwargs: dict) -> nn.Module:
    """The transformers model at `path` (a folder or hub id) for the adapter's task, with a head of the adapter's
    width."""
    import transformers

    task = config.get("task_type") or task_type
    if task is not None and task not in AUTO_CLASSES:
        raise ValueError(f"{CONFIG_NAME}: task_type {task!r} is not one from_pretrained loads "
                         f"({', '.join(AUTO_CLASSES)}); load the base model yourself and call "
                         "replora.load_adapter(model, folder)")
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"cannot load model {path!r}: it is not a transformers model folder (no config.json)")
    with quiet_loading(path):
        try:
            base_config = transformers.AutoConfig.from_pretrained(path)
        except ValueError as e:
            raise FileNotFoundError(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from None
    task = task or task_of(base_config, config)
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = dict(load_kwargs)
    if task in LABELLED and "num_labels" not in kwargs:
        with quiet_loading(path):
            num_labels = head_width(auto, base_config, tensors)
        if num_labels is not None:  # a folder saved with another head size gets one of the adapter's size
            kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True, **kwargs}
    with quiet_loading(path):
        model = auto.from_pretrained(path, **kwargs)
    if task == "SEQ_CLS" and model.config.pad_token_id is None:  # a decoder classifier reads the last real token
        _pad_as_trained(model, path)
    return model


def task_of(base_config, config: dict) -> str:
    """The task of an adapter that records none (files of replora before task_type, image classifiers): the base
    model's class, else a classifier if the adapter trains a head in full, else bare features."""
    vision = getattr(base_config, "vision_config", None) is not None or hasattr(base_config, "num_channels")
    for architecture in getattr(base_config, "architectures", None) or []:
        for ending, task in CLASS_TASKS.items():
            if architecture.endswith(ending):
                return task
    if config.get("modules_to_save"):
        return IMAGE_CLS if vision else "SEQ_CLS"
    return "FEATURE_EXTRACTION"


def head_width(auto, base_config, tensors: dict[str, torch.Tensor]) -> int | None:
    """The label count of the head the adapter saved: the model is built twice without weights (on the meta
    device), with 2 and 3 labels; the parameters whose shape changes are the head's, and the adapter's tensor for
    one of them has the label count as its first dimension. None when the adapter holds no head."""
    weights = {key.removeprefix(PEFT_PREFIX): t for key, t in tensors.items()}
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


@contextmanager
def quiet_loading(name: str):
    """Around transformers' from_pretrained: its progress bars and expected warnings ("newly initialized") off,
    and a model that cannot be read reported as one line."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def pad_with_eos(model: nn.Module, tokenizer) -> None:
    """Decoders often have no pad token: pad with EOS (a classifier reads the last real token, a causal LM's
    training masks padding out of the loss)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id


def _pad_as_trained(model: nn.Module, path: str) -> None:
    """A decoder classifier with no pad token: pad with its tokenizer's pad (or EOS) token, as replora train's
    load_model does; without a tokenizer in the folder the model is left as it is."""
    import transformers

    try:
        with quiet_loading(path):
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (FileNotFoundError, ValueError, KeyError):
        return
    pad_with_eos(model, tokenizer)
