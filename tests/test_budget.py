"""The training budget and what a run keeps: --min-steps (the default budget in steps for small data),
--eval-steps, --keep best / last, --early-stopping-patience, the "still improving" note; killed and
resumed, and on two processes. Tiny model folders, a few seconds a run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from replora.training import TrainSettings
from replora.training import objectives
from replora.training.cli import main

from conftest import ENV, REPLORA, assert_resumed, checkpointed_step, kill_once_checkpointed, sentiment_rows, write_jsonl


def split_rows(tmp_path, train: int = 40, flipped: bool = False):
    """A jsonl file with a split column: `train` rows, 16 validation and 16 test rows. With `flipped` the
    validation labels are the opposite of the training ones, so validation gets worse as the model learns:
    the best validation comes early, and keeping the best keeps a barely trained adapter."""
    rows = [{**r, "split": "train"} for r in sentiment_rows(train)]
    rows += [{"text": r["text"], "label": 1 - r["label"] if flipped else r["label"], "split": "validation"}
             for r in sentiment_rows(16)]
    rows += [{**r, "split": "test"} for r in sentiment_rows(16)]
    return write_jsonl(tmp_path / ("flipped.jsonl" if flipped else "d.jsonl"), rows)


def tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scripted(monkeypatch, objective, name: str, scores: list[float]) -> None:
    """The objective's validation returns these scores, one per validation, in order."""
    scores = list(scores)
    monkeypatch.setattr(objective, "validate", lambda self, model, loader, accelerator: {name: scores.pop(0)})


def read(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


# --- the budget --------------------------------------------------------------------------------

def test_the_default_budget_makes_whole_passes_until_min_steps():
    # The data: 1,100 rows, 880 to train on at batch 32 = 28 steps a pass; 2 passes were 56 steps.
    assert TrainSettings().planned_epochs(28) == 11  # 308 steps
    assert TrainSettings().planned_epochs(307) == 2  # Rotten Tomatoes' 9,809 snippets keep their 2 epochs
    assert TrainSettings(min_steps=0).planned_epochs(28) == 2  # the old budget
    assert TrainSettings(epochs=1, min_steps=500).planned_epochs(28) == 1  # --epochs is taken as given


def test_min_steps_sets_the_passes_and_is_recorded(tmp_path, tiny_folders):
    data = split_rows(tmp_path)  # 40 training rows at batch 8: 5 steps a pass
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8"]
    assert main(common + ["--min-steps", "12", "--output", str(tmp_path / "auto")]) == 0
    m = read(tmp_path / "auto")
    assert m["steps"] == m["planned_steps"] == 15 and m["epochs"] == 3  # whole passes: 3 x 5 >= 12
    assert [h["step"] for h in m["history"]] == [5, 10, 15]  # validation each pass by default
    settings = json.loads((tmp_path / "auto" / "settings.json").read_text())
    assert settings["epochs"] == 3 and settings["min_steps"] == 12  # the resolved budget, as run
    assert main(common + ["--min-steps", "12", "--epochs", "1", "--output", str(tmp_path / "one")]) == 0
    assert read(tmp_path / "one")["steps"] == 5  # --epochs given: --min-steps has no say
    assert main(common + ["--max-steps", "7", "--output", str(tmp_path / "max")]) == 0
    assert read(tmp_path / "max")["steps"] == 7 and [h["step"] for h in read(tmp_path / "max")["history"]] == [5, 7]


def test_eval_steps_validates_every_n_steps_and_at_the_end(tmp_path, tiny_folders):
    data = split_rows(tmp_path)
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--eval-steps", "4", "--output", str(tmp_path / "run")]) == 0
    m = read(tmp_path / "run")
    assert [h["step"] for h in m["history"]] == [4, 8, 12, 15] and [h["epoch"] for h in m["history"]] == [1, 2, 3, 3]
    assert all("validation_accuracy" in h and h["train_loss"] > 0 for h in m["history"]) and m["validations"] == 4


@pytest.mark.parametrize("args, message", [
    (["--min-steps", "-1"], "min_steps must be an integer >= 0"),
    (["--eval-steps", "0"], "eval_steps must be a positive integer"),
    (["--early-stopping-patience", "0"], "early_stopping_patience must be a positive integer"),
    (["--keep", "first"], "invalid choice: 'first'"),
])
def test_bad_budget_flags_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main(["train", "--output", str(tmp_path / "run")] + args))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# --- the best adapter, early stopping, the end-of-run notes --------------------------------------

