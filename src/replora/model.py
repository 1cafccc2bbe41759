"""Adding, merging and removing adapters: plain functions over a model's modules."""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager

from torch import nn

from . import quantized
from .config import AdapterConfig
from .layer import LINEAR_LAYERS, SUPPORTED_LAYERS, AdaptedLayer, SavedModule, SharedModules, unsupported_reason
from .methods import METHODS

STATE_ATTR = "replora_state"  # a plain attribute of the root model (no module, no tensors): see AdapterState
SHARED_ATTR = "lora_shared"  # the SharedModules child of a model module that holds what its targets share

# Tried in order when target_modules is None: the attention query/value projections of common families.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"),
                   ("query_key_value",), ("q", "v"))


class AdapterState:
    """What inject keeps on the root model, as a plain attribute: the adapters' configs, the active one,
    and the requires_grad flags unload restores. Not a module, so the model's children and state_dict are
    untouched; only adapted layers (and RepLoRA's shared modules) enter the model. (A transformers model
    also gets its own save_pretrained, which writes the adapter: see trainer.AdapterSavePretrained.)"""

    def __init__(self):
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.requires_grad_before: dict[str, bool] = {}
        # Per adapter, the parameters its method built frozen (ids): set_adapter keeps them frozen.
        self.frozen: dict[str, set[int]] = {}


def adapter_state(model: nn.Module) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    return state if isinstance(state, AdapterState) else None


def walk(module: nn.Module, prefix: str = ""):
    """(path, module) for the model's own modules: not the insides of replora's wrappers."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (AdaptedLayer, SavedModule, SharedModules)):
            yield from walk(child, path)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in walk(model) if isinstance(m, AdaptedLayer)}


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {name: m for name, m in walk(model) if isinstance(m, SavedModule)}


def shared_modules(model: nn.Module) -> dict[str, SharedModules]:
    """{path of the holder: its SharedModules}; the root model's path is ""."""
    return {name.rpartition(".")[0]: m for name, m in walk(model) if isinstance(m, SharedModules)}


def _matches_suffix(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _some_names(names, n: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    found = {}
    names = [n for n, _ in walk(model)]
    for key in config.modules_to_save or []:
        hits = [n for n in names if _matches_suffix(n, key)]
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of the model; "
                             f"top-level modules are: {_some_names(n for n in names if '.' not in n)}")
        for n in hits:
            found[n] = model.get_submodule(n)
    return found


def find_targets(model: nn.Module, config: AdapterConfig, to_save: dict | None = None) -> dict[str, nn.Module]:
    """The layers config.target_modules names, in model order, outside modules_to_save; a clear error
    if there are none."""
    layers = adaptable_layers(model)
    to_save = find_modules_to_save(model, config) if to_save is None else to_save
    excluded = tuple(n + "." for n in to_save)
    layers = {n: m for n, m in layers.items() if not (n + ".").startswith(excluded)}
    spec = config.target_modules
    # Quantized layers replora cannot read (another library's) are refused wherever the spec would select them.
    refused = {n: why for n, m in walk(model) if (why := quantized.refusal(m)) and not (n + ".").startswith(excluded)}
    if spec is None:
        for keys in DEFAULT_TARGETS:
            if all(any(_matches_suffix(n, k) for n in layers) for k in keys):
                spec = list(keys)
                break
        else:
            _refuse_quantized(refused, [k for keys in DEFAULT_TARGETS for k in keys])
            raise ValueError("target_modules=None found no known query/value projection in this model; set "
                             f"target_modules explicitly, e.g. to some of: {_some_names(_suffixes(layers))}")
    if spec == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hits = {n: m for n, m in layers.items() if isinstance(getattr(m, "base_layer", m), LINEAR_LAYERS)
                and (output is None or not (m is output or getattr(m, "base_layer", None) is output))}
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"target_modules regex {spec!r} does not compile: {e}") from None
        hits = {n: m for n, m in layers.items() if pattern.fullmatch(n)}
    else:
        hits = {n: m for n, m in layers.items() if any(_matches_suffix(n, k) for k in spec)}
        for key in spec:
            if not any(_matches_suffix(n, key) for n in layers):
                others = [model.get_submodule(n) for n, _ in walk(model) if _matches_suffix(n, key)]
                reasons = [unsupported_reason(m) for m in others]
                why = (reasons[0] if reasons and reasons[0] else
                       f"it names {_kind_name(others[0])} modules; replora adapts {ADAPTABLE}" if others
                       else "it matches no module")
                raise ValueError(f"target_modules entry {key!r}: {why}. {_adaptable_names(_suffixes(layers))}")
    _refuse_quantized(refused, spec, model)
    if not hits:
        raise ValueError(f"target_modules {spec!r} matches no adaptable layer ({ADAPTABLE}). "
                         f"{_adaptable_names(layers)}")
    return hits


