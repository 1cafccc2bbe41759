"""Adding, merging and removing adapters: plain functions over a model's modules."""
from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager

from torch import nn

from .config import AdapterConfig
from .factors import GeneratedFactors, LoRAFactors, MoSLoRAFactors, RepLoRAGenerators, RepLoRAGroup
from .layer import SUPPORTED_LAYERS, AdaptedLayer, SavedModule

STATE_ATTR = "replora"  # the root model's child that holds configs and RepLoRA's shared generators

# Tried in order when target_modules is None: the attention query/value projections of common families.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("c_attn",), ("q_lin", "v_lin"),
                   ("query_key_value",), ("q", "v"))


class AdapterState(nn.Module):
    """What inject adds to the root model: configs, RepLoRA banks and what unload must restore."""

    def __init__(self):
        super().__init__()
        self.banks = nn.ModuleDict()  # adapter name -> RepLoRABank
        self.configs: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self.requires_grad_before: dict[str, bool] = {}


class RepLoRABank(nn.Module):
    """All RepLoRA parameters of one adapter: per-group seeds and the (possibly shared) generators."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleDict()
        self.generators = nn.ModuleDict()


def adapter_state(model: nn.Module) -> AdapterState | None:
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, AdapterState) else None


def walk(module: nn.Module, prefix: str = ""):
    """(path, module) for the model's own modules: not the insides of replora's wrappers."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not isinstance(child, (AdaptedLayer, SavedModule, AdapterState)):
            yield from walk(child, path)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in walk(model) if isinstance(m, AdaptedLayer)}


def saved_modules(model: nn.Module) -> dict[str, SavedModule]:
    return {name: m for name, m in walk(model) if isinstance(m, SavedModule)}


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
    layers = {n: m for n, m in walk(model) if isinstance(m, SUPPORTED_LAYERS + (AdaptedLayer,))}
    to_save = find_modules_to_save(model, config) if to_save is None else to_save
    excluded = tuple(n + "." for n in to_save)
    layers = {n: m for n, m in layers.items() if not (n + ".").startswith(excluded)}
    spec = config.target_modules
    if spec is None:
        for keys in DEFAULT_TARGETS:
            if all(any(_matches_suffix(n, k) for n in layers) for k in keys):
                spec = list(keys)
                break
        else:
            raise ValueError("target_modules=None found no known query/value projection in this model; set "
                             f"target_modules explicitly, e.g. to some of: {_some_names(_suffixes(layers))}")
    if spec == "all-linear":
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hits = {n: m for n, m in layers.items() if output is None or not (m is output or getattr(m, "base_layer", None) is output)}
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
                others = [n for n, _ in walk(model) if _matches_suffix(n, key)]
                why = (f"it names {type(model.get_submodule(others[0])).__name__} modules; replora adapts "
                       "nn.Linear and transformers Conv1D layers" if others else "it matches no module")
                raise ValueError(f"target_modules entry {key!r}: {why}. Adaptable layers include: "
                                 f"{_some_names(_suffixes(layers))}")
    if not hits:
        raise ValueError(f"target_modules {spec!r} matches no nn.Linear or Conv1D layer; layers that exist "
                         f"include: {_some_names(layers)}")
    return hits


def _suffixes(layers) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in layers})


def block_of(path: str) -> str | None:
    """The block a layer belongs to: the path up to its last numeric component
    ('encoder.layer.3.attention.self.query' -> 'encoder.layer.3'); None outside any block."""
    match = re.match(r"^((?:.*\.)?\d+)\.", path)
    return match.group(1) if match else None


def _key(path: str) -> str:
    return path.replace(".", "_") or "_"


