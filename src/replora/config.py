"""AdapterConfig: one dataclass for every method, with PEFT's field names where PEFT has one."""
from __future__ import annotations

import dataclasses
import difflib
import functools
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "dora", "moslora", "replora")
MIXER_INITS = ("kaiming", "orthogonal")
ACTIVATIONS = ("tanh", "gelu", "relu", "identity")
SEED_SHAPES = ("diagonal", "full")
SHARING_SCOPES = ("block", "none", "model")

# Options that only one method reads; setting them away from their default for another method is a mistake.
METHOD_OPTIONS = {
    "moslora_mixer_init": "moslora",
    "replora_hidden_size": "replora",
    "replora_activation": "replora",
    "replora_seed": "replora",
    "replora_sharing": "replora",
}


@dataclass
class AdapterConfig:
    """What to adapt and how.

    method: "lora", "dora", "moslora" or "replora".
    r, lora_alpha, lora_dropout: rank, scale numerator (scale = alpha / r, or alpha / sqrt(r) with
        use_rslora) and dropout on the adapter's input, as in PEFT.
    target_modules: module-name suffixes (["query", "value"]), one regex string matched against the
        whole module name, "all-linear", or None for the model's attention query and value projections.
    modules_to_save: modules trained in full and saved with the adapter (e.g. ["classifier"]).
    moslora_mixer_init: init of MoSLoRA's r x r mixer, "kaiming" (the authors' code) or "orthogonal".
    replora_hidden_size: hidden width h of RepLoRA's generators (None: h = r).
    replora_activation: "tanh", "gelu", "relu" or "identity" (the paper's linear reparameterization).
    replora_seed: "diagonal" (the paper's diag(a), diag(b)) or "full" (full seed matrices).
    replora_sharing: "block" (a block's targets share generators), "none" (one generator per target)
        or "model" (blocks of equal shapes share generators; seeds stay per block).
    """

    method: str = "lora"
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    moslora_mixer_init: str = "kaiming"
    replora_hidden_size: int | None = None
    replora_activation: str = "tanh"
    replora_seed: str = "diagonal"
    replora_sharing: str = "block"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, str)):
            self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
        self.validate()

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    @property
    def hidden_size(self) -> int:
        return self.replora_hidden_size if self.replora_hidden_size is not None else self.r

    def validate(self) -> None:
        """Raise ValueError naming the bad field and what it accepts."""
        _choice("method", self.method, METHODS)
        _choice("moslora_mixer_init", self.moslora_mixer_init, MIXER_INITS)
        _choice("replora_activation", self.replora_activation, ACTIVATIONS)
        _choice("replora_seed", self.replora_seed, SEED_SHAPES)
        _choice("replora_sharing", self.replora_sharing, SHARING_SCOPES)
        _positive_int("r", self.r)
        if self.replora_hidden_size is not None:
            _positive_int("replora_hidden_size", self.replora_hidden_size)
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
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for option, owner in METHOD_OPTIONS.items():
            if self.method != owner and getattr(self, option) != defaults[option]:
                raise ValueError(f"option {option}={getattr(self, option)!r} applies to method '{owner}', not "
                                 f"'{self.method}': remove it or set method='{owner}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config must be a JSON object / dict, got {type(data).__name__}")
        return cls(**data)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(AdapterConfig))
_generated_init = AdapterConfig.__init__


@functools.wraps(_generated_init)
def _checked_init(self, *args, **kwargs):
    # The dataclass __init__ would say only "unexpected keyword argument"; name the fix as well.
    for key in kwargs:
        if key not in _FIELD_NAMES:
            close = difflib.get_close_matches(key, _FIELD_NAMES, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown AdapterConfig option '{key}': {hint}options are {', '.join(_FIELD_NAMES)}")
    _generated_init(self, *args, **kwargs)


AdapterConfig.__init__ = _checked_init