def _refuse_quantized(refused: dict[str, str], spec, model: nn.Module | None = None) -> None:
    if spec == "all-linear":  # every quantized layer but embeddings would have been a linear target
        chosen = [n for n in refused if "Embedding" not in type(model.get_submodule(n)).__name__]
    elif isinstance(spec, str):
        chosen = [n for n in refused if re.fullmatch(spec, n)]
    else:
        chosen = [n for n in refused if any(_matches_suffix(n, k) for k in spec)]
    if chosen:
        raise ValueError(f"cannot adapt {chosen[0]!r}: {refused[chosen[0]]}")


def _adaptable_names(names) -> str:
    names = list(names)
    if not names:
        return "This model has none (quantized layers must be dequantized first)"
    return f"Adaptable layers include: {_some_names(names)}"


def _kind_name(module: nn.Module) -> str:
    """A module's class as a user can tell it apart: the full path when the short name is that of a layer
    replora adapts (a quantized `Linear` is not an nn.Linear)."""
    cls = type(module)
    plain = {c.__name__ for c in SUPPORTED_LAYERS}
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__name__ in plain else cls.__name__


ADAPTABLE = "nn.Linear, transformers Conv1D, nn.Conv2d (not grouped) and nn.Embedding layers"


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{path: layer} of the layers an adapter can target (adapted ones included), in model order."""
    return {n: m for n, m in walk(model)
            if isinstance(m, AdaptedLayer) or (isinstance(m, SUPPORTED_LAYERS) and unsupported_reason(m) is None)}


def _suffixes(layers) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in layers})


def _require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise ValueError("this model has no replora adapter; call replora.inject(model, config) first")
    return state


def require_adapter(model: nn.Module, adapter_name: str | None) -> str:
    state = _require_state(model)
    name = state.active_adapter if adapter_name is None else adapter_name
    if not isinstance(name, str):  # (PEFT's set_adapter takes a list of adapters to run together)
        raise TypeError(f"give one adapter name, got {name!r}: one replora adapter is active at a time; to use "
                        "several at once, merge each into the weights (replora.merge(model, name)) and activate the last")
    if name not in state.configs:
        raise ValueError(f"this model has no adapter named {name!r}; its adapters are {', '.join(map(repr, state.configs))}")
    return name


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt `model` in place with `config`; freeze everything but the adapter and modules_to_save.

    All checks and module construction happen before the model is touched, so a failed call
    leaves the model as it was.
    """
    if adapter_state(model) is not None or adapted_layers(model):
        raise ValueError("this model already has a replora adapter; call replora.unload(model) first to start "
                         "again, replora.add_adapter(model, config, name) to add another, or "
                         "replora.load_adapter(model, path) to load weights into it")
    transformers_model = _is_transformers_model(model)
    if transformers_model:
        from . import trainer  # imported here: trainer.py builds on saving.py, which builds on this module

        trainer.patch_trainer()  # Trainer learns to resume from adapter-only checkpoints
    _add(model, config, adapter_name)
    set_adapter(model, adapter_name)
    if transformers_model:
        trainer.attach_save_pretrained(model)  # until unload, save_pretrained (so Trainer and TRL) writes the adapter
    return model