def _build_replora(config: AdapterConfig, layers: dict[str, AdaptedLayer]):
    """Group the targets (METHODS.md), build seeds and generators; returns (bank, adapters)."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # group path -> role -> target path
    in_block: dict[str, bool] = {}
    for path in layers:
        block = block_of(path) if config.replora_sharing != "none" else None
        if block is None:  # no block (or no sharing): the target is a group of its own
            groups[path][path.rsplit(".", 1)[-1]] = path
        else:
            groups[block][path[len(block) + 1:]] = path
        in_block[block or path] = block is not None
    bank, adapters = RepLoRABank(), {}
    shared: dict[tuple, RepLoRAGenerators] = {}  # "model" sharing: one generator pair per block shape
    for group_path, members in groups.items():
        group_layers = {_key(role): layers[path] for role, path in members.items()}
        if len(group_layers) < len(members) or _key(group_path) in bank.groups:
            raise ValueError(f"module names under {group_path!r} collide once dots become underscores; "
                             "use replora_sharing='none' or target these layers in separate adapters")
        like = _like(next(iter(group_layers.values())).base_layer)
        in_sizes = {role: layer.in_features for role, layer in group_layers.items()}
        out_sizes = {role: layer.out_features for role, layer in group_layers.items()}
        # Project choice: a full seed is as wide as the group's widest input (A) and output (B).
        widths = ((config.r, config.r) if config.replora_seed == "diagonal"
                  else (max(in_sizes.values()), max(out_sizes.values())))
        signature = (tuple(in_sizes.items()), tuple(out_sizes.items()))
        share = config.replora_sharing == "model" and in_block[group_path]
        generators = shared.get(signature) if share else None
        calibrate = generators is None
        if generators is None:
            generators = RepLoRAGenerators(config, widths, in_sizes, out_sizes, **like)
            if share:
                shared[signature] = generators
            bank.generators[f"shared{len(shared) - 1}" if share else _key(group_path)] = generators
        group = RepLoRAGroup(config, generators, widths, **like)
        if calibrate:
            generators.calibrate_A_heads(group.lora_A_seed)
        bank.groups[_key(group_path)] = group
        for role, path in members.items():
            adapters[path] = GeneratedFactors(config, group, _key(role))
    return bank, adapters


def _like(layer: nn.Module) -> dict:
    w = layer.weight
    return {"device": w.device, "dtype": w.dtype}


def _build_adapter(config: AdapterConfig, layer: AdaptedLayer):
    like = _like(layer.base_layer)
    cls = MoSLoRAFactors if config.method == "moslora" else LoRAFactors
    adapter = cls(config, layer.in_features, layer.out_features, **like)
    if config.method == "dora":
        adapter.init_magnitude(layer.base_weight())
    return adapter


def _require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise ValueError("this model has no replora adapter; call replora.inject(model, config) first")
    return state


def _require_adapter(model: nn.Module, adapter_name: str | None) -> str:
    state = _require_state(model)
    name = state.active_adapter if adapter_name is None else adapter_name
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
    _add(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


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
    # New modules follow the model's train/eval mode (an eval model must not start using dropout).
    layers = {path: base if isinstance(base, AdaptedLayer) else AdaptedLayer(base).train(base.training)
              for path, base in targets.items()}
    state = adapter_state(model) or AdapterState()
    bank = None
    if config.method == "replora":
        bank, adapters = _build_replora(config, layers)
        bank.train(model.training)
    else:
        adapters = {path: _build_adapter(config, layer) for path, layer in layers.items()}
    # Commit: from here on nothing can fail on user input.
    if adapter_state(model) is None:
        state.train(model.training)
        state.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        setattr(model, STATE_ATTR, state)
    state.configs[adapter_name] = config
    if bank is not None:
        state.banks[adapter_name] = bank
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
    """Make `adapter_name` the one that runs, trains, merges, saves and exports; the others are frozen."""
    name = _require_adapter(model, adapter_name)
    state = _require_state(model)
    state.active_adapter = name
    for wrapper in list(adapted_layers(model).values()) + list(saved_modules(model).values()):
        wrapper.active_adapter = name
        for other, module in (wrapper.lora if isinstance(wrapper, AdaptedLayer) else wrapper.copies).items():
            module.requires_grad_(other == name)
    for other, bank in state.banks.items():
        bank.requires_grad_(other == name)
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
    """Remove one named adapter; the model keeps the others (use unload to remove the last one)."""
    name = _require_adapter(model, adapter_name)
    state = _require_state(model)
    if len(state.configs) == 1:
        raise ValueError(f"{name!r} is the model's only adapter; call replora.unload(model) to remove it")
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
    if name in state.banks:
        del state.banks[name]
    del state.configs[name]
    if state.active_adapter == name:
        set_adapter(model, next(iter(state.configs)))
    return model


def merge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold an adapter (default: the active one) into the base weights: inference then costs what the
    base model costs."""
    name = _require_adapter(model, adapter_name)
    for layer in adapted_layers(model).values():
        layer.merge(name)
    return model


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
    for path, layer in adapted_layers(model).items():
        if merge:
            layer.merge(state.active_adapter)
        else:
            layer.unmerge()
        _replace(model, path, layer.base_layer)
    for path, module in saved_modules(model).items():
        _replace(model, path, module.current() if merge else module.original_module)
    delattr(model, STATE_ATTR)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_config(model: nn.Module, adapter_name: str | None = None) -> AdapterConfig:
    """The config of an adapter (default: the active one)."""
    return _require_state(model).configs[_require_adapter(model, adapter_name)]
