"""The training pipeline: real runs on tiny model folders (MiniLM's real tokenizer, tiny weights),
one process and two (gloo), killed and resumed, every data format, and bad input at the command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from replora.training.cli import main
from replora.training.loop import run_notes
from replora.training.data import load_task, rotten_tomatoes, bigbench, stratified_fraction

from conftest import ENV, REPLORA, assert_resumed, checkpointed_step, kill_once_checkpointed, sentiment_rows, write_jsonl



def run(args, **kwargs):
    return subprocess.run(REPLORA + args, env=ENV, capture_output=True, text=True, **kwargs)


# --- data ---------------------------------------------------------------------------------------

def test_rotten_tomatoes_is_split_by_movie_with_fixed_sizes():
    task = rotten_tomatoes()
    assert task.sizes() == {"train": 9809, "validation": 999, "test": 2000}
    movies = {split: {e["movie"] for e in getattr(task, split)} for split in ("train", "validation", "test")}
    assert not movies["train"] & movies["test"] and not movies["train"] & movies["validation"]
    assert not movies["validation"] & movies["test"]
    assert task.kind == "classification" and task.num_labels == 2
    assert rotten_tomatoes().test == task.test  # fixed, whatever the run's seed


@pytest.mark.parametrize("name, sizes, choices", [("social_iqa", (1368, 195, 391), 3), ("strategyqa", (1603, 229, 458), 2)])
def test_bigbench_tasks_load_as_multiple_choice(name, sizes, choices):
    task = bigbench(name)
    assert task.kind == "multiple_choice" and tuple(task.sizes().values()) == sizes
    # (4 social_iqa questions repeat a choice, which BIG-bench's target_scores dict keeps once)
    assert all(2 <= len(e["choices"]) <= choices and 0 <= e["label"] < len(e["choices"]) for e in task.train)
    assert sum(len(e["choices"]) == choices for e in task.train) > 0.99 * len(task.train)


def test_fraction_is_stratified_and_reproducible():
    train = rotten_tomatoes().train
    share = sum(e["label"] for e in train) / len(train)
    for fraction in (0.1, 0.3, 0.5):
        subset = stratified_fraction(train, fraction, seed=1)
        assert abs(len(subset) - fraction * len(train)) <= 2
        assert abs(sum(e["label"] for e in subset) / len(subset) - share) < 0.002
        assert subset == stratified_fraction(train, fraction, seed=1)
        assert subset != stratified_fraction(train, fraction, seed=2)
    assert stratified_fraction(train, 1.0, seed=3) == train
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        stratified_fraction(train, 0.0, seed=0)


def test_user_csv_jsonl_and_hf_datasets_load(tmp_path):
    import csv
    import datasets

    rows = sentiment_rows(50)
    with open(tmp_path / "d.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["review", "stars"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "stars": ["bad", "good"][r["label"]]} for r in rows)
    task = load_task(str(tmp_path / "d.csv"), text_column="review", label_column="stars")
    assert task.kind == "classification" and task.label_names == ["bad", "good"] and sum(task.sizes().values()) == 50

    mc = [{"question": f"q{i}", "options": ["a", "b", "c"], "answer": i % 3,
           "split": ["train", "train", "validation", "test"][i % 4]} for i in range(40)]
    task = load_task(str(write_jsonl(tmp_path / "mc.jsonl", mc)), text_column="question", label_column="answer",
                     choices_column="options")
    assert task.kind == "multiple_choice" and task.sizes() == {"train": 20, "validation": 10, "test": 10}

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    task = load_task(str(tmp_path / "hf"))
    assert task.kind == "classification" and sum(task.sizes().values()) == 50


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine", "label": 1}\n{"text": "oops", "label": \n', "line 2: not valid JSON"),
    ('{"text": "fine", "label": 1}\n{"text": "", "label": 0}\n', "row 2: 'text' must be non-empty text"),
    ('{"words": "fine", "label": 1}\n', "has no column 'text'; its columns are words, label"),
])
def test_malformed_rows_are_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(tmp_path / "bad.jsonl"))


# --- command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--method", "qlora"], "invalid choice: 'qlora'"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--fraction", "1.5"], r"fraction must be in \(0, 1\]"),
    (["--r", "0"], "r must be a positive integer"),
    (["--dataset", "missing.csv"], "neither a built-in one"),
    (["--model", "./no/such/model"], "does not exist"),
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
])
def test_bad_flags_exit_2_with_one_clear_line(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["train", "--output", str(tmp_path / "run")] + args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and __import__("re").search(message, err), err


@pytest.mark.parametrize("text, message", [
    ('epochs = 1\nepoch = 2\n', "unknown setting 'epoch'; did you mean 'epochs'"),
    ('epochs = "three"\n', "setting 'epochs' must be int"),
    ('lr = [1]\n', "setting 'lr' must be a number"),
    ('r = 8\nreplora_sharing = "layer"\nmethod = "replora"\n', "unknown replora_sharing 'layer'"),
    ('epochs = \n', "does not parse"),
])
def test_bad_config_files_exit_2(tmp_path, capsys, text, message):
    (tmp_path / "c.toml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--output", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_config_file_and_flags_combine(tmp_path, tiny_folders, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    (tmp_path / "c.yaml").write_text(f"model: {tiny_folders['bert']}\ndataset: {data}\nmethod: moslora\nr: 4\n"
                                     "epochs: 1\nbatch_size: 8\nmoslora_mixer_init: orthogonal\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--r", "2", "--output", str(tmp_path / "run")]) == 0
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["method"] == "moslora" and settings["adapter"] == {"r": 2, "moslora_mixer_init": "orthogonal"}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["adapter_config"]["r"] == 2 and metrics["adapter_config"]["modules_to_save"] == ["classifier"]
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"settings.json", "metrics.json", "log.txt", "adapter", "checkpoints"}
    capsys.readouterr()
    assert main(["summary", str(tmp_path / "run")]) == 0
    assert re.search(r"moslora\s+1 0\s+accuracy\s+\d+\.\d\d ± 0\.00", capsys.readouterr().out)
    assert main(["summary", str(tmp_path)]) == 0  # the run below the folder is found (issue 35)
    assert re.search(r"moslora\s+1 0\s+accuracy", capsys.readouterr().out)
    assert main(["summary", str(tmp_path / "c.yaml")]) == 2  # no run at all: skipped, then one error line
    # The same output again without --resume is refused: nothing is overwritten.
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run")]) == 2


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_multiple_choice_trains_on_encoder_and_decoder(tmp_path, tiny_folders, model):
    mc = [{"text": f"which word is {w}?", "choices": ["red", "green", "blue"], "label": i % 3}
          for i, w in enumerate(["red", "green", "blue"] * 10)]
    data = write_jsonl(tmp_path / "mc.jsonl", mc)
    code = main(["train", "--model", tiny_folders[model], "--dataset", str(data), "--choices-column", "choices",
                 "--method", "replora", "--epochs", "1", "--batch-size", "4", "--output", str(tmp_path / "run")]
                + (["--mixed-precision", "bf16"] if model == "llama" else []))  # autocast runs on CPU too
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["steps"] == 6


@pytest.mark.slow
def test_two_processes_end_with_the_same_adapter_as_one(tmp_path, tiny_folders):
    # 69 train rows: 4 full batches of 16 and one of 5, which Accelerate evens out with repeated rows (3 on
    # the first process, all 8 on the second) that must not count; 9 validation and test rows.
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(87))
    # --keep last: the adapter is the last step's, which the last checkpoint holds too (the best adapter on
    # two processes is tested in test_budget.py).
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "replora",
              "--epochs", "2", "--batch-size", "16", "--seed", "3", "--lr", "5e-3", "--keep", "last"]
    one = run(common + ["--output", str(tmp_path / "one")], timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", "-m", "replora"] + common + ["--output", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    metrics = {k: json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two")}
    assert metrics["one"]["num_processes"] == 1 and metrics["two"]["num_processes"] == 2
    assert metrics["one"]["steps"] == metrics["two"]["steps"] == 10
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    last_checkpoint = load_file(tmp_path / "one" / "checkpoints" / "epoch-2" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(t, last_checkpoint[k]) for k, t in a.items())
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
    assert metrics["one"]["test_accuracy"] == metrics["two"]["test_accuracy"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_folders):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(400))
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "dora",
              "--lora-dropout", "0.1", "--epochs", "3", "--batch-size", "8", "--seed", "5"]
    assert run(common + ["--output", str(tmp_path / "whole")], timeout=300).returncode == 0

    out = tmp_path / "cut"
    kill_once_checkpointed(common, out)
    assert (out / "checkpoints" / "latest").read_text() == "epoch-1"
    from_step = checkpointed_step(out)

    resumed = run(common + ["--output", str(out), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed(out, from_step)
    whole, cut = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("whole", "cut"))
    assert cut["test_accuracy"] == whole["test_accuracy"]
    assert [h["validation_accuracy"] for h in cut["history"]] == [h["validation_accuracy"] for h in whole["history"]]
    for h_cut, h_whole in zip(cut["history"], whole["history"]):
        assert h_cut["train_loss"] == pytest.approx(h_whole["train_loss"], abs=1e-6)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The last checkpoint and the best adapter by validation it names (--keep best, the default).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"best-step-{cut['best_step']}", "epoch-3",
                                                                        "latest"]


def test_resume_with_other_settings_is_refused(tmp_path, tiny_folders, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    args = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--epochs", "1", "--batch-size", "8",
            "--output", str(tmp_path / "run")]
    assert main(args) == 0
    assert main(args + ["--resume", "--lr", "0.01"]) == 2
    assert "settings that differ from the run" in capsys.readouterr().err


def test_resume_alone_continues_with_the_runs_own_settings(tmp_path, tiny_folders, capsys):
    """`--output X --resume` needs no other flag: the run's settings.json has them all. A flag given beside it
    that differs from the run is refused, named (adapter options too)."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--epochs", "1", "--batch-size", "8",
                 "--method", "replora", "--r", "4", "--seed", "3", "--output", str(out)]) == 0
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert (again["method"], again["seed"], again["steps_this_run"]) == ("replora", 3, 0)
    assert again["test_accuracy"] == first["test_accuracy"]
    assert main(["train", "--output", str(out), "--resume", "--seed", "4", "--r", "8"]) == 2
    assert f"settings that differ from the run in {out}: r, seed;" in capsys.readouterr().err


def test_the_results_and_notes_are_printed_once(tmp_path, tiny_folders, capfd):
    """The table and the notes go to the console once (stdout); log.txt keeps them too."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(40))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--epochs", "2", "--batch-size", "8",
                 "--output", str(out)]) == 0
    console = "".join(capfd.readouterr())
    notes = run_notes(json.loads((out / "metrics.json").read_text()))
    assert notes, "expected a note (the kept adapter, or a score still improving)"
    for line in [*notes, "test acc"]:
        assert console.count(line) == 1, (line, console[-3000:])
    assert all(note in (out / "log.txt").read_text() for note in notes)
