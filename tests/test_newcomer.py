"""Issue 35: a newcomer followed the README word for word. Each test here fails on the behaviour reported:
the quick start's model folder, `replora summary` on real folder layouts, the PATH after set-up, export-gguf
on a classifier run, caps that overshot, the demo's output and help, skipped images in log.txt, deleting the
active adapter, and save_merged's tokenizer. (The README's own blocks and CLI lines: test_readme.py.)"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import replora
from replora.training import cli
from replora.training import data
from replora.training.data import SPLIT_SEED, capped, load_task, stratified_fraction, training_examples
from tests.conftest import TINY_MODELS, make_config, outputs, train_steps

ROOT = Path(__file__).resolve().parents[1]


# 1. a packaged model's folder --------------------------------------------------------------------------

def test_model_path_gives_the_packaged_folder_for_transformers():
    from replora.training import model_path  # public, beside train and TrainSettings
    from replora.training.pretrained import minilm_path

    path = model_path("minilm")
    assert Path(path) == minilm_path() and (Path(path) / "config.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert model.config.num_labels == 2 and model.config.model_type == "bert"


def test_model_path_checks_folders_and_refuses_what_has_no_folder(tmp_path):
    from replora.training import model_path

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_path(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model_path(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a transformers folder.*replora train --model efficientnet-lite0"):
        model_path("efficientnet-lite0")
    assert model_path("org/some-model") == "org/some-model"  # a hub id, as given


# 3. replora summary ------------------------------------------------------------------------------------

def _run(folder: Path, method: str, seed: int, accuracy: float, fraction: float = 1.0, **settings) -> Path:
    """A finished run folder as `replora train` leaves it: settings.json (every setting) and metrics.json."""
    folder.mkdir(parents=True)
    recorded = dict(model="minilm", dataset="rotten_tomatoes", task="classification", method=method,
                    fraction=fraction, epochs=2, lr=1e-3, seed=seed, output=str(folder), resume=False,
                    adapter={"r": 8}, **settings)
    (folder / "settings.json").write_text(json.dumps(recorded))
    metrics = dict(test_accuracy=accuracy, validation_accuracy=accuracy, trainable_parameters=74498, steps=10,
                   wall_time_seconds=60.0 + seed, method=method, model="minilm", dataset="rotten_tomatoes",
                   seed=seed, fraction=fraction, lr=1e-3, output=str(folder))
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _summary(capsys, *paths) -> tuple[int, list[str], str]:
    code = cli.main(["summary", *map(str, paths)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_summary_finds_runs_below_a_folder_and_skips_what_is_not_a_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "demo" / "lora", "lora", 0, 0.76)
    _run(runs / "demo" / "replora", "replora", 0, 0.77)
    _run(runs / "rep-30", "replora", 1, 0.70, fraction=0.3)
    (runs / "notes.txt").write_text("mine")
    (runs / "empty").mkdir()
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "settings.json").write_text("{}")
    # what the shell passes for runs/* (and for runs/full/* when runs/full does not exist: the pattern itself)
    code, lines, err = _summary(capsys, *sorted(runs.iterdir()), runs / "full" / "*")
    assert code == 0
    rows = [line for line in lines[1:] if line.strip()]
    assert len(rows) == 3, lines  # lora and replora of the demo (found one level down), and rep-30
    assert sum(" lora " in r for r in rows) == 1 and sum(" replora " in r for r in rows) == 2
    skipped = err.splitlines()
    assert len(skipped) == 4 and all(line.startswith("skipped ") for line in skipped), err
    assert any("notes.txt: a file, not a run folder" in line for line in skipped)
    assert any("empty: no finished run" in line for line in skipped)
    assert any("unfinished" in line and "--resume" in line for line in skipped)
    assert any("full/*: no such file or folder" in line for line in skipped)
    # the trainable parameters of one group are printed, not a traceback
    assert "74,498" in rows[0]


def test_summary_groups_by_every_setting_that_differs(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "a", "replora", 0, 0.70, fraction=0.3)
    _run(runs / "b", "replora", 1, 0.80, fraction=1.0)
    _run(runs / "c", "replora", 2, 0.90, fraction=1.0)
    code, lines, _ = _summary(capsys, runs / "a", runs / "b", runs / "c")
    rows = [line for line in lines[1:] if line.strip()]
    assert code == 0 and len(rows) == 2, lines  # never "3 runs, seeds 0,1,2" averaged over two fractions
    (partial,) = [r for r in rows if "fraction 0.3" in r]
    (full,) = [r for r in rows if "fraction 1.0" in r]
    assert "70.00 ± 0.00" in partial and " 1 0 " in partial.replace("  ", " ")
    assert "85.00 ± 7.07" in full and "1,2" in full
    assert "settings that differ" in lines[0]
    # an adapter option differs too: a third group
    d = _run(runs / "d", "replora", 0, 0.60, fraction=1.0)
    settings = json.loads((d / "settings.json").read_text())
    settings["adapter"] = {"r": 16}
    (d / "settings.json").write_text(json.dumps(settings))
    _, lines, _ = _summary(capsys, runs)
    rows = [line for line in lines[1:] if line.strip()]
    assert len(rows) == 3 and any("adapter.r 16" in r for r in rows), lines


def test_summary_with_no_run_at_all_is_one_line_and_exit_code_2(tmp_path, capsys):
    code, _, err = _summary(capsys, tmp_path / "nothing")
    assert code == 2 and "no finished run" in err.splitlines()[-1]


# 4. the PATH after set-up ------------------------------------------------------------------------------

def test_set_up_says_how_to_put_replora_on_the_path():
    readme = (ROOT / "README.md").read_text()
    setup_block = readme.split("## Set up", 1)[1].split("## Quick start", 1)[0]
    assert "source .venv/bin/activate" in setup_block
    assert "source .venv/bin/activate" in (ROOT / "setup.sh").read_text().splitlines()[-1]


# 5. export-gguf on a classifier run --------------------------------------------------------------------

def test_export_gguf_refuses_modules_to_save_before_loading_the_model(tmp_path, capsys, tiny_lm_folders):
    from transformers import LlamaForSequenceClassification

    base = tiny_lm_folders["plain"]
    classifier = LlamaForSequenceClassification.from_pretrained(base, num_labels=1)
    replora.inject(classifier, replora.AdapterConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["score"]))
    run = tmp_path / "mc-run"
    replora.save_adapter(classifier, run / "adapter")
    (run / "settings.json").write_text(json.dumps({"model": base, "task": "multiple-choice"}))
    out = tmp_path / "lora.gguf"
    code = cli.main(["export-gguf", "--adapter", str(run), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "GGUF cannot hold" in err and "modules_to_save: score" in err
    assert "save_merged" in err and "convert_hf_to_gguf.py" in err and "matches no module" not in err


# 6. caps are caps --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["social_iqa", "rotten_tomatoes"])
@pytest.mark.parametrize("n", [1, 4, 16, 32, 96])
def test_a_training_cap_is_never_exceeded(dataset, n):
    train = load_task(dataset).train
    picked = training_examples(train, n, 1.0, seed=0)
    assert len(picked) == n  # social_iqa: 32 gave 33, 96 gave 97
    assert picked == training_examples(train, n, 1.0, seed=5)  # the cap's subset is the same for every seed
    share = Counter(e["label"] for e in train)
    got = Counter(e["label"] for e in picked)
    for label, count in share.items():  # stratified: each label within one of its exact share
        assert abs(got[label] - n * count / len(train)) <= 1


def test_a_cap_keeps_the_old_subset_where_the_rounding_already_added_up():
    train = load_task("rotten_tomatoes").train
    assert data.stratified_sample(train, 32, SPLIT_SEED) == stratified_fraction(train, 32 / len(train), SPLIT_SEED)


@pytest.mark.slow
def test_an_evaluation_cap_is_never_exceeded_on_a_mixed_dataset():
    task = load_task("commonsense")
    for split in (task.validation, task.test):
        for n in (4, 8, 200):
            capped_split = capped(split, n)
            assert len(capped_split) == n  # 4 gave 8 validation and 9 test items (one per task, at least)
            assert capped_split == capped(split, n)
    largest = Counter(e["task"] for e in task.test).most_common(1)[0][0]
    assert Counter(e["task"] for e in capped(task.test, 4))[largest] >= 1  # fewer items than tasks: by share


def test_stratified_sample_edge_cases():
    rows = [{"text": str(i), "label": i % 3} for i in range(10)]
    assert data.stratified_sample(rows, 10, 0) == rows and data.stratified_sample(rows, 50, 0) == rows
    assert len(data.stratified_sample(rows, 2, 0)) == 2 and len(data.stratified_sample(rows, 9, 0)) == 9
    with pytest.raises(ValueError, match="at least 1"):
        data.stratified_sample(rows, 0, 0)


# 8. smaller points -------------------------------------------------------------------------------------

def test_demo_help_describes_every_option():
    parser = cli.build_parser()
    demo = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "demo")[1]
    options = [a for a in demo._actions if a.option_strings and a.dest != "help"]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]
    assert "runs/demo" in demo.format_help() and demo.description


@pytest.mark.slow
def test_demo_says_where_it_wrote(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--methods", "lora", "--max-train-examples", "8", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "runs/demo/lora" in out and (tmp_path / "runs" / "demo" / "lora" / "metrics.json").is_file()


def _bad_image_folder(digits: str, tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    shutil.copytree(digits, folder)
    (folder / "0" / "broken.png").write_bytes(b"not a png")
    return folder


def test_skipped_images_are_kept_for_the_run_log(digits, tmp_path):
    task = load_task(str(_bad_image_folder(digits, tmp_path)))
    assert len(task.notes) == 1 and "skipped 1 file" in task.notes[0] and "broken.png" in task.notes[0]
    assert load_task(digits).notes == []


def test_skipped_images_are_in_log_txt(digits, tmp_path, vision_folders):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", str(_bad_image_folder(digits, tmp_path)), "--model", vision_folders["vit"],
                     "--max-steps", "1", "--batch-size", "8", "--output", str(out)]) == 0
    assert "broken.png" in (out / "log.txt").read_text()


def test_deleting_the_active_adapter_is_refused_and_changes_nothing():
    tiny = TINY_MODELS["bert"]
    model = train_steps(replora.inject(tiny.build(), make_config(tiny, "lora")), tiny)
    inputs = tiny.inputs()
    replora.add_adapter(model, make_config(tiny, "replora"), "other")
    replora.set_adapter(model, "other")
    train_steps(model, tiny)
    before = outputs(model, inputs)
    with pytest.raises(ValueError, match=r"'other' is the active one.*replora.set_adapter\(model, 'default'\)"):
        replora.delete_adapter(model, "other")
    assert replora.active_adapter(model) == "other"
    torch.testing.assert_close(outputs(model, inputs), before)
    replora.set_adapter(model, "default")
    replora.delete_adapter(model, "other")  # the fix the message names works
    assert replora.active_adapter(model) == "default"


def test_save_merged_writes_the_tokenizer_beside_the_model(tmp_path, tiny_folders):
    path = tiny_folders["bert"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    replora.inject(model, replora.AdapterConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    torch.nn.init.normal_(next(p for n, p in model.named_parameters() if "lora_B" in n))
    folder = replora.save_merged(model, tmp_path / "merged", tokenizer=tokenizer)
    alone_tokenizer = AutoTokenizer.from_pretrained(folder)  # the folder runs alone
    alone = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = alone_tokenizer(["a fine film"], return_tensors="pt")
    assert batch["input_ids"].tolist() == tokenizer(["a fine film"], return_tensors="pt")["input_ids"].tolist()
    model.eval()
    torch.testing.assert_close(alone(**batch).logits, model(**batch).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="tokenizer or processor"):
        replora.save_merged(model, tmp_path / "other", tokenizer="bert")
    assert not (tmp_path / "other").exists()