def _is_transformers_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded if `model` is a transformers model
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str) -> nn.Module:
    """Add another named adapter to an adapted model; it trains once made active with set_adapter."""
    state = _require_state(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter names are non-empty strings without dots, got {adapter_name!r}")
    if adapter_name in state.configs:
        raise ValueError(f"this model already has an adapter named {adapter_name!r}; pick another name or "
                         "call replora.delete_adapter(model, name) first")
    _add(model, config, adapter_name)
    set_adapter(model, state.active_adapter)  # the new adapter stays frozen until it is made active
    return model


def _add(model: nn.Module, config: AdapterConfig, adapter_name: str) -> None:
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected a replora.AdapterConfig, got {type(config).__name__}")
    config.validate()
    to_save = find_modules_to_save(model, config)
    targets = find_targets(model, config, to_save)
    for path in to_save:
        if path in targets or isinstance(to_save[path], AdaptedLayer):
            raise ValueError(f"module {path!r} is both an adapter target and in modules_to_save; choose one")
        quantized.refuse_training(path, to_save[path])
    # New modules follow the model's train/eval mode (an eval model must not start using dropout).
    layers = {path: base if isinstance(base, AdaptedLayer) else AdaptedLayer(base).train(base.training)
              for path, base in targets.items()}
    state = adapter_state(model) or AdapterState()
    adapters, shared = METHODS[config.method].build(config, layers, model)
    # Commit: from here on nothing can fail on user input.
    if adapter_state(model) is None:
        state.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        model.__dict__[STATE_ATTR] = state
        quantized.hold_layouts(model)  # bitsandbytes' CPU repacking would stop gradients: see quantized.unpack
    state.configs[adapter_name] = config
    state.frozen[adapter_name] = {id(p) for module in (*adapters.values(), *(m for parts in shared.values()
                                                                               for m in parts.values()))
                                  for p in module.parameters() if not p.requires_grad}
    for path, parts in shared.items():
        holder = model.get_submodule(path)
        if not isinstance(getattr(holder, SHARED_ATTR, None), SharedModules):
            setattr(holder, SHARED_ATTR, SharedModules())
        getattr(holder, SHARED_ATTR)[adapter_name] = nn.ModuleDict(parts).train(holder.training)
    for path, layer in layers.items():
        layer.add_adapter(adapter_name, adapters[path].train(layer.training))
        if layer is not targets[path]:
            _replace(model, path, layer)
    for path, module in to_save.items():
        if not isinstance(module, SavedModule):
            module = _replace(model, path, SavedModule(module).train(module.training))
        module.add_copy(adapter_name)


def _replace(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return module


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Make `adapter_name` the one that runs, trains, merges, saves and exports; the others are frozen, and so
    are the parameters its method built frozen."""
    name = require_adapter(model, adapter_name)
    state = _require_state(model)
    state.active_adapter = name
    frozen = state.frozen.get(name, set())
    modules = [(other, module) for wrapper in adapted_layers(model).values() for other, module in wrapper.lora.items()]
    modules += [(other, module) for wrapper in saved_modules(model).values() for other, module in wrapper.copies.items()]
    modules += [(other, module) for holder in shared_modules(model).values() for other, module in holder.items()]
    for wrapper in list(adapted_layers(model).values()) + list(saved_modules(model).values()):
        wrapper.active_adapter = name
    for other, module in modules:
        for param in module.parameters():
            param.requires_grad_(other == name and id(param) not in frozen)
    return model


def active_adapter(model: nn.Module) -> str:
    return _require_state(model).active_adapter


@contextmanager
def disable_adapters(model: nn.Module):
    """Within this block the model computes exactly what the base model computes."""
    _require_state(model)
    wrappers = list(adapted_layers(model).values()) + list(saved_modules(model).values())
    if any(getattr(w, "merged_adapters", None) for w in wrappers):
        raise ValueError("an adapter is merged into the base weights, so it cannot be switched off; "
                         "call replora.unmerge(model) first")
    before = [w.disabled for w in wrappers]
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for w, flag in zip(wrappers, before):
            w.disabled = flag


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove one named adapter; the model keeps the others (use unload to remove the last one). The active adapter
    is refused: the model would otherwise start running another adapter unasked; set_adapter another one first."""
    name = require_adapter(model, adapter_name)
    state = _require_state(model)
    if len(state.configs) == 1:
        raise ValueError(f"{name!r} is the model's only adapter; call replora.unload(model) to remove it")
    if state.active_adapter == name:
        other = next(n for n in state.configs if n != name)
        raise ValueError(f"adapter {name!r} is the active one: deleting it would leave the model running another "
                         f"adapter; make the one to run active first (replora.set_adapter(model, {other!r})), then "
                         "delete it")
    layers = adapted_layers(model)
    if any(name in layer.merged_adapters for layer in layers.values()):
        raise ValueError(f"adapter {name!r} is merged into the base weights; call replora.unmerge(model) first")
    for path, layer in layers.items():
        if name in layer.lora:
            del layer.lora[name]
            if not len(layer.lora):
                _replace(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():
        if name in module.copies:
            del module.copies[name]
            if not len(module.copies):
                _replace(model, path, module.original_module)
    _remove_shared(model, name)
    del state.configs[name]
    state.frozen.pop(name, None)
    return model


def merge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold an adapter (default: the active one) into the base weights: inference then costs what the
    base model costs."""
    name = require_adapter(model, adapter_name)
    _refuse_quantized_merge(model, name, "replora.merge")
    for layer in adapted_layers(model).values():
        layer.merge(name)
    return model


def _refuse_quantized_merge(model: nn.Module, name: str, action: str) -> None:
    """Before any layer changes: merging into a quantized layer is refused (quantized.merge_refusal says why)."""
    paths = [p for p, layer in adapted_layers(model).items() if layer.quantized and name in layer.lora
             and name not in layer.merged_adapters]
    if paths:
        raise ValueError(f"{action}: {quantized.merge_refusal(paths)}"
                         + ("; or unload(model, merge=False) for the base model" if action.endswith("unload") else ""))


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    _require_state(model)
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the plain model with no replora module left. merge=True: the active adapter merged into
    the weights and its trained modules_to_save in place; merge=False: the original base model.
    requires_grad flags are restored to what they were before inject."""
    state = _require_state(model)
    if merge:
        _refuse_quantized_merge(model, state.active_adapter, "replora.unload")
    for path, layer in adapted_layers(model).items():
        if merge:
            layer.merge(state.active_adapter)
        else:
            layer.unmerge()
        _replace(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():
        _replace(model, path, module.current() if merge else module.original_module)
    for name in state.configs:
        _remove_shared(model, name)
    del model.__dict__[STATE_ATTR]
    quantized.release_layouts(model)
    if _is_transformers_model(model):
        from .trainer import detach_save_pretrained  # imported here, as in inject

        detach_save_pretrained(model)  # the class's save_pretrained again
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    return model


def _remove_shared(model: nn.Module, adapter_name: str) -> None:
    for path, holder in shared_modules(model).items():
        if adapter_name in holder:
            del holder[adapter_name]
        if not len(holder):
            delattr(model.get_submodule(path), SHARED_ATTR)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once; a 4-bit weight counts its values,
    not the bytes they are packed in (two per byte)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(quantized.values_in(p) for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's line: trainable params, all params (the frozen base, the adapter and the trained copies of
    modules_to_save, each tensor once) and the trainable share."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")


def get_config(model: nn.Module, adapter_name: str | None = None) -> AdapterConfig:
    """The config of an adapter (default: the active one)."""
    return _require_state(model).configs[require_adapter(model, adapter_name)]
