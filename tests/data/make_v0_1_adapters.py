"""Writes tests/data/v0.1/: adapters saved by replora 0.1.0 (the first release's file layout), with the
inputs and outputs they must reproduce. Run once against that release:
    PYTHONPATH=<checkout of 0.1.0>/src python tests/data/make_v0_1_adapters.py
The tiny models are rebuilt from the same configs and seeds by tests/test_formats.py."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import replora  # noqa: E402

from conftest import TINY_MODELS, make_config, outputs, train_steps  # noqa: E402

CASES = {  # name: (tiny model, method variant)
    "bert-lora": ("bert", "lora"), "bert-dora": ("bert", "dora"), "bert-moslora": ("bert", "moslora"),
    "bert-replora": ("bert", "replora"), "llama-replora-modelsharing": ("llama", "replora-modelsharing"),
    "gpt2-replora-nosharing": ("gpt2", "replora-nosharing"), "llama-replora-fullseed": ("llama", "replora-relu-fullseed"),
}



def write_fixtures(root: Path, cases: dict) -> None:
    """Each case trained a few steps with the installed replora, saved, with its inputs and outputs."""
    for name, (model_name, variant) in cases.items():
        tiny = TINY_MODELS[model_name]
        model = train_steps(replora.inject(tiny.build(), make_config(tiny, variant, lora_dropout=0.0)), tiny)
        replora.save_adapter(model, root / name)
        inputs = tiny.inputs()
        save_file({**inputs, "logits": outputs(model, inputs)}, root / name / "expected.safetensors")
        print(name, "written")


if __name__ == "__main__":
    assert replora.__version__ == "0.1.0", replora.__version__
    write_fixtures(Path(__file__).parent / "v0.1", CASES)