def test_the_best_adapter_by_validation_is_saved_and_tested(tmp_path, tiny_folders, monkeypatch, capsys):
    data = split_rows(tmp_path)
    tested = []
    real_test = objectives.ScoreHead.test

    def test(self, model, loader, examples, accelerator):
        tested.append({k: v.detach().clone() for k, v in replora_state(accelerator.unwrap_model(model)).items()})
        return real_test(self, model, loader, examples, accelerator)

    monkeypatch.setattr(objectives.ScoreHead, "test", test)
    scripted(monkeypatch, objectives.ScoreHead, "validation_accuracy", [0.5, 0.75, 0.625])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--lr", "1e-2", "--output", str(out)]) == 0
    m = read(out)
    assert m["kept"] == "best" and m["best_step"] == m["adapter_step"] == 10 and m["steps"] == 15
    assert m["validation_accuracy"] == 0.75 and [h["validation_accuracy"] for h in m["history"]] == [0.5, 0.75, 0.625]
    assert not m["still_improving"] and not m["stopped_early"]
    best = tensors(out / "checkpoints" / "best-step-10")
    assert same(tensors(out / "adapter"), best)  # <run>/adapter is the best one ...
    assert not same(best, tensors(out / "checkpoints" / "epoch-3" / "adapter"))  # ... not the last step's
    assert same(tested[0], best)  # and it is the one tested
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best-step-10", "epoch-3", "latest"]
    printed = capsys.readouterr().out
    assert "kept the adapter of step 10 of 15, the best validation accuracy (0.7500; the last step's: 0.6250)" in printed
    assert "kept the adapter of step 10" in (out / "log.txt").read_text() and "still rising" not in printed


def replora_state(model) -> dict:
    from replora.saving import adapter_state_dict
    return adapter_state_dict(model)


def test_keep_last_keeps_the_last_steps_adapter(tmp_path, tiny_folders, monkeypatch):
    data = split_rows(tmp_path)
    scripted(monkeypatch, objectives.ScoreHead, "validation_accuracy", [0.5, 0.75, 0.625])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--lr", "1e-2", "--keep", "last", "--output", str(out)]) == 0
    m = read(out)
    assert m["kept"] == "last" and m["adapter_step"] == 15 and m["best_step"] == 10 and m["validation_accuracy"] == 0.625
    assert same(tensors(out / "adapter"), tensors(out / "checkpoints" / "epoch-3" / "adapter"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-3", "latest"]  # no best kept on disk


@pytest.mark.parametrize("method", ["head", "full"])
def test_without_an_adapter_the_best_weights_are_kept_in_memory(tmp_path, tiny_folders, monkeypatch, method):
    """--method head and full keep no checkpoints: the best weights are a copy in memory, put back for the test."""
    data = split_rows(tmp_path)
    scores, seen, tested = [0.5, 0.75, 0.625], [], []
    weights = lambda model: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731

    def validate(self, model, loader, accelerator):
        seen.append(weights(accelerator.unwrap_model(model)))
        return {"validation_accuracy": scores.pop(0)}

    def test(self, model, loader, examples, accelerator):
        tested.append(weights(accelerator.unwrap_model(model)))
        return {"test_accuracy": 0.5}

    monkeypatch.setattr(objectives.ScoreHead, "validate", validate)
    monkeypatch.setattr(objectives.ScoreHead, "test", test)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--lr", "1e-2", "--method", method, "--output", str(out)]) == 0
    assert read(out)["best_step"] == read(out)["adapter_step"] == 10 and not (out / "checkpoints").exists()
    assert same(tested[0], seen[1]) and not same(seen[1], seen[2])


def test_early_stopping_stops_after_patience_validations_without_a_better_one(tmp_path, tiny_folders, monkeypatch,
                                                                             capsys):
    data = split_rows(tmp_path)
    scripted(monkeypatch, objectives.ScoreHead, "validation_accuracy", [0.5, 0.75, 0.75, 0.625, 0.9, 0.9])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--eval-steps", "2", "--early-stopping-patience", "2", "--output", str(out)]) == 0
    m = read(out)
    # Validations at steps 2, 4, 6, 8: the best at 4 (a tie is no better), then two without a better one.
    assert m["stopped_early"] and m["steps"] == 8 and m["planned_steps"] == 15 and m["best_step"] == 4
    assert [h["step"] for h in m["history"]] == [2, 4, 6, 8] and m["validation_accuracy"] == 0.75
    assert same(tensors(out / "adapter"), tensors(out / "checkpoints" / "best-step-4"))
    assert (out / "checkpoints" / "latest").read_text() == "epoch-2"  # the stop is checkpointed: a resume ends too
    assert "stopped early at step 8 of 15: no better validation accuracy in the last 2 validations" in capsys.readouterr().out
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--eval-steps", "2", "--early-stopping-patience", "2", "--output", str(out), "--resume"]) == 0
    assert read(out)["steps"] == 8 and read(out)["history"] == m["history"]


def test_a_score_still_improving_at_the_end_is_noted(tmp_path, tiny_folders, monkeypatch, capsys):
    data = split_rows(tmp_path)
    scripted(monkeypatch, objectives.ScoreHead, "validation_accuracy", [0.5, 0.625, 0.75])
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8", "--epochs", "3",
                 "--output", str(out)]) == 0
    m = read(out)
    assert m["still_improving"] and m["best_step"] == m["steps"] == 15
    line = ("validation accuracy was still rising at the end (0.6250 -> 0.7500 at the last validation): more steps "
            "may help (--epochs, --max-steps or --min-steps)")
    assert line in capsys.readouterr().out and line in (out / "log.txt").read_text()
    assert same(tensors(out / "adapter"), tensors(out / "checkpoints" / "best-step-15"))


