"""Adding, merging and removing adapters: plain functions over a model's modules."""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from .config import AdapterConfig
from .factors import GeneratedFactors, LoRAFactors, MoSLoRAFactors, RepLoRAGenerators, RepLoRAGroup
from .layer import SUPPORTED_LAYERS, AdaptedLayer

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
        self.requires_grad_before: dict[str, bool] = {}
        self.hooks: list = []


class RepLoRABank(nn.Module):
    """All RepLoRA parameters of one adapter: per-group seeds and the (possibly shared) generators."""

    def __init__(self):
        super().__init__()
        self.groups = nn.ModuleDict()
        self.generators = nn.ModuleDict()


def adapter_state(model: nn.Module) -> AdapterState | None:
    state = getattr(model, STATE_ATTR, None)
    return state if isinstance(state, AdapterState) else None


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _matches_suffix(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _some_names(names, n: int = 8) -> str:
    names = list(names)
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    found = {}
    names = [n for n, _ in model.named_modules() if n]
    for key in config.modules_to_save or []:
        hits = [n for n in names if _matches_suffix(n, key)]
        if not hits:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of the model; "
                             f"top-level modules are: {_some_names(n for n in names if '.' not in n)}")
        for n in hits:
            found[n] = model.get_submodule(n)
    return found


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The layers config.target_modules names, in model order; a clear error if there are none."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)}
    excluded = tuple(n + "." for n in find_modules_to_save(model, config))
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
        hits = {n: m for n, m in layers.items() if m is not output}
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
                others = [n for n, m in model.named_modules() if _matches_suffix(n, key)]
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
    """Group the targets (METHODS.md), build seeds and generators; returns (bank, adapters, hook sites)."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)  # group path -> role -> target path
    in_block: dict[str, bool] = {}
    for path in layers:
        block = block_of(path) if config.replora_sharing != "none" else None
        if block is None:  # no block (or no sharing): the target is a group of its own
            groups[path][path.rsplit(".", 1)[-1]] = path
        else:
            groups[block][path[len(block) + 1:]] = path
        in_block[block or path] = block is not None
    bank, adapters, hook_sites = RepLoRABank(), {}, []
    shared: dict[tuple, RepLoRAGenerators] = {}  # "model" sharing: one generator pair per block shape
    for group_path, members in groups.items():
        group_layers = {_key(role): layers[path] for role, path in members.items()}
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
            generators.calibrate_A_heads(group.seed_rows()[0])
        bank.groups[_key(group_path)] = group
        for role, path in members.items():
            adapters[path] = GeneratedFactors(config, group, _key(role))
        if len(members) > 1:
            hook_sites.append((group_path, group))
    return bank, adapters, hook_sites


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


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Adapt `model` in place with `config`; freeze everything but the adapter and modules_to_save.

    All checks and module construction happen before the model is touched, so a failed call
    leaves the model as it was.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"inject expects a replora.AdapterConfig, got {type(config).__name__}")
    config.validate()
    if adapter_state(model) is not None or adapted_layers(model):
        raise ValueError("this model already has a replora adapter; call replora.unload(model) first to "
                         "start again, or replora.load_adapter(model, path) to load weights into it")
    targets = find_targets(model, config)
    to_save = find_modules_to_save(model, config)
    # New modules follow the model's train/eval mode (an eval model must not start using dropout).
    layers = {path: AdaptedLayer(base).train(base.training) for path, base in targets.items()}
    state = AdapterState()
    hook_sites = []
    if config.method == "replora":
        bank, adapters, hook_sites = _build_replora(config, layers)
        state.banks[adapter_name] = bank
    else:
        adapters = {path: _build_adapter(config, layer) for path, layer in layers.items()}
    for path, layer in layers.items():
        layer.add_adapter(adapter_name, adapters[path].train(layer.training))
        layer.active_adapter = adapter_name
    state.train(model.training)
    # Commit: from here on nothing can fail on user input.
    state.configs[adapter_name] = config
    state.requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for path, layer in layers.items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    setattr(model, STATE_ATTR, state)
    for block_path, group in hook_sites:
        block = model.get_submodule(block_path)
        state.hooks.append(block.register_forward_pre_hook(group.open_cache))
        state.hooks.append(block.register_forward_hook(group.close_cache, always_call=True))
    for layer in layers.values():
        layer.lora.requires_grad_(True)
    state.banks.requires_grad_(True)
    for module in to_save.values():
        module.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold each layer's active adapter into its base weight: inference then costs what the base model costs."""
    for layer in _require_adapted(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the base weights."""
    for layer in _require_adapted(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the plain model with no adapter module left: with the active adapter merged into the
    weights (merge=True) or the original base weights (merge=False). modules_to_save keep their
    trained weights; requires_grad flags are restored to what they were before inject."""
    layers = _require_adapted(model)
    state = adapter_state(model)
    for path, layer in layers.items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    if state is not None:
        for handle in state.hooks:
            handle.remove()
        delattr(model, STATE_ATTR)
        for name, param in model.named_parameters():
            param.requires_grad_(state.requires_grad_before.get(name, param.requires_grad))
    return model


def _require_adapted(model: nn.Module) -> dict[str, AdaptedLayer]:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("this model has no replora adapter; call replora.inject(model, config) first")
    return layers


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def get_config(model: nn.Module, adapter_name: str = "default") -> AdapterConfig:
    state = adapter_state(model)
    if state is None or adapter_name not in state.configs:
        raise ValueError(f"this model has no replora adapter named {adapter_name!r}; call replora.inject first")
    return state.configs[adapter_name]
