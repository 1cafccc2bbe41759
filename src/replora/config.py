"""AdapterConfig: one config for every method, with PEFT's field names where PEFT has one.

The fields every method shares are the dataclass fields below, each with its help text (the CLI is
made from them). Each method's own options (moslora_*, replora_*) are declared by the method class
in the registry (methods/) and accepted here as keyword arguments and attributes, like the others.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from .methods import METHODS
from .methods import method_options as registered_options
from .methods import option_owners


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(init=False)
class AdapterConfig:
    """What to adapt and how. Method options (e.g. replora_activation="gelu") are keyword arguments too;
    `replora.methods.METHODS[name].options` lists each method's, with their help."""

    method: str = field(default="lora", metadata=_help("adapter method: " + ", ".join(METHODS)))
    r: int = field(default=8, metadata=_help("adapter rank"))
    lora_alpha: float = field(default=16, metadata=_help("scale numerator: s = alpha / r (alpha / sqrt(r) with "
                                                        "use_rslora)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the adapter's input"))
    target_modules: list[str] | str | None = field(default=None, metadata=_help(
        "layer-name suffixes, one regex matched against whole module names, or all-linear (default: the "
        "attention query and value projections)"))
    use_rslora: bool = field(default=False, metadata=_help("scale by alpha / sqrt(r) instead of alpha / r"))
    modules_to_save: list[str] | None = field(default=None, metadata=_help(
        "modules trained in full and saved with the adapter, e.g. classifier (replora train: default the "
        "task's new head)"))
    # The options of `method` (all of them, defaults filled in); other methods' options are refused.
    method_options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, method: str = "lora", r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 target_modules: list[str] | str | None = None, use_rslora: bool = False,
                 modules_to_save: list[str] | None = None, method_options: dict[str, Any] | None = None, **options):
        for key in options:
            if key not in registered_options():
                names = FIELD_NAMES + tuple(registered_options())
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ValueError(f"unknown AdapterConfig option '{key}': {hint}options are {', '.join(names)}")
        self.method, self.r, self.lora_alpha, self.lora_dropout = method, r, lora_alpha, lora_dropout
        self.target_modules, self.use_rslora, self.modules_to_save = target_modules, use_rslora, modules_to_save
        self.method_options = {**(method_options or {}), **options}
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        self.validate()

    def __getattr__(self, name: str) -> Any:  # method options read as attributes: config.replora_activation
        options = self.__dict__.get("method_options", {})
        if name in options:
            return options[name]
        known = registered_options()
        if name in known:
            return known[name][1].default  # another method's option: its default (it does not apply)
        raise AttributeError(f"AdapterConfig has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in registered_options():
            self.method_options[name] = value
        else:
            super().__setattr__(name, value)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what it accepts."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        _positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str) and not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(
                f"target_modules must be a list of module-name suffixes, a regex string, 'all-linear' or None, got {tm!r}")
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) and m for m in mts)):
            raise ValueError(f"modules_to_save must be a list of module names or None, got {mts!r}")
        own = METHODS[self.method].options
        for option, value in list(self.method_options.items()):
            owner, spec = registered_options()[option]
            if option in own:
                continue
            if value != spec.default:
                owners = " or ".join(f"'{m}'" for m in option_owners(option))
                raise ValueError(f"option {option}={value!r} applies to method {owners}, not '{self.method}': "
                                 f"remove it or set method='{owner}'")
            del self.method_options[option]  # another method's option at its default: meaningless here
        for option, spec in own.items():
            self.method_options.setdefault(option, spec.default)
            spec.check(option, self.method_options[option])

    def to_dict(self) -> dict[str, Any]:
        """Flat, as saved in adapter_config.json: the shared fields, then this method's options."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method_options"}
        return {**shared, **{k: self.method_options[k] for k in METHODS[self.method].options}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object / dict, got {type(data).__name__}")
        return cls(**data)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AdapterConfig) if f.name != "method_options")
