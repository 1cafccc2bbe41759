"""Adapter files keep loading: files saved by replora 0.1 (tests/data/v0.1, made by make_v0_1_adapters.py
with that release) load into today's layout with the same outputs, and the format is versioned."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import replora

from conftest import TINY_MODELS, outputs
from data.make_v0_1_adapters import CASES

DATA = __import__("pathlib").Path(__file__).parent / "data" / "v0.1"
DATA_0_2 = DATA.parent / "v0.2"  # make_v0_2_adapters.py: RepLoRA files of format 2 (0.2's generator design)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_by_0_1_loads_with_its_outputs(case, tmp_path):
    tiny = TINY_MODELS[CASES[case][0]]
    expected = load_file(DATA / case / "expected.safetensors")
    logits = expected.pop("logits")
    model = replora.load_adapter(tiny.build(), DATA / case)
    torch.testing.assert_close(outputs(model, expected), logits, atol=1e-6, rtol=1e-6)
    # Saved again, it is written in today's format and loads the same.
    replora.save_adapter(model, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["replora_format"] == 3 and "replora_version" in config
    if "replora" in case:  # 0.1's generator design, now stated: saved again, it stays what it was
        assert (config["replora_hidden_init"], config["replora_hidden_bias"], config["replora_head_bias"]) == (
            "uniform", "shared", "shared")
    again = replora.load_adapter(tiny.build(), tmp_path / "again")
    assert torch.equal(outputs(again, expected), outputs(model, expected))
    if "replora" in case:  # the file layouts differ: RepLoRA's tensors moved from `replora.*` into the model
        old = set(load_file(DATA / case / "adapter_model.safetensors"))
        new = set(load_file(tmp_path / "again" / "adapter_model.safetensors"))
        assert any(k.startswith("replora.") for k in old) and not any(k.startswith("replora.") for k in new)


def test_a_newer_format_is_refused_clearly(tmp_path):
    shutil.copytree(DATA / "bert-lora", tmp_path / "future")
    file = tmp_path / "future" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "replora_format": 99}))
    model = TINY_MODELS["bert"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="replora_format 99 is newer than this replora"):
        replora.load_adapter(model, tmp_path / "future")
    assert not hasattr(model, "replora_state") and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_format_1_file_with_a_missing_tensor_names_it(tmp_path):
    shutil.copytree(DATA / "bert-replora", tmp_path / "broken")
    tensors = load_file(tmp_path / "broken" / "adapter_model.safetensors")
    missing = next(k for k in tensors if k.startswith("replora.groups."))
    del tensors[missing]
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "broken" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"missing tensors \\['{missing}'\\]"):
        replora.load_adapter(TINY_MODELS["bert"].build(), tmp_path / "broken")


@pytest.mark.parametrize("case", sorted(p.name for p in DATA_0_2.iterdir()))
def test_replora_adapter_saved_by_0_2_computes_what_it_did(case, tmp_path):
    """0.2 wrote no generator-design options (its biases and init were fixed): its files load with that design,
    not today's default, and give the same outputs; saved again, the design is written down."""
    tiny = TINY_MODELS[CASES[case][0]]
    expected = load_file(DATA_0_2 / case / "expected.safetensors")
    logits = expected.pop("logits")
    model = replora.load_adapter(tiny.build(), DATA_0_2 / case)
    torch.testing.assert_close(outputs(model, expected), logits, atol=1e-6, rtol=1e-6)
    config = replora.get_config(model)
    assert (config.replora_hidden_init, config.replora_hidden_bias, config.replora_head_bias) == (
        "uniform", "shared", "shared")
    replora.save_adapter(model, tmp_path / "again")
    again = replora.load_adapter(tiny.build(), tmp_path / "again")
    assert torch.equal(outputs(again, expected), outputs(model, expected))
