"""transformers' Trainer and TRL's trainers on a model with a replora adapter, with no extra code from the user.

After inject, a transformers model's `save_pretrained` writes what save_adapter writes (AdapterSavePretrained),
so save_model and every checkpoint are adapter-only folders, and Trainer learns to resume from, and load the
best of, such folders (patch_trainer). unload gives the model its own save_pretrained back.

inject and unload call this module for transformers models only (importing it there: it builds on saving.py,
which builds on model.py); importing replora changes nothing in transformers. The one patch is patch_trainer's:
two private Trainer methods, wrapped once per process on the first inject, checked against the installed
transformers (trainer_api_problem) and left alone, with a warning, where they have changed.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from .model import active_adapter, adapter_state
from .saving import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict, load_adapter, write_adapter

SAVE_ATTR = "save_pretrained"  # on a transformers model: an AdapterSavePretrained, an attribute of the object
# What save_pretrained writes for a whole transformers model: a folder with one of these is not adapter-only.
FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
# The private Trainer methods patch_trainer wraps, with the parameters the wrappers pass on.
PATCHED_METHODS = {"_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
                   "_load_best_model": ("self",)}


class AdapterSavePretrained:
    """`model.save_pretrained` of a transformers model while it has a replora adapter. inject sets it as an
    attribute of the model object (found before the class's method), unload removes it. It writes what
    save_adapter writes (the active adapter, its modules_to_save included), so transformers' Trainer and TRL's
    trainers, which save the model with save_pretrained in save_model and in every checkpoint, write
    adapter-only folders, as they do for a PEFT model. The class's own method stays reachable as
    `type(model).save_pretrained(model, ...)` (save_merged uses it).

    The model is held weakly, so a deleted model is freed at once (no reference cycle); a deep copy of the
    model gets one of its own, and a pickled model unpickles with one."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)

    def __call__(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                 state_dict: dict[str, torch.Tensor] | None = None, **kwargs) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for a model with a replora adapter; "
                             "save it, then upload the folder (huggingface_hub.upload_folder)")
        model = self._model()
        if model is None:
            raise ReferenceError("the model this save_pretrained belonged to no longer exists")
        if not is_main_process:
            return
        tensors = adapter_state_dict(model)
        if state_dict is not None:  # gathered by the caller (DeepSpeed ZeRO-3, FSDP): its values come first
            names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            tensors = {key: state_dict.get(names.get(id(p)), p) for key, p in tensors.items()}
        write_adapter(model, save_directory, None, tensors)

    def __deepcopy__(self, memo):
        model = self._model()
        return type(self)(memo.get(id(model), model))  # deepcopy(model) registers the copy before its attributes

    def __reduce__(self):
        return type(self), (self._model(),)


def attach_save_pretrained(model: nn.Module) -> None:
    """From now on (until unload) the model's save_pretrained writes the adapter: Trainer and TRL, which save
    with it, write adapter-only checkpoints."""
    model.__dict__[SAVE_ATTR] = AdapterSavePretrained(model)


def detach_save_pretrained(model: nn.Module) -> None:
    """The class's save_pretrained again (a save_pretrained the user set on the object is left alone)."""
    if isinstance(model.__dict__.get(SAVE_ATTR), AdapterSavePretrained):
        del model.__dict__[SAVE_ATTR]


def patch_trainer() -> None:
    """Let transformers' Trainer (and TRL's trainers, its subclasses) resume from, and load the best of, the
    adapter-only checkpoints AdapterSavePretrained writes. Called by inject for transformers models.

    Trainer loads a checkpoint's adapter files only for a PEFT model (`isinstance(model, PeftModel)`); for any
    other model it looks for full weights (resume stops with "Can't find a checkpoint index", load_best_model_at_end
    with a missing pytorch_model.bin), and it offers no hook to change that. So, once per process, its two
    loading methods are wrapped: for a model with a replora adapter and a folder with an adapter and no full
    weights, the wrapper calls load_adapter (into the active adapter); in every other case the original runs.
    Where the installed transformers has other methods, nothing is patched and a warning says what is lost."""
    try:
        trainer = importlib.import_module("transformers.trainer")
    except ImportError:  # no transformers, or Trainer's own dependencies (accelerate) missing: no Trainer to patch
        return
    cls = trainer.Trainer
    if getattr(getattr(cls, "_load_from_checkpoint", None), "replora_patched", False):
        return
    problem = trainer_api_problem(cls)
    if problem:
        warnings.warn(f"replora: {problem}; Trainer(resume_from_checkpoint=...) and load_best_model_at_end cannot "
                      "read replora's adapter-only checkpoints with this transformers: load the checkpoint with "
                      "replora.load_adapter(model, folder) instead", stacklevel=3)
        return
    resume, load_best = cls._load_from_checkpoint, cls._load_best_model

    @functools.wraps(resume)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not load_checkpoint_adapter(self.model if model is None else model, resume_from_checkpoint):
            resume(self, resume_from_checkpoint, model)

    @functools.wraps(load_best)
    def _load_best_model(self):
        if getattr(self, "is_deepspeed_enabled", False) or not load_checkpoint_adapter(
                self.model, self.state.best_model_checkpoint):
            load_best(self)

    _load_from_checkpoint.replora_patched = _load_best_model.replora_patched = True
    cls._load_from_checkpoint, cls._load_best_model = _load_from_checkpoint, _load_best_model


def trainer_api_problem(cls) -> str | None:
    """What differs between transformers' Trainer and the methods patch_trainer wraps, or None."""
    for name, parameters in PATCHED_METHODS.items():
        method = getattr(cls, name, None)
        if method is None:
            return f"transformers' Trainer has no method {name}"
        found = tuple(inspect.signature(method).parameters)
        if found != parameters:
            return f"transformers' Trainer.{name} takes ({', '.join(found)}), not ({', '.join(parameters)})"
    return None


def load_checkpoint_adapter(model: nn.Module, folder: str | os.PathLike | None) -> bool:
    """If `model` has a replora adapter and `folder` holds an adapter and no full weights, load the adapter into
    the model's active adapter and return True; otherwise touch nothing and return False."""
    if folder is None or adapter_state(model) is None:
        return False
    folder = Path(folder)
    if not ((folder / CONFIG_NAME).is_file() or (folder / WEIGHTS_NAME).is_file()):
        return False
    if any((folder / name).exists() for name in FULL_MODEL_FILES):
        return False
    load_adapter(model, folder, active_adapter(model))
    return True

