"""Where modules that several targets share live: the machinery any method that shares across layers needs
(RepLoRA's groups and generators use it). A target's *block* is found from its path; a block's targets form
a *group*; a module shared by several blocks lives at their nearest common ancestor that is not a container
(nn.Sequential, nn.ModuleList, nn.ModuleDict: a new child would change what they run)."""
from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def block_of(path: str) -> str | None:
    """The block a layer belongs to: the path up to its last numeric component
    ('encoder.layer.3.attention.self.query' -> 'encoder.layer.3'); None outside any block."""
    match = re.match(r"^((?:.*\.)?\d+)\.", path)
    return match.group(1) if match else None


def groups_of(paths, by_block: bool = True) -> dict[str, dict[str, str]]:
    """group path -> {role: target path}: a block's targets together; a target with no block (or every
    target, with by_block=False) is a group of its own, whose path is its own."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    for path in paths:
        block = block_of(path) if by_block else None
        if block is None:
            groups[path][path.rsplit(".", 1)[-1]] = path
        else:
            groups[block][path[len(block) + 1:]] = path
    return groups


def group_key(path: str) -> str:
    """A path as one module name (dots are not allowed in a child's name)."""
    return path.replace(".", "_") or "_"


def common_home(model: nn.Module, paths: list[str]) -> str | None:
    """The deepest module above all `paths` that is not a container; None if there is none."""
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    if len(paths) == 1:
        common = common[:-1]  # a block shared with nobody: hold its generators above it like the others
    while True:
        path = ".".join(common)
        if not isinstance(model.get_submodule(path), CONTAINERS):
            return path
        if not common:
            return None
        common.pop()
