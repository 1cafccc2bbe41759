"""Interoperability with the real `peft` and `transformers`: export, import, merged save, named adapters."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file

import replora
from replora.layer import AdaptedLayer, SavedModule

from conftest import TINY_MODELS, make_config, outputs, train_steps

TIGHT = dict(atol=1e-5, rtol=1e-5)


# PEFT builds a Conv2d's lora_A from kernel size, stride and padding only: the dilated, reflect-padded
# conv of the tiny ConvNet is outside what it computes right (export refuses it: see below).
PEFT_MODELS = {**TINY_MODELS, "convnet": dataclasses.replace(TINY_MODELS["convnet"], targets=["stem", "pointwise"])}


@pytest.fixture(params=["bert", "llama", "gpt2", "convnet", "llama-embed"])
def tiny(request):
    return PEFT_MODELS[request.param]


def assert_same_change(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> None:
    """actual equals expected (TIGHT), and differs from it by less than 1e-3 of the change expected makes to the
    base model's outputs: a 1% error in the adapter's scale (lora_alpha) moves the outputs by about 1% of that."""
    torch.testing.assert_close(actual, expected, **TIGHT)
    change = (expected - base).abs().max()
    assert (actual - expected).abs().max() < 1e-3 * change, f"off by {(actual - expected).abs().max() / change:.1e}"


def test_export_loads_in_peft_with_equal_outputs(tiny, variant, tmp_path):
    # lr 5e-2: the adapter (not only a trained classifier head) moves the outputs well above TIGHT's tolerance.
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, variant)), tiny, lr=5e-2)
    replora.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny.build(), tmp_path / "peft").eval()
    with replora.disable_adapters(model):
        base = outputs(model, tiny.inputs())
    assert_same_change(outputs(peft_model, tiny.inputs()), outputs(model, tiny.inputs()), base)
    # No missing or unexpected keys: PEFT's adapter state is exactly the file, tensor for tensor.
    in_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    in_peft = get_peft_model_state_dict(peft_model, save_embedding_layers=False)  # (the whole embedding table)
    assert in_peft.keys() == in_file.keys()
    assert all(torch.equal(in_peft[k], in_file[k]) for k in in_file)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] == variant.startswith("dora")
    assert config["fan_in_fan_out"] == (tiny.name == "gpt2")
    assert config["use_rslora"] == ("rslora" in variant)
    assert config["modules_to_save"] == tiny.modules_to_save
    assert config["task_type"] == {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM",
                                   "llama-embed": "CAUSAL_LM", "convnet": None}[tiny.name]


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_imports_with_equal_outputs(tiny, use_dora, tmp_path):
    torch.manual_seed(3)
    targets = tiny.targets or (["query", "value"] if tiny.name == "bert" else ["q_proj", "v_proj"])
    peft_model = get_peft_model(tiny.build(), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False,
        modules_to_save=tiny.modules_to_save, fan_in_fan_out=tiny.name == "gpt2")).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = replora.import_peft(tiny.build(), tmp_path / "peft")
    expected = outputs(peft_model, tiny.inputs())
    assert not torch.allclose(expected, outputs(tiny.build(), tiny.inputs()), atol=1e-4)
    torch.testing.assert_close(outputs(model, tiny.inputs()), expected, **TIGHT)
    assert replora.get_config(model).method == ("dora" if use_dora else "lora")
    train_steps(model, tiny)  # and it trains on from there


def test_peft_classifier_adapter_with_peft_s_own_modules_to_save_imports(tmp_path):
    # PEFT's SEQ_CLS adds "classifier" and "score" to modules_to_save whichever the model has; it skips the other.
    tiny = PEFT_MODELS["bert"]
    torch.manual_seed(3)
    peft_model = get_peft_model(tiny.build(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["query", "value"])).eval()
    with torch.no_grad():  # the trained copy of the head differs from the base's
        for name, param in peft_model.named_parameters():
            if "modules_to_save.default" in name:
                param.add_(torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "peft")
    assert set(json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"]) >= {
        "classifier", "score"}
    model = replora.import_peft(tiny.build(), tmp_path / "peft")
    assert replora.get_config(model).modules_to_save == ["classifier"]
    torch.testing.assert_close(outputs(model, tiny.inputs()), outputs(peft_model, tiny.inputs()), **TIGHT)


def test_merged_save_reloads_as_a_plain_transformers_model(tiny, variant, tmp_path):
    if tiny.name == "convnet":
        pytest.skip("a plain nn.Module has no save_pretrained (save_merged refuses it: test_errors.py)")
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, variant)), tiny)
    expected = outputs(model, tiny.inputs())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    replora.save_merged(model, tmp_path / "merged")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "save_merged changed the model"
    reloaded = type(tiny.build()).from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, (AdaptedLayer, SavedModule)) for m in reloaded.modules())
    torch.testing.assert_close(outputs(reloaded, tiny.inputs()), expected, **TIGHT)
    # The documented two-step way gives the same folder contents.
    plain = replora.unload(model, merge=True)
    plain.save_pretrained(tmp_path / "unloaded")
    again = type(tiny.build()).from_pretrained(tmp_path / "unloaded").eval()
    torch.testing.assert_close(outputs(again, tiny.inputs()), expected, **TIGHT)


def test_named_adapters_switch_disable_and_delete(tiny):
    inputs = tiny.inputs()
    base = outputs(tiny.build(), inputs)
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, "lora")), tiny)
    first = outputs(model, inputs)
    replora.add_adapter(model, make_config(tiny, "replora"), "second")
    assert replora.active_adapter(model) == "default"
    torch.testing.assert_close(outputs(model, inputs), first)  # adding does not switch
    replora.set_adapter(model, "second")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." not in n for n in trainable), "the inactive adapter must be frozen"
    torch.testing.assert_close(outputs(model, inputs), base, atol=1e-6, rtol=1e-6)  # fresh adapter = base
    train_steps(model, tiny, lr=2e-2)
    second = outputs(model, inputs)
    assert not torch.allclose(second, first, atol=1e-4)
    replora.set_adapter(model, "default")
    torch.testing.assert_close(outputs(model, inputs), first)
    with replora.disable_adapters(model):
        torch.testing.assert_close(outputs(model, inputs), base)
    torch.testing.assert_close(outputs(model, inputs), first)

    replora.merge(model, "second")  # merge acts on the named adapter
    replora.set_adapter(model, "second")
    torch.testing.assert_close(outputs(model, inputs), second, **TIGHT)
    with pytest.raises(ValueError, match="unmerge"):
        with replora.disable_adapters(model):
            pass
    replora.unmerge(model)
    replora.delete_adapter(model, "default")
    torch.testing.assert_close(outputs(model, inputs), second)
    assert not any("default" in n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="only adapter; call replora.unload"):
        replora.delete_adapter(model, "second")
    plain = replora.unload(model)
    torch.testing.assert_close(outputs(plain, inputs), second, **TIGHT)


def test_save_and_export_act_on_the_named_adapter(tmp_path):
    tiny = TINY_MODELS["llama"]
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, "lora")), tiny)
    replora.add_adapter(model, make_config(tiny, "moslora"), "mos")
    replora.set_adapter(model, "mos")
    train_steps(model, tiny)
    expected = outputs(model, tiny.inputs())
    replora.set_adapter(model, "default")
    replora.save_adapter(model, tmp_path / "mos", adapter_name="mos")
    replora.export_peft(model, tmp_path / "mos-peft", adapter_name="mos")
    replora.save_merged(model, tmp_path / "mos-merged", adapter_name="mos")
    torch.testing.assert_close(outputs(replora.load_adapter(tiny.build(), tmp_path / "mos"), tiny.inputs()), expected)
    peft_model = PeftModel.from_pretrained(tiny.build(), tmp_path / "mos-peft").eval()
    assert_same_change(outputs(peft_model, tiny.inputs()), expected, outputs(tiny.build(), tiny.inputs()))
    merged = type(tiny.build()).from_pretrained(tmp_path / "mos-merged").eval()
    torch.testing.assert_close(outputs(merged, tiny.inputs()), expected, **TIGHT)
    # load_adapter adds a named adapter next to the existing ones.
    replora.load_adapter(model, tmp_path / "mos", adapter_name="mos-again")
    replora.set_adapter(model, "mos-again")
    torch.testing.assert_close(outputs(model, tiny.inputs()), expected)


def test_export_of_mixed_conv1d_and_linear_targets_is_refused(tmp_path):
    gpt2 = TINY_MODELS["gpt2"]
    model = replora.inject(gpt2.build(), make_config(gpt2, "lora", target_modules=["c_attn", "lm_head"]))
    with pytest.raises(ValueError, match="PEFT cannot express this adapter: its targets mix transformers Conv1D"):
        replora.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("target", ["dilated", "depthwise"])
def test_export_of_convolutions_peft_computes_otherwise_is_refused(target, tmp_path):
    convnet = TINY_MODELS["convnet"]
    if target == "depthwise":  # grouped: not even a target
        with pytest.raises(ValueError, match="'depthwise': it is a grouped \\(depthwise\\) Conv2d, groups=8"):
            replora.inject(convnet.build(), make_config(convnet, "lora", target_modules=[target]))
        return
    model = replora.inject(convnet.build(), make_config(convnet, "lora", target_modules=["stem", target]))
    with pytest.raises(ValueError, match="PEFT cannot express this adapter: PEFT's Conv2d LoRA ignores the dilation "
                                         "and padding mode of dilated"):
        replora.export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_import_onto_another_base_names_the_first_mismatching_tensor(tmp_path):
    from test_errors import _wider_bert, snapshot, assert_unchanged
    bert = TINY_MODELS["bert"]
    replora.export_peft(replora.inject(bert.build(), make_config(bert, "lora")), tmp_path / "peft")
    other = _wider_bert()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"tensor 'base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\."
                                         r"query\.lora_A\.weight' has shape \(8, 48\) in the file but \(8, 64\)"):
        replora.import_peft(other, tmp_path / "peft")
    assert_unchanged(other, before)


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'; import_peft reads PEFT LoRA"),
    ({"rank_pattern": {"query": 16}}, "rank_pattern=.* has no replora equivalent"),
    ({"r": 0}, "r must be a positive integer"),
])
def test_import_refuses_what_it_cannot_represent(tmp_path, change, message):
    bert = TINY_MODELS["bert"]
    replora.export_peft(replora.inject(bert.build(), make_config(bert, "lora")), tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        replora.import_peft(bert.build(), tmp_path / "peft")


def test_load_adapter_points_peft_folders_to_import_peft(tmp_path):
    bert = TINY_MODELS["bert"]
    replora.export_peft(replora.inject(bert.build(), make_config(bert, "lora")), tmp_path / "peft")
    with pytest.raises(ValueError, match="is a Hugging Face PEFT adapter; load it with replora.import_peft"):
        replora.load_adapter(bert.build(), tmp_path / "peft")
