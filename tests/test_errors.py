"""Bad input gets a clear error naming the problem, and a failed call changes nothing the user had."""
from __future__ import annotations

import json

import pytest
import torch

import replora

from conftest import TINY_MODELS, make_config, outputs, train_steps

BERT = TINY_MODELS["bert"]


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


def assert_unchanged(model, before):
    state, grads, types = snapshot(model)
    assert types == before[2]
    assert grads == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


@pytest.mark.parametrize("options, message", [
    (dict(method="lorax"), "unknown method 'lorax': choose one of lora, dora, moslora, replora"),
    (dict(rank=8), "unknown AdapterConfig option 'rank'"),
    (dict(replora_hiden_size=8), "did you mean 'replora_hidden_size'"),
    (dict(r=0), "r must be a positive integer, got 0"),
    (dict(r=-4), "r must be a positive integer, got -4"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha must be a positive number"),
    (dict(lora_dropout=1.5), r"lora_dropout must be a number in \[0, 1\)"),
    (dict(method="replora", replora_activation="swish"), "unknown replora_activation 'swish'"),
    (dict(method="replora", replora_sharing="layer"), "unknown replora_sharing 'layer': choose one of block, none, model"),
    (dict(method="replora", replora_seed="dense"), "unknown replora_seed 'dense'"),
    (dict(method="moslora", moslora_mixer_init="zeros"), "unknown moslora_mixer_init 'zeros'"),
    (dict(method="lora", replora_hidden_size=16), "applies to method 'replora', not 'lora'"),
    (dict(target_modules=[]), "target_modules must be"),
    (dict(target_modules=5), "target_modules must be"),
])
def test_bad_config_is_refused_with_a_clear_message(options, message):
    with pytest.raises(ValueError, match=message):
        replora.AdapterConfig(**options)


def test_config_round_trips_through_dict_and_json():
    config = replora.AdapterConfig(method="replora", r=4, target_modules=["query", "value"], replora_sharing="model")
    again = replora.AdapterConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown AdapterConfig option 'bogus'"):
        replora.AdapterConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_config_changed_after_construction_is_checked_again_by_inject():
    model = BERT.build()
    before = snapshot(model)
    config = replora.AdapterConfig()
    config.r = 0
    with pytest.raises(ValueError, match="r must be a positive integer"):
        replora.inject(model, config)
    assert_unchanged(model, before)


@pytest.mark.parametrize("targets, message", [
    (["q_proj"], r"'q_proj': it matches no module\. Adaptable layers include: .*query"),
    (["attention"], "'attention': it names BertAttention modules; replora adapts nn.Linear"),
    (r".*\.nothing_here", r"matches no adaptable layer \(nn\.Linear, transformers Conv1D, nn\.Conv2d \(not grouped\) "
                         r"and nn\.Embedding layers\)\. Adaptable layers include: bert\.embeddings\.word_embeddings"),
    (r"(unclosed", "does not compile"),
])
def test_target_that_matches_nothing_lists_existing_layers(targets, message):
    model = BERT.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        replora.inject(model, replora.AdapterConfig(target_modules=targets))
    assert_unchanged(model, before)


def test_modules_to_save_that_matches_nothing():
    model = BERT.build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module.*classifier"):
        replora.inject(model, replora.AdapterConfig(modules_to_save=["head"]))
    assert_unchanged(model, before)


def test_injecting_twice_is_refused_and_changes_nothing():
    model = replora.inject(BERT.build(), make_config(BERT, "replora"))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already has a replora adapter; call replora.unload\(model\) first"):
        replora.inject(model, make_config(BERT, "lora"))
    assert_unchanged(model, before)


def test_merge_of_a_plain_model_says_to_inject_first():
    with pytest.raises(ValueError, match=r"no replora adapter; call replora.inject"):
        replora.merge(BERT.build())


def _wider_bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=32, num_labels=3)).eval()


@pytest.mark.parametrize("variant", ["lora", "replora"])
def test_loading_onto_a_model_of_other_shapes_names_the_tensor_and_both_shapes(tmp_path, variant):
    replora.save_adapter(replora.inject(BERT.build(), make_config(BERT, variant)), tmp_path / "a")
    other = _wider_bert()
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"tensor '.+' has shape \(\d+, \d+\) in the file but \(\d+, \d+\) in the model"):
        replora.load_adapter(other, tmp_path / "a")
    assert_unchanged(other, before)


