"""Reliability: nothing lost under faults, no code executed from files, a fuzzed config loader."""
from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

import replora
import replora.saving
import replora.training.objectives
from replora.training.cli import main
from replora.training.settings import read_settings_file, settings_from

from conftest import TINY_MODELS, make_config, train_steps
from conftest import ENV, assert_resumed, checkpointed_step, sentiment_rows, write_jsonl

BERT = TINY_MODELS["bert"]
SRC = Path(replora.__file__).parent

KILL_DURING_SECOND_CHECKPOINT = """
import os, signal, sys
import replora.training.run_folder as run_folder
real, calls = run_folder.save_file, []
def dying(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:  # the epoch-2 checkpoint: its adapter is written, its training state half-written
        open(path, "wb").write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(tensors, path, metadata=metadata)
run_folder.save_file = dying
from replora.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path, tiny_folders):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(120))
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "replora",
              "--epochs", "3", "--batch-size", "8", "--seed", "2"]
    whole = subprocess.run([sys.executable, "-m", "replora"] + common + ["--output", str(tmp_path / "whole")],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT] + common + ["--output", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "epoch-1"
    assert any(p.name.startswith(".epoch-2.tmp-") for p in checkpoints.iterdir()), "the kill missed the write"
    replora.read_adapter(checkpoints / "epoch-1" / "adapter")  # the last checkpoint is whole
    from_step = checkpointed_step(out)
    resumed = subprocess.run([sys.executable, "-m", "replora"] + common + ["--output", str(out), "--resume"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed(out, from_step)
    a, b = (json.loads((p / "metrics.json").read_text()) for p in (tmp_path / "whole", out))
    assert a["test_accuracy"] == b["test_accuracy"] and a["history"][-1]["train_loss"] == pytest.approx(
        b["history"][-1]["train_loss"], abs=1e-6)
    # The last checkpoint and the best adapter by validation it names (--keep best, the default).
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"best-step-{b['best_step']}", "epoch-3", "latest"]


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_folders, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))  # 32 train rows: 4 steps per epoch
    real, calls = replora.training.objectives.forward_logits, []

    def poisoned(model, batch):
        calls.append(1)
        logits = real(model, batch)
        return logits * float("nan") if model.training and len(calls) > 6 else logits

    monkeypatch.setattr(replora.training.objectives, "forward_logits", poisoned)
    code = main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--epochs", "3",
                 "--batch-size", "8", "--output", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss became nan at step 6 (epoch 2); the last good checkpoint is kept" in err
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "epoch-1"
    replora.read_adapter(tmp_path / "run" / "checkpoints" / "epoch-1" / "adapter")
    assert not (tmp_path / "run" / "metrics.json").exists()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    model = train_steps(replora.inject(BERT.build(), make_config(BERT, "replora")), BERT)
    replora.save_adapter(model, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    train_steps(model, BERT)
    monkeypatch.setattr(replora.saving, "save_file", _disk_full)
    for target in ("old", "new"):
        with pytest.raises(OSError, match="No space left"):
            replora.save_adapter(model, tmp_path / target)
    with pytest.raises(OSError, match="No space left"):
        replora.export_peft(model, tmp_path / "peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "a partial folder was left behind"
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


@pytest.mark.parametrize("damage, message", [
    (lambda t: {**t, next(iter(t)): t[next(iter(t))].to(torch.int32)}, "has dtype torch.int32; adapter tensors are floating point"),
    (lambda t: {**t, next(iter(t)): t[next(iter(t))][:1]}, r"has shape \(1, .*\) in the file but"),
])
def test_tensors_of_the_wrong_dtype_or_shape_are_refused(tmp_path, damage, message):
    from safetensors.torch import load_file

    replora.save_adapter(replora.inject(BERT.build(), make_config(BERT, "lora")), tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file(damage(load_file(file)), file)
    with pytest.raises(ValueError, match=message):
        replora.load_adapter(BERT.build(), tmp_path / "a")


def test_loading_never_executes_code_from_files():
    """Only safetensors and JSON are read (and a packaged .pth with torch.load(weights_only=True), which
    unpickles tensors only): no pickle, eval or exec anywhere in the package."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for forbidden in (r"\bpickle\b", r"torch\.load\((?![^\n]*weights_only=True)", r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"weights_only=False"):
            assert not re.search(forbidden, text), f"{path.name} uses {forbidden}"


def test_merged_export_writes_safetensors_only(tmp_path):
    model = replora.inject(BERT.build(), make_config(BERT, "dora"))
    replora.save_merged(model, tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin")) and list((tmp_path / "m").glob("*.safetensors"))


# --- a fuzz of the settings loader: any input gives settings or one ValueError, never a crash -----

KEYS = ["epochs", "lr", "method", "fraction", "r", "lora_alpha", "target_modules", "replora_sharing", "seed",
        "batch_size", "max_grad_norm", "use_rslora", "model", "bogus", "adapter"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3),
                   st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_settings_loader_fuzz(values):
    try:
        settings_from(values)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([".toml", ".json", ".yaml"]))
def test_settings_file_fuzz(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("cfg") / f"c{suffix}"
    path.write_bytes(content)
    try:
        settings_from(read_settings_file(str(path)))
    except ValueError:
        pass


def test_a_dataset_without_the_named_columns_exits_2_with_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"review": "fine", "stars": 1}, {"review": "bad", "stars": 0}])
    assert main(["train", "--dataset", str(data), "--text-column", "body", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no column 'body'; its columns are review, stars" in err
