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
    """Add a Method subclass under cls.name (usable as a class decorator). Methods may share an option (one
    Option object: a subclass inherits its parent's, two methods may name one module-level Option); two
    different options of one name clash."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not getattr(cls, "name", None):
        raise TypeError(f"register_method takes a replora.methods.Method subclass with a `name`, got {cls!r}")
    for other in METHODS.values():
        if other is cls or other.name == cls.name:
            continue
        clash = sorted(o for o in set(cls.options) & set(other.options) if cls.options[o] is not other.options[o])
        if clash:
            raise ValueError(f"method {cls.name!r}: option {clash[0]!r} is already an option of method {other.name!r}, as another "
                             "Option; share that Option object (inherit it, or name one Option in both classes) "
                             "or give yours another name")
    METHODS[cls.name] = cls
    return cls


def export_form(method: str) -> str | None:
    """What adapters of this registered method export as: "lora", "dora" or None (Method.exports_as)."""
    return METHODS[method].exports_as


def method_options() -> dict[str, tuple[str, Option]]:
    """Every registered method's options: option name -> (the first method that has it, Option)."""
    found: dict[str, tuple[str, Option]] = {}
    for name, cls in METHODS.items():
        for option, spec in cls.options.items():
            found.setdefault(option, (name, spec))
    return found


def option_owners(option: str) -> tuple[str, ...]:
    """The registered methods that take `option`."""
    return tuple(name for name, cls in METHODS.items() if option in cls.options)


for _method in (LoRA, DoRA, MoSLoRA, RepLoRA):
    register_method(_method)

__all__ = ["METHODS", "Method", "Option", "register_method", "method_options", "export_form", "option_owners", "LoRA", "DoRA", "MoSLoRA", "RepLoRA"]