def test_loading_onto_a_model_with_other_layers_names_missing_tensors(tmp_path):
    replora.save_adapter(replora.inject(BERT.build(), make_config(BERT, "lora", target_modules=["query", "key"])),
                         tmp_path / "a")
    model = BERT.build()
    before = snapshot(model)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "a" / "adapter_config.json").read_text()), "target_modules": ["query", "value"]}))
    with pytest.raises(ValueError, match=r"missing tensors \['bert.encoder.layer.0.attention.self.value.lora_A'"):
        replora.load_adapter(model, tmp_path / "a")
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage, error, message", [
    ("no_config", FileNotFoundError, "adapter_config.json is missing"),
    ("no_weights", FileNotFoundError, "adapter_model.safetensors is missing"),
    ("truncated", ValueError, "is truncated or corrupted"),
    ("garbage", ValueError, "is truncated or corrupted"),
    ("bad_json", ValueError, "is not valid JSON"),
    ("bad_config", ValueError, "r must be a positive integer"),
])
def test_missing_or_damaged_adapter_files_are_refused(tmp_path, damage, error, message):
    folder = tmp_path / "a"
    replora.save_adapter(replora.inject(BERT.build(), make_config(BERT, "replora")), folder)
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "no_config":
        config.unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "bad_config":
        config.write_text(json.dumps({**json.loads(config.read_text()), "r": 0}))
    model = BERT.build()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        replora.load_adapter(model, folder)
    assert_unchanged(model, before)


def test_loading_into_an_adapter_with_another_config_is_refused(tmp_path):
    replora.save_adapter(replora.inject(BERT.build(), make_config(BERT, "lora")), tmp_path / "a")
    model = replora.inject(BERT.build(), make_config(BERT, "dora"))
    before = snapshot(model)
    with pytest.raises(ValueError, match="built with a different config"):
        replora.load_adapter(model, tmp_path / "a")
    assert_unchanged(model, before)


def test_load_into_same_adapter_replaces_weights_for_resuming(tmp_path):
    trained = train_steps(replora.inject(BERT.build(), make_config(BERT, "replora")), BERT)
    replora.save_adapter(trained, tmp_path / "a")
    model = replora.inject(BERT.build(), make_config(BERT, "replora"))
    replora.load_adapter(model, tmp_path / "a")
    assert torch.equal(outputs(model, BERT.inputs()), outputs(trained, BERT.inputs()))


def test_saving_again_replaces_files_and_keeps_other_files(tmp_path):
    folder = tmp_path / "a"
    model = replora.inject(BERT.build(), make_config(BERT, "lora"))
    replora.save_adapter(model, folder)
    (folder / "notes.txt").write_text("mine")
    train_steps(model, BERT)
    replora.save_adapter(model, folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "a temporary folder was left behind"
    fresh = replora.load_adapter(BERT.build(), folder)
    assert torch.equal(outputs(fresh, BERT.inputs()), outputs(model, BERT.inputs()))


def test_quantized_layers_are_named_by_their_full_class_and_no_empty_list_is_shown():
    from torch import nn

    model = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                                                   {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"'0': it names torch\.ao\.nn\.quantized\.dynamic\.[\w.]*Linear modules; "
                                         r"replora adapts nn\.Linear.*This model has none \(quantized layers"):
        replora.inject(model, replora.AdapterConfig(target_modules=["0"]))


def test_set_adapter_with_a_list_is_refused_clearly():
    model = replora.inject(BERT.build(), replora.AdapterConfig())
    with pytest.raises(TypeError, match="give one adapter name, got \\['default'\\]: one replora adapter is active"):
        replora.set_adapter(model, ["default"])
    assert replora.active_adapter(model) == "default"


def test_print_trainable_parameters_uses_peft_wording(capsys):
    model = replora.inject(BERT.build(), replora.AdapterConfig(modules_to_save=["classifier"]))
    trainable, total = replora.count_parameters(model)
    replora.print_trainable_parameters(model)
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
