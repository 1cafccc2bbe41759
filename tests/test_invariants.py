"""Every method variant x every tiny model x every invariant of issue 2 (one parameterized table)."""
from __future__ import annotations

import re
from collections import defaultdict

import torch

import replora
from replora.layer import AdaptedLayer

from conftest import logits, make_config, outputs, train_steps

TIGHT = dict(atol=1e-5, rtol=1e-5)


def adapted(tiny, variant, **overrides):
    model = tiny.build()
    return replora.inject(model, make_config(tiny, variant, **overrides))


def test_init_output_equals_base(tiny, variant):
    inputs = tiny.inputs()
    expected = outputs(tiny.build(), inputs)
    model = adapted(tiny, variant)
    torch.testing.assert_close(outputs(model, inputs), expected, atol=1e-6, rtol=1e-6)


def test_merge_unmerge_unload(tiny, variant):
    inputs = tiny.inputs()
    base_weights = {k: v.clone() for k, v in tiny.build().state_dict().items()}
    model = train_steps(adapted(tiny, variant), tiny)
    unmerged = outputs(model, inputs)
    assert not torch.allclose(unmerged, outputs(tiny.build(), inputs), atol=1e-4), "training changed nothing"

    replora.merge(model)
    torch.testing.assert_close(outputs(model, inputs), unmerged, **TIGHT)
    replora.unmerge(model)
    torch.testing.assert_close(outputs(model, inputs), unmerged, **TIGHT)
    for name, layer in model.named_modules():
        if isinstance(layer, AdaptedLayer):
            for pname, p in layer.base_layer.named_parameters():
                torch.testing.assert_close(p, base_weights[f"{name}.{pname}"], atol=1e-6, rtol=1e-6)

    plain = replora.unload(model, merge=True)
    torch.testing.assert_close(outputs(plain, inputs), unmerged, **TIGHT)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    # Nothing of replora is left: no state on the root, no shared-module holder, no key beyond the base's.
    assert not hasattr(plain, replora.model.STATE_ATTR)
    assert not any(hasattr(m, replora.model.SHARED_ATTR) for m in plain.modules())
    assert set(plain.state_dict()) == set(base_weights)


def test_unload_without_merge_gives_base_model(tiny, variant):
    inputs = tiny.inputs()
    model = train_steps(adapted(tiny, variant), tiny)
    replora.merge(model)
    plain = replora.unload(model, merge=False)
    reference = tiny.build()
    assert plain.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():  # modules_to_save included: the originals come back
        torch.testing.assert_close(plain.state_dict()[name], tensor, atol=1e-6, rtol=1e-6)
    assert all(p.requires_grad for p in plain.parameters()), "requires_grad flags not restored"
    torch.testing.assert_close(outputs(plain, inputs), outputs(reference, inputs), **TIGHT)


def _expected_trainable_names(model, tiny):
    adapter = re.compile(r"(\.lora\.default\.)|((^|\.)lora_shared\.default\.)")
    saved = tuple(f"{m}.copies.default." for m in (tiny.modules_to_save or []))
    return {n for n, _ in model.named_parameters() if adapter.search(n) or n.startswith(saved)}


def test_only_adapter_parameters_train_and_all_get_gradients(tiny, variant):
    model = train_steps(adapted(tiny, variant, lora_dropout=0.0), tiny)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable_names(model, tiny)
    if variant.startswith("replora"):
        kinds = {n for n in trainable if "lora_shared" in n or ".group." in n}
        assert any("lora_A_seed" in k for k in kinds) and any("lora_B_generator.head" in k for k in kinds)
    model.train()
    model.zero_grad()
    logits(model(**tiny.inputs(seed=7))).pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def _target_shapes(model):
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _block(name):
    match = re.match(r"^((?:.*\.)?\d+)\.", name)  # up to the last numeric component: "0.2" is in block "0"
    return match.group(1) if match else None


def expected_trainable_count(config, shapes, extra):
    """docs/methods.md's formulas, written out independently of the library."""
    r = config.r
    h = config.replora_hidden_size or r
    if config.method != "replora":
        n = sum(r * (i + o) for i, o in shapes.values())
        if config.method == "dora":
            n += sum(o for _, o in shapes.values())
        if config.method == "moslora":
            n += r * r * len(shapes)
        return n + extra
    groups = defaultdict(dict)
    for name, shape in shapes.items():
        block = _block(name) if config.replora_sharing != "none" else None
        groups[block or name][name[len(block) + 1:] if block else name] = shape

    def generator(seed_a, seed_b, members):
        ins = sum(i for i, _ in members.values())
        outs = sum(o for _, o in members.values())
        hidden_bias = h if config.replora_hidden_bias == "shared" else 0  # one bias vector of the hidden layer
        rows = {"none": 0, "shared": 1, "per_row": r}[config.replora_head_bias]  # head bias vectors per output
        return (seed_a * h + hidden_bias + h * ins + rows * ins) + (seed_b * h + hidden_bias + h * outs + rows * outs)

    n, signatures = 0, set()
    for members in groups.values():
        if config.replora_seed == "diagonal":
            seed_a = seed_b = r
            n += 2 * r
        else:
            seed_a = max(i for i, _ in members.values())
            seed_b = max(o for _, o in members.values())
            n += r * (seed_a + seed_b)
        signature = tuple(sorted(members.items()))
        if config.replora_sharing == "model":
            if signature in signatures:
                continue
            signatures.add(signature)
        n += generator(seed_a, seed_b, members)
    return n + extra


def test_trainable_parameter_count_matches_formula(tiny, variant):
    model = adapted(tiny, variant)
    config = replora.get_config(model)
    extra = sum(p.numel() for m in (tiny.modules_to_save or []) for p in model.get_submodule(m).original_module.parameters())
    trainable, total = replora.count_parameters(model)
    assert trainable == expected_trainable_count(config, _target_shapes(model), extra)
    # The method's own formula (the registry's, which a new method brings) agrees.
    assert trainable == replora.METHODS[config.method].parameter_count(config, _target_shapes(model)) + extra
    # modules_to_save train a copy; the frozen original stays in the model.
    assert total == sum(p.numel() for p in tiny.build().parameters()) + trainable


def test_save_then_load_into_fresh_model_is_exact(tiny, variant, tmp_path):
    inputs = tiny.inputs()
    model = train_steps(adapted(tiny, variant), tiny)
    expected = outputs(model, inputs)
    replora.save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = replora.load_adapter(tiny.build(), tmp_path / "adapter")
    assert torch.equal(outputs(fresh, inputs), expected)
    assert replora.count_parameters(fresh) == replora.count_parameters(model)
    # Resuming training: the loaded adapter is trainable again, generators included.
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
