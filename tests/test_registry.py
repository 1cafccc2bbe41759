"""A fifth method is one class: registered, it is validated, offered by the CLI, injected, counted,
merged, saved, loaded and exported like the built-in four, with no other file changed."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft import PeftModel
from torch import nn

import replora
from replora.methods import METHODS, LoRA, Option, register_method
from replora.training.cli import build_parser

from conftest import TINY_MODELS, outputs, train_steps

BERT = TINY_MODELS["bert"]


class GatedLoRA(LoRA):
    """A toy method: LoRA whose update is scaled by a learnable gate per target."""

    name = "gated"
    summary = "g·s·B A"
    options = {"gated_init": Option(1.0, "initial value of each target's gate", type=float)}

    def __init__(self, config, layer):
        super().__init__(config, layer)
        self.lora_gate = nn.Parameter(torch.tensor(float(config.gated_init)))

    def factors(self):
        return self.lora_A, self.lora_gate * self.lora_B

    @classmethod
    def parameter_count(cls, config, shapes):
        return super().parameter_count(config, shapes) + len(shapes)


@pytest.fixture
def gated():
    register_method(GatedLoRA)
    yield GatedLoRA
    del METHODS["gated"]


def test_a_registered_method_works_everywhere(gated, tmp_path):
    config = replora.AdapterConfig(method="gated", gated_init=0.5, modules_to_save=["classifier"])
    assert config.gated_init == 0.5 and config.to_dict()["gated_init"] == 0.5
    with pytest.raises(ValueError, match="gated_init=0.5 applies to method 'gated', not 'lora'"):
        replora.AdapterConfig(method="lora", gated_init=0.5)
    with pytest.raises(ValueError, match="gated_init must be a number"):
        replora.AdapterConfig(method="gated", gated_init="half")

    inputs = BERT.inputs()
    model = replora.inject(BERT.build(), config)
    torch.testing.assert_close(outputs(model, inputs), outputs(BERT.build(), inputs))
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if hasattr(m, "lora")}
    head = sum(p.numel() for p in BERT.build().classifier.parameters())
    assert replora.count_parameters(model)[0] == 8 * sum(i + o for i, o in shapes.values()) + len(shapes) + head
    train_steps(model, BERT)
    expected = outputs(model, inputs)
    assert not torch.allclose(expected, outputs(BERT.build(), inputs), atol=1e-4)

    replora.save_adapter(model, tmp_path / "adapter")
    assert torch.equal(outputs(replora.load_adapter(BERT.build(), tmp_path / "adapter"), inputs), expected)
    replora.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(BERT.build(), tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(peft_model, inputs), expected, atol=1e-5, rtol=1e-5)
    replora.merge(model)
    torch.testing.assert_close(outputs(model, inputs), expected, atol=1e-5, rtol=1e-5)

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    flags = {a.dest: a for a in train._actions}
    assert "gated" in flags["method"].choices and "initial value of each target's gate" in flags["gated_init"].help


def test_registering_checks_the_class_and_its_options(gated):
    with pytest.raises(TypeError, match="Method subclass"):
        register_method(object)

    class Clash(LoRA):
        name = "clash"
        options = {"gated_init": Option(0.0, "the same option name as gated's", type=float)}

    with pytest.raises(ValueError, match="option 'gated_init' is already an option of method 'gated'"):
        register_method(Clash)
    assert "clash" not in METHODS


def test_a_method_that_changes_the_forward_rule_must_state_what_it_exports_as():
    """Exporters read one stated capability, never guess from attributes or overridden methods: a method
    with its own forward rule that says nothing is refused when its class is made; one that says None is
    refused by both exporters, by name."""
    with pytest.raises(TypeError, match="Scaled overrides forward.*exports_as = 'lora', 'dora' or None"):
        class Scaled(LoRA):  # noqa: F841 - the class statement is the test
            name = "scaled"

            def forward(self, x, result, layer):
                return 2 * super().forward(x, result, layer)

    class Doubled(LoRA):
        name = "doubled"
        summary = "2 · (W0 x + s·B A x)"
        exports_as = None

        def forward(self, x, result, layer):
            return 2 * super().forward(x, result, layer)

    register_method(Doubled)
    try:
        model = replora.inject(BERT.build(), replora.AdapterConfig(method="doubled"))
        with pytest.raises(ValueError, match="method 'doubled' states that its adapters are neither LoRA nor DoRA"):
            replora.export_peft(model, "unused")
        assert replora.methods.export_form("doubled") is None and replora.methods.export_form("dora") == "dora"
        assert all(replora.methods.export_form(m) == "lora" for m in ("lora", "moslora", "replora"))
    finally:
        del METHODS["doubled"]


def test_a_methods_frozen_parameters_stay_frozen_and_its_buffers_are_saved(tmp_path):
    """A method may build parameters that never train (LoRA-FA's frozen A) and keep state in buffers:
    switching adapters keeps the frozen ones frozen, and save / load carries the persistent buffers."""

    class FrozenA(LoRA):
        name = "frozen_a"
        summary = "s·B A, A frozen"

        def __init__(self, config, layer):
            super().__init__(config, layer)
            self.lora_A.requires_grad_(False)
            self.register_buffer("lora_seen", torch.zeros(()))  # persistent: saved
            self.register_buffer("scratch", torch.zeros(()), persistent=False)  # not saved

    register_method(FrozenA)
    try:
        model = replora.inject(BERT.build(), replora.AdapterConfig(method="frozen_a"))
        replora.add_adapter(model, replora.AdapterConfig(method="lora"), "other")
        replora.set_adapter(model, "other")
        replora.set_adapter(model, "default")
        layer = next(m for m in model.modules() if isinstance(m, replora.layer.AdaptedLayer))
        active = layer.lora["default"]
        assert not active.lora_A.requires_grad and active.lora_B.requires_grad
        assert not any(p.requires_grad for p in layer.lora["other"].parameters())
        with torch.no_grad():
            active.lora_seen.fill_(7.0)
            active.lora_B.normal_()
        replora.save_adapter(model, tmp_path / "a")
        keys = set(safetensors.torch.load_file(tmp_path / "a" / "adapter_model.safetensors"))
        assert any(k.endswith(".lora_seen") for k in keys) and not any(k.endswith(".scratch") for k in keys)
        fresh = replora.load_adapter(BERT.build(), tmp_path / "a")
        loaded = next(m for m in fresh.modules() if isinstance(m, replora.layer.AdaptedLayer)).lora["default"]
        assert loaded.lora_seen.item() == 7.0 and not loaded.lora_A.requires_grad
        torch.testing.assert_close(outputs(fresh, BERT.inputs()), outputs(model, BERT.inputs()))
    finally:
        del METHODS["frozen_a"]


def test_a_subclass_inherits_its_parents_options_and_methods_may_share_one():
    """A variant of a method is a subclass, registered under its own name, with its parent's options; two
    methods may take one option (one Option object); two different options of one name still clash."""
    from replora.methods import RepLoRA, option_owners

    class WideRepLoRA(RepLoRA):
        name = "wide_replora"
        summary = "RepLoRA, registered again under another name"

    shared = Option("none", "a shared init", ("none", "some"))

    class One(LoRA):
        name = "one"
        summary = "s·B A"
        options = {"shared_init": shared}

    class Two(LoRA):
        name = "two"
        summary = "s·B A"
        options = {"shared_init": shared}

    try:
        for cls in (WideRepLoRA, One, Two):
            register_method(cls)
        config = replora.AdapterConfig(method="wide_replora", replora_activation="gelu")
        model = replora.inject(BERT.build(), config)
        assert replora.get_config(model).replora_activation == "gelu"
        assert option_owners("shared_init") == ("one", "two")
        assert replora.AdapterConfig(method="two", shared_init="some").shared_init == "some"
        with pytest.raises(ValueError, match="applies to method 'one' or 'two', not 'lora'"):
            replora.AdapterConfig(method="lora", shared_init="some")

        class Three(LoRA):
            name = "three"
            summary = "s·B A"
            options = {"shared_init": Option("none", "another option of the same name")}

        with pytest.raises(ValueError, match="option 'shared_init' is already an option of method 'one', as another Option"):
            register_method(Three)
    finally:
        for name in ("wide_replora", "one", "two", "three"):
            METHODS.pop(name, None)
