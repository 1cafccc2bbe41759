"""The registry of methods: name -> Method subclass. A new method is one file here with one class,
registered below; config validation, the CLI, the benchmark, the research grids and the invariant
tests all read this table."""
from __future__ import annotations

from .base import Method, Option
from .dora import DoRA
from .lora import LoRA
from .moslora import MoSLoRA
from .replora import RepLoRA

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Add a Method subclass under cls.name (usable as a class decorator). Its options must not clash."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not getattr(cls, "name", None):
        raise TypeError(f"register_method takes a replora.methods.Method subclass with a `name`, got {cls!r}")
    for other in METHODS.values():
        clash = set(cls.options) & set(other.options)
        if clash and other is not cls and other.name != cls.name:
            raise ValueError(f"method {cls.name!r}: option {sorted(clash)[0]!r} is already method {other.name!r}'s")
    METHODS[cls.name] = cls
    return cls


def export_form(method: str) -> str | None:
    """What adapters of this registered method export as: "lora", "dora" or None (Method.exports_as)."""
    return METHODS[method].exports_as


def method_options() -> dict[str, tuple[str, Option]]:
    """Every registered method's options: option name -> (method name, Option)."""
    return {option: (name, spec) for name, cls in METHODS.items() for option, spec in cls.options.items()}


for _method in (LoRA, DoRA, MoSLoRA, RepLoRA):
    register_method(_method)

__all__ = ["METHODS", "Method", "Option", "register_method", "method_options", "export_form", "LoRA", "DoRA", "MoSLoRA", "RepLoRA"]
