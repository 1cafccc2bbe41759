"""Adapter files of older formats, read as they were written: the one place that knows them.

Format 1 (replora 0.1) kept RepLoRA's seeds and generators under the model's `replora` child, by group
path; format 2 (0.2) moved them into the blocks; format 3 (0.3) records RepLoRA's generator design,
which files of formats 1 and 2 leave out because it was fixed then (biases and nn.Linear's init).
LoRA, DoRA and MoSLoRA files have not changed. saving.py asks this module, and nothing else does.
"""
from __future__ import annotations

from typing import Any

from .methods import METHODS
from .methods.sharing import block_of, group_key

# Options added in a format, with what a file of an older format meant by leaving them out.
OMITTED_BEFORE = {3: {"replora_hidden_init": "uniform", "replora_hidden_bias": "shared", "replora_head_bias": "shared"}}


def options_of_layout(method: str, layout: int) -> dict[str, Any]:
    """The options that files of format `layout` left out and meant, for this method (empty if current)."""
    owned = METHODS[method].options if method in METHODS else {}
    return {k: v for fmt, options in OMITTED_BEFORE.items() if layout < fmt for k, v in options.items() if k in owned}


def format1_names(config, adapters: dict) -> dict[int, str]:
    """{id(parameter): its name in a format-1 file} for the parameters whose name changed since: RepLoRA's
    seeds (`replora.groups.<group>.*`) and generators (`replora.generators.<group or sharedN>.*`), for the
    adapters {target path: method module} of one adapter, in model order."""
    if config.method != "replora":
        return {}
    names, shared = {}, {}
    for path, adapter in adapters.items():
        block = block_of(path) if config.replora_sharing != "none" else None
        group_name = group_key(block or path)
        group = adapter.group
        for seed in ("lora_A_seed", "lora_B_seed"):
            names[id(getattr(group, seed))] = f"replora.groups.{group_name}.{seed}"
        generators = group.generators
        if config.replora_sharing == "model" and block is not None:  # one pair per block shape, numbered as met
            generators_name = shared.setdefault(id(generators), f"shared{len(shared)}")
        else:
            generators_name = group_name
        for pname, param in generators.named_parameters():
            names[id(param)] = f"replora.generators.{generators_name}.{pname}"
    return names