@pytest.mark.parametrize("losses, best_step, improving", [([2.0, 1.0, 1.5], 6, False), ([2.0, 1.5, 1.0], 9, True)])
def test_sft_keeps_the_lowest_validation_loss(tmp_path, tiny_lm_folders, monkeypatch, capsys, losses, best_step,
                                              improving):
    rows = [{"prompt": f"item {i} is {'hot' if i % 2 else 'cold'}", "response": "yes" if i % 2 else "no"}
            for i in range(30)]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)  # 24 to train on at batch 8: 3 steps a pass
    scripted(monkeypatch, objectives.Generative, "validation_loss", losses)
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--batch-size", "8",
                 "--epochs", "3", "--max-new-tokens", "2", "--output", str(out)]) == 0
    m = read(out)
    assert m["best_step"] == m["adapter_step"] == best_step and m["validation_loss"] == min(losses)
    assert m["still_improving"] is improving
    assert ("validation loss was still falling" in capsys.readouterr().out) is improving


def test_a_run_begun_before_these_settings_resumes_as_it_began(tmp_path, tiny_folders):
    """A run folder whose settings.json predates --min-steps / --keep resumes with the old budget (2 passes)
    and the last step's adapter, and is not refused for settings it never had."""
    data = split_rows(tmp_path)
    out = tmp_path / "run"
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--batch-size", "8"]
    assert main(common + ["--epochs", "2", "--keep", "last", "--output", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    for key in ("min_steps", "keep", "eval_steps", "early_stopping_patience"):
        del settings[key]
    (out / "settings.json").write_text(json.dumps(settings))
    (out / "metrics.json").unlink()
    assert main(common + ["--output", str(out), "--resume"]) == 0  # no --epochs, no --keep: as it began
    m = read(out)
    assert m["steps"] == 10 and m["epochs"] == 2 and m["kept"] == "last"
    assert set(json.loads((out / "settings.json").read_text())) == set(settings)  # its record is left alone


# --- killed and resumed, and two processes -------------------------------------------------------

@pytest.mark.slow
def test_killed_run_resumes_with_the_same_best_adapter(tmp_path, tiny_folders):
    data = split_rows(tmp_path, train=96, flipped=True)  # 12 steps a pass at batch 8
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "lora", "--lr", "5e-2",
              "--epochs", "3", "--batch-size", "8", "--seed", "4", "--eval-steps", "5"]
    whole = subprocess.run(REPLORA + common + ["--output", str(tmp_path / "whole")], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    kill_once_checkpointed(common, out)
    assert (out / "checkpoints" / "latest").read_text() == "epoch-1"
    from_step = checkpointed_step(out)
    resumed = subprocess.run(REPLORA + common + ["--output", str(out), "--resume"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_resumed(out, from_step)
    a, b = read(tmp_path / "whole"), read(out)
    assert a["best_step"] == b["best_step"] and a["test_accuracy"] == b["test_accuracy"]
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [5, 10, 15, 20, 25, 30, 35, 36]
    assert [h["validation_accuracy"] for h in a["history"]] == [h["validation_accuracy"] for h in b["history"]]
    for ha, hb in zip(a["history"], b["history"]):  # (the loss of steps 11-12, before the kill, is kept too)
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-6)
    assert a["best_step"] < a["steps"]  # the flipped validation: the best comes early
    ta, tb = tensors(tmp_path / "whole" / "adapter"), tensors(out / "adapter")
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
    best = f"best-step-{a['best_step']}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [best, "epoch-3", "latest"]


@pytest.mark.slow
def test_two_processes_keep_and_test_the_same_best_adapter_as_one(tmp_path, tiny_folders):
    data = split_rows(tmp_path, train=64, flipped=True)  # 4 steps a pass at batch 16
    common = ["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "lora", "--lr", "5e-2",
              "--epochs", "6", "--batch-size", "16", "--seed", "3", "--eval-steps", "3"]
    last = subprocess.run(REPLORA + common + ["--keep", "last", "--output", str(tmp_path / "last")], env=ENV,
                          capture_output=True, text=True, timeout=300)
    one = subprocess.run(REPLORA + common + ["--output", str(tmp_path / "one")], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert last.returncode == 0 and one.returncode == 0, (last.stderr + one.stderr)[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29541", "-m", "replora"] + common + ["--output", str(tmp_path / "two")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    m = {k: read(tmp_path / k) for k in ("last", "one", "two")}
    assert m["two"]["num_processes"] == 2 and m["one"]["best_step"] == m["two"]["best_step"] < m["one"]["steps"]
    # Both processes test the best adapter: the last one scores otherwise on this data, so a process that
    # tested its own last weights would move the gathered figure.
    assert m["last"]["test_accuracy"] != m["one"]["test_accuracy"] == m["two"]["test_accuracy"]
    a, b = tensors(tmp_path / "one" / "adapter"), tensors(tmp_path / "two" / "adapter")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
