"""Behaviour beyond the invariant table: targets, grouping, generator calls, dtypes, copies."""
from __future__ import annotations

import copy

import pytest
import torch

import replora
from replora.methods import RepLoRA
from replora.layer import AdaptedLayer

from conftest import TINY_MODELS, METHOD_VARIANTS, make_config, outputs, train_steps

BERT, LLAMA, GPT2 = TINY_MODELS["bert"], TINY_MODELS["llama"], TINY_MODELS["gpt2"]


def target_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdaptedLayer))


@pytest.mark.parametrize("name, expected", [
    ("bert", ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]),
    ("llama", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]),
    ("vit", ["vit.layers.0.attention.q_proj", "vit.layers.0.attention.v_proj"]),
])
def test_default_targets_are_query_and_value(name, expected):
    model = replora.inject(TINY_MODELS[name].build(), replora.AdapterConfig())
    assert target_names(model)[:2] == expected and len(target_names(model)) == 4


def test_all_linear_skips_output_layer_and_modules_to_save():
    model = replora.inject(LLAMA.build(), replora.AdapterConfig(target_modules="all-linear"))
    names = target_names(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    bert = replora.inject(BERT.build(), replora.AdapterConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in target_names(bert) and "bert.pooler.dense" in target_names(bert)


def test_regex_targets_match_whole_names():
    model = replora.inject(BERT.build(), replora.AdapterConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert target_names(model) == ["bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.query"]


def replora_groups(model):
    """{group: its targets' roles}, from the adapters (each group once, in model order)."""
    groups = {}
    for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
        adapter = layer.lora["default"]
        groups.setdefault(adapter.group, []).append(adapter.role)
    return groups


def generator_pairs(model):
    return list({id(g.generators): g.generators for g in replora_groups(model)}.values())


def where(model, module):
    """The path under which the model holds `module`."""
    return next(name for name, m in model.named_modules() if m is module)


def groups_of(model):
    return {where(model, group): sorted(roles) for group, roles in replora_groups(model).items()}


def test_replora_groups_a_blocks_targets_and_lone_targets_get_their_own():
    config = make_config(BERT, "replora", target_modules=["query", "value", "pooler.dense"])
    model = replora.inject(BERT.build(), config)
    # A block's group sits in the block (wrapping the block keeps it), a lone target's in its own adapter.
    assert groups_of(model) == {
        "bert.encoder.layer.0.lora_shared.default.group": ["attention_self_query", "attention_self_value"],
        "bert.encoder.layer.1.lora_shared.default.group": ["attention_self_query", "attention_self_value"],
        "bert.pooler.dense.lora.default.group": ["dense"],
    }
    train_steps(model, BERT)  # the lone target trains as well
    assert model.bert.pooler.dense.lora["default"].group.generators.lora_B_generator.head.weight.abs().sum() > 0


def test_model_sharing_uses_one_generator_pair_for_blocks_of_equal_shape():
    model = replora.inject(LLAMA.build(), make_config(LLAMA, "replora-modelsharing"))
    pairs = generator_pairs(model)
    assert len(pairs) == 1 and len(replora_groups(model)) == 2
    # Held once, by the nearest plain module above both blocks (model.layers is a ModuleList).
    assert where(model, pairs[0]) == "model.lora_shared.default.generators"
    assert sorted(where(model, g) for g in replora_groups(model)) == [
        "model.layers.0.lora_shared.default.group", "model.layers.1.lora_shared.default.group"]
    none = replora.inject(LLAMA.build(), make_config(LLAMA, "replora-nosharing"))
    assert len(replora_groups(none)) == 4 and len(generator_pairs(none)) == 4


@pytest.mark.parametrize("sharing, calls_per_forward", [("block", 2), ("model", 2), ("none", 4)])
def test_generators_run_once_per_group_per_forward(sharing, calls_per_forward):
    model = replora.inject(BERT.build(), make_config(BERT, "replora", replora_sharing=sharing))
    calls = []
    for generators in generator_pairs(model):
        generators.lora_A_generator.head.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    model(**BERT.inputs()).logits.sum().backward()
    assert len(calls) == calls_per_forward
    # A target called on its own (outside its block's forward) still computes its factors.
    train_steps(model, BERT)
    layer, x = model.bert.encoder.layer[0].attention.self.query, torch.randn(2, 48)
    delta = layer.lora["default"].delta_weight()
    assert delta.abs().sum() > 0
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ delta.T)


def test_the_factor_cache_key_reads_every_generator_parameter():
    model = replora.inject(BERT.build(), make_config(BERT, "replora"))
    for generators in generator_pairs(model):
        for generator in (generators.lora_A_generator, generators.lora_B_generator):
            assert sorted(map(id, generator.tensors())) == sorted(map(id, generator.parameters()))


def test_inference_reuses_generated_factors_until_a_parameter_changes():
    model = train_steps(replora.inject(BERT.build(), make_config(BERT, "replora")), BERT).eval()
    calls = []
    for generators in generator_pairs(model):
        generators.lora_A_generator.head.register_forward_hook(lambda *_: calls.append(1))
    inputs = BERT.inputs()

    def fresh_outputs():  # what a freshly built model with these parameters computes
        clone = replora.inject(BERT.build(), make_config(BERT, "replora")).eval()
        clone.load_state_dict(model.state_dict())
        with torch.no_grad():
            return clone(**inputs).logits

    with torch.no_grad():
        first = model(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, first, rtol=0, atol=0)
    assert len(calls) == 2  # two blocks, generated once for both forwards
    group_params = [p for n, p in model.named_parameters() if ".lora_shared." in n]
    changes = [
        (True, lambda: torch.optim.SGD(group_params, lr=0.5).step()),  # an optimizer step (in-place, no_grad)
        (True, lambda: model.load_state_dict({n: t + 0.1 if ".lora_shared." in n else t
                                              for n, t in model.state_dict().items()})),
        (False, lambda: model.double().float()),  # same values in new storages
    ]
    for changes_values, change in changes:
        for p in group_params:
            p.grad = torch.randn_like(p)
        change()
        before = len(calls)
        with torch.no_grad():
            after = model(**inputs).logits
        assert len(calls) == before + 2
        assert torch.allclose(after, first) != changes_values
        torch.testing.assert_close(after, fresh_outputs())
        first = after
    # Back to training: factors are generated again, with a graph.
    model.train()
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for p in group_params)


def test_generated_A_starts_at_loras_kaiming_scale():
    model = replora.inject(LLAMA.build(), make_config(LLAMA, "replora"))
    for layer in (m for m in model.modules() if isinstance(m, AdaptedLayer)):
        A, B = layer.lora["default"].factors()
        assert torch.count_nonzero(B) == 0
        target = 1 / (3 * layer.in_features) ** 0.5
        assert abs(A.std().item() - target) / target < 0.05
        assert torch.linalg.matrix_rank(A.float()) == A.shape[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["lora", "dora", "moslora-orthogonal", "replora", "replora-relu-fullseed"])
def test_adapters_follow_the_base_layers_dtype(dtype, variant):
    model = LLAMA.build().to(dtype)
    replora.inject(model, make_config(LLAMA, variant))
    adapter_params = [p for p in model.parameters() if p.requires_grad]
    assert adapter_params and all(p.dtype == dtype for p in adapter_params)
    model.train()
    opt = torch.optim.SGD(adapter_params, lr=0.5)  # (AdamW's eps underflows in pure float16)
    for step in range(2):
        model(**LLAMA.inputs(seed=step)).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(torch.isfinite(p).all() for p in adapter_params)
    out = outputs(model, LLAMA.inputs())
    assert out.dtype == dtype and torch.isfinite(out).all()
    replora.merge(model)
    torch.testing.assert_close(outputs(model, LLAMA.inputs()), out, atol=0.05, rtol=0.05)


def test_gpt2_conv1d_merge_uses_the_transposed_weight():
    model = train_steps(replora.inject(GPT2.build(), make_config(GPT2, "lora")), GPT2)
    layer = model.transformer.h[0].attn.c_attn
    before = layer.base_layer.weight.clone()
    replora.merge(model)
    torch.testing.assert_close(layer.base_layer.weight - before, layer.lora["default"].delta_weight().T)


def test_unload_restores_requires_grad_flags_that_were_off():
    model = BERT.build()
    model.bert.embeddings.requires_grad_(False)
    replora.unload(replora.inject(model, make_config(BERT, "lora")))
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(p.requires_grad for p in model.bert.encoder.parameters())


@pytest.mark.parametrize("variant", list(METHOD_VARIANTS))
def test_deepcopy_of_an_adapted_model_is_independent(variant):
    model = replora.inject(BERT.build(), make_config(BERT, variant))
    twin = copy.deepcopy(model)
    train_steps(twin, BERT)
    assert not torch.allclose(outputs(twin, BERT.inputs()), outputs(model, BERT.inputs()))
    torch.testing.assert_close(outputs(model, BERT.inputs()), outputs(BERT.build(), BERT.inputs()), atol=1e-6, rtol=1e-6)
    for layer in (m for m in twin.modules() if isinstance(m, AdaptedLayer)):
        adapter = layer.lora["default"]
        if isinstance(adapter, RepLoRA):  # the copy's adapters use the copy's own groups
            assert any(adapter.group is m for m in twin.modules())
            assert not any(adapter.group is m for m in model.modules())


def test_eval_model_stays_eval_and_training_model_stays_training():
    model = replora.inject(BERT.build(), make_config(BERT, "lora-rslora-dropout"))
    assert not any(m.training for m in model.modules())
    train = BERT.build().train()
    replora.inject(train, make_config(BERT, "lora-rslora-dropout"))
    assert all(m.training for m in train.modules())


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_replora_trains_under_gradient_checkpointing_with_the_same_gradients(name):
    """transformers checkpoints a layer's forward (its hooks stay outside); the recompute must generate
    the group's factors in the same order as the forward did."""
    tiny = TINY_MODELS[name]
    plain = train_steps(replora.inject(tiny.build(), make_config(tiny, "replora", lora_dropout=0.0)), tiny)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (plain, checkpointed):
        model.train()
        model.config.use_cache = False
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in both
        model(**tiny.inputs(seed=9)).logits.pow(2).mean().backward()
    ours = dict(checkpointed.named_parameters())
    for n, p in plain.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[n].grad, p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_dora_unmerge_restores_rows_whose_magnitude_is_zero(name):
    # Such a row merges to zeros and cannot be scaled back by m; unmerge must not turn it into NaN.
    model = replora.inject(TINY_MODELS[name].build(), make_config(TINY_MODELS[name], "dora"))
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    before = [m.base_weight().clone() for m in layers]
    with torch.no_grad():
        for m in layers:
            m.lora["default"].lora_magnitude[:2] = 0
    replora.merge(model)
    assert all(torch.all(m.base_weight()[:2] == 0) for m in layers)
    replora.unmerge(model)
    for m, w in zip(layers, before):
        assert torch.allclose(m.base_weight(), w, atol=1e-6)


@pytest.mark.parametrize("name, depth", [("llama", 2), ("bert", 3), ("plain", 1)])
def test_a_blocks_adapter_parameters_live_inside_the_block(name, depth):
    """Wrapping one block (FSDP, activation checkpointing) must take every parameter its targets' factors
    depend on: checked by gradients, not by names."""
    tiny = TINY_MODELS[name]
    model = replora.inject(tiny.build(), make_config(tiny, "replora"))
    blocks = {}
    for path, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLayer)):
        block = path.rsplit(".", depth)[0]  # model.layers.0 / bert.encoder.layer.0 / blocks.0
        blocks.setdefault(block, []).append(layer)
    assert len(blocks) == 2
    for block, layers in blocks.items():
        model.zero_grad()
        sum(sum(t.pow(2).sum() + t.sum() for t in layer.lora["default"].factors()) for layer in layers).backward()
        used = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        inside = {id(p) for p in model.get_submodule(block).parameters()}
        assert used and used <= inside, f"{block} uses parameters held outside it"


@pytest.mark.parametrize("method", ["lora", "dora", "moslora"])
def test_nothing_but_adapted_layers_enters_the_model(method):
    model = replora.inject(BERT.build(), make_config(BERT, method))
    new_keys = set(model.state_dict()) - set(BERT.build().state_dict())
    wrapped = (".lora.default.", ".base_layer.", ".copies.default.", ".original_module.")
    assert new_keys and all(any(w in k for w in wrapped) for k in new_keys), sorted(new_keys)[:5]
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_children()} == {n for n, _ in BERT.build().named_children()}
    assert not any(n.endswith("lora_shared") for n, _ in model.named_modules())
