"""FSDP (version 2) through `accelerate launch` with the repository's configs/fsdp.yaml, on CPUs (gloo): two
sharded processes end with the adapter a single process trains, for classification and generation, with
LoRA and RepLoRA; checkpoints hold whole tensors and a killed sharded run resumes to the same result."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, REPLORA, assert_resumed, checkpointed_step, kill_once_checkpointed, sentiment_rows, uneven_qa_rows, write_jsonl

CONFIG = Path(__file__).parents[1] / "configs" / "fsdp.yaml"
pytestmark = pytest.mark.slow


def cpu_config(tmp_path: Path, **changes) -> Path:
    """configs/fsdp.yaml as a CPU-only machine runs it (use_cpu: true), with `changes` to its lines."""
    text = CONFIG.read_text().replace("use_cpu: false", "use_cpu: true")
    for old, new in changes.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "fsdp.yaml"
    path.write_text(text)
    return path


def launcher(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(port)]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensors(folder: Path, name: str = "adapter_model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(folder / name)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # whole tensors, not one process's shard
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["lora", "replora"])
def test_two_sharded_processes_end_with_the_same_adapter_as_one(tmp_path, tiny_folders, method):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(87))  # 69 train rows: the last batch of 5 is evened out
    common = ["train", "--model", tiny_folders["llama"], "--dataset", str(data), "--method", method,
              "--epochs", "3", "--batch-size", "16", "--seed", "3", "--lr", "5e-3", "--max-grad-norm", "0.5"]
    run(REPLORA + common + ["--output", str(tmp_path / "one")])
    port = 29610 + (method == "replora")
    run(launcher(cpu_config(tmp_path), port) + ["-m", "replora"] + common + ["--output", str(tmp_path / "two")])
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert (one["distributed_type"], one["num_processes"]) == ("NO", 1)
    assert (two["distributed_type"], two["num_processes"]) == ("FSDP", 2)
    assert "2 processes on cpu:0 (FSDP)" in (tmp_path / "two" / "log.txt").read_text()
    # The best adapter by validation is kept (and tested) in both, from the same validation history.
    assert [h["validation_accuracy"] for h in one["history"]] == [h["validation_accuracy"] for h in two["history"]]
    assert one["best_step"] == two["best_step"] and one["test_accuracy"] == two["test_accuracy"]
    assert_same_tensors(tensors(tmp_path / "one" / "adapter"), tensors(tmp_path / "two" / "adapter"))
    # The last checkpoint: the adapter and the optimizer's moments whole, as one process writes them.
    for part in ("adapter/adapter_model.safetensors", "training_state.safetensors"):
        a, b = (tensors(tmp_path / k / "checkpoints" / "epoch-3", part) for k in ("one", "two"))
        a.pop("rng.torch", None), b.pop("rng.torch", None)
        assert_same_tensors(a, b)


def test_a_killed_sharded_run_resumes_to_the_same_adapter(tmp_path, tiny_folders):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(400))
    common = ["train", "--model", tiny_folders["llama"], "--dataset", str(data), "--method", "replora",
              "--epochs", "3", "--batch-size", "16", "--seed", "5", "--lr", "3e-3", "--keep", "last"]
    run(REPLORA + common + ["--output", str(tmp_path / "whole")])
    sharded = launcher(cpu_config(tmp_path), 29612) + ["-m", "replora"]
    out = tmp_path / "cut"
    kill_once_checkpointed(common, out, launcher=sharded)
    assert (out / "checkpoints" / "latest").read_text() == "epoch-1"
    from_step = checkpointed_step(out)
    run(sharded + common + ["--output", str(out), "--resume"])
    whole, cut = metrics(tmp_path / "whole"), metrics(out)
    assert cut["distributed_type"] == "FSDP"
    assert_resumed(out, from_step)
    assert [h["validation_accuracy"] for h in cut["history"]] == [h["validation_accuracy"] for h in whole["history"]]
    assert cut["test_accuracy"] == whole["test_accuracy"]
    assert_same_tensors(tensors(tmp_path / "whole" / "adapter"), tensors(out / "adapter"))


def test_sharded_generative_training_and_generation_match_one_process(tmp_path, tiny_lm_folders):
    # Each forward is a collective under FSDP: greedy answers of different lengths must stay in step.
    data = write_jsonl(tmp_path / "qa.jsonl", uneven_qa_rows(90))
    common = ["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", "replora",
              "--epochs", "2", "--batch-size", "16", "--seed", "3", "--lr", "5e-3", "--max-new-tokens", "4"]
    run(REPLORA + common + ["--output", str(tmp_path / "one")])
    run(launcher(cpu_config(tmp_path), 29613) + ["-m", "replora"] + common + ["--output", str(tmp_path / "two")])
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two["distributed_type"] == "FSDP" and one["test_examples"] % 2 == 1  # an odd count: one prompt repeated
    assert_same_tensors(tensors(tmp_path / "one" / "adapter"), tensors(tmp_path / "two" / "adapter"))
    for a, b in zip(one["history"], two["history"]):
        assert a["validation_loss"] == pytest.approx(b["validation_loss"], abs=1e-5)
    assert one["test_loss"] == pytest.approx(two["test_loss"], abs=1e-5)
    assert one["test_exact_match"] == two["test_exact_match"]


def test_replora_seeds_and_generators_are_sharded_with_their_block(tmp_path, tiny_folders):
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        from transformers import AutoModelForSequenceClassification
        import replora
        from replora.training.distributed import make_accelerator

        accelerator = make_accelerator(1, "no")
        model = AutoModelForSequenceClassification.from_pretrained({tiny_folders["llama"]!r})
        replora.inject(model, replora.AdapterConfig(method="replora", r=4))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        model, optimizer = accelerator.prepare(model, optimizer)
        for block in model.model.layers:
            assert isinstance(block, FSDPModule), type(block)
            unit = {{id(p.sharded_param) for p in block._get_fsdp_state()._fsdp_param_group.fsdp_params}}
            shared = list(block.lora_shared.parameters())
            # the seeds (2) and each generator's hidden and head weights (2 x 2): no biases by default
            assert len(shared) == 6 and all(id(p) in unit and isinstance(p, DTensor) for p in shared)
        print("sharded with their blocks")
    """))
    done = run(launcher(cpu_config(tmp_path), 29614) + [str(script)])
    assert done.stdout.count("sharded with their blocks") == 2


def test_fsdp_version_1_is_refused_before_anything_is_written(tmp_path, tiny_folders):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    config = cpu_config(tmp_path, **{"fsdp_version: 2": "fsdp_version: 1"})
    done = subprocess.run(launcher(config, 29615) + ["-m", "replora", "train", "--model", tiny_folders["llama"],
                                                      "--dataset", str(data), "--output", str(tmp_path / "run")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "set `fsdp_version: 2`" in done.stderr and not (tmp_path / "run").exists()
