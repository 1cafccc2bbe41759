"""The command line is made from the settings: every flag's help states the default the run really uses,
every setting has a flag, and every registered method is offered."""
from __future__ import annotations

import dataclasses
import re

import pytest

import replora
from replora.config import AdapterConfig
from replora.training.cli import build_parser, main
from replora.training.settings import FULL, HEAD, TrainSettings, settings_from


def train_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["train"]
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}


def real_defaults() -> dict:
    """What a run uses when no flag is given: TrainSettings' defaults, AdapterConfig's, each method's options'."""
    run = {f.name: f.default for f in dataclasses.fields(TrainSettings) if f.name != "adapter"}
    adapter = {f.name: f.default for f in dataclasses.fields(AdapterConfig) if f.name not in ("method", "method_options")}
    options = {k: o.default for m in replora.METHODS.values() for k, o in m.options.items()}
    return {**run, **adapter, **options}


def test_every_setting_has_a_flag_and_every_flag_a_setting():
    assert set(train_actions()) == set(real_defaults())


def test_each_flags_stated_default_is_the_one_the_run_uses():
    defaults = real_defaults()
    stated = 0
    for name, action in train_actions().items():
        match = re.search(r"\(default ([^)]*)\)$", action.help)
        if match and not match.group(1).startswith(("runs/", "h = r", "the ")):
            assert match.group(1) == str(defaults[name]), f"--{name}: help says {match.group(1)}, the run uses {defaults[name]}"
            stated += 1
        elif defaults[name] not in (None, False):
            pytest.fail(f"--{name} has default {defaults[name]!r} but its help does not say so: {action.help!r}")
    assert stated >= 15
    assert "(default 64)" in train_actions()["max_length"].help  # the drift that used to be there
    # With no flag at all the settings are TrainSettings()'s own.
    assert settings_from({}) == TrainSettings()


def test_methods_and_their_options_come_from_the_registry():
    actions = train_actions()
    assert tuple(actions["method"].choices) == tuple(replora.METHODS) + (FULL, HEAD)
    for method in replora.METHODS.values():
        for option, spec in method.options.items():
            assert actions[option].choices == spec.choices and spec.help in actions[option].help


def test_a_method_option_for_another_method_is_refused(capsys):
    assert main(["train", "--method", "lora", "--replora-activation", "gelu", "--output", "/nonexistent/x"]) == 2
    assert "applies to method 'replora'" in capsys.readouterr().err
