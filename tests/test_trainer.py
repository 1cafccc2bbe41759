"""transformers' Trainer and TRL's SFTTrainer on an injected model, with no extra code: save_model and every
checkpoint write the adapter alone, training resumes from such a checkpoint to the same end as an unbroken
run, load_best_model_at_end loads the best one, and from_pretrained on the folder fails loudly."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertForSequenceClassification, Trainer, TrainingArguments)

import replora
from replora.saving import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict

from conftest import sentiment_rows

ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}
# What Trainer itself adds to a checkpoint (optimizer, scheduler, RNG, its state and arguments), what
# save_model adds beside the model (the tokenizer, when Trainer has one), and TRL's model card.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin",
                 "scaler.pt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "chat_template.jinja", "README.md"}
STEPS = dict(max_steps=6, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
             report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0)
CONFIG = dict(method="replora", r=4, lora_alpha=8, modules_to_save=["classifier"])


def sizes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in folder.iterdir()}


def assert_adapter_only(folder: Path, limit: int) -> None:
    files = sizes(folder)
    assert ADAPTER_FILES <= files.keys(), files
    assert not files.keys() - ADAPTER_FILES - TRAINER_FILES, "unexpected files"
    model_files = sum(size for name, size in files.items() if name not in TRAINER_FILES)
    assert model_files < limit, files


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}


def assert_same_adapter(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], atol=1e-7, rtol=1e-6, msg=key)


# ---- Trainer on a tiny BERT classifier ----

@pytest.fixture(scope="module")
def bert(tiny_folders):
    folder = tiny_folders["bert"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = sentiment_rows(24)
    encoded = tokenizer([r["text"] for r in rows], padding="max_length", max_length=16, truncation=True)
    data = Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})
    batch = tokenizer([r["text"] for r in rows[:4]], padding=True, return_tensors="pt")
    return folder, data, dict(batch)


def fresh_bert(folder: str):
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)


def train_bert(bert, out: Path, resume=None, compute_metrics=None, **overrides):
    folder, data, _ = bert
    model = replora.inject(fresh_bert(folder), replora.AdapterConfig(**CONFIG))
    trainer = Trainer(model=model, args=TrainingArguments(str(out), **{**STEPS, **overrides}), train_dataset=data,
                      eval_dataset=data.select(range(8)), compute_metrics=compute_metrics)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.fixture(scope="module")
def unbroken(bert, tmp_path_factory):
    """One 6-step run, checkpoints at steps 2, 4 and 6, then save_model to final/."""
    out = tmp_path_factory.mktemp("unbroken")
    model, trainer = train_bert(bert, out)
    trainer.save_model(str(out / "final"))
    return out, adapter(model), trainer.state.log_history, model


def losses(history) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_checkpoints_and_save_model_hold_the_adapter_alone(bert, unbroken, tmp_path):
    out, trained, _, model = unbroken
    full_model = (Path(bert[0]) / "model.safetensors").stat().st_size
    replora.save_adapter(model, tmp_path / "saved")
    adapter_size = sum(sizes(tmp_path / "saved").values())
    assert adapter_size < full_model / 50
    for step in (2, 4, 6):
        checkpoint = out / f"checkpoint-{step}"
        assert_adapter_only(checkpoint, limit=adapter_size + 1024)
        assert sum(sizes(checkpoint).values()) < full_model / 5  # the optimizer holds the trainable tensors only
    assert_adapter_only(out / "final", limit=adapter_size + 1024)
    # save_model writes exactly what save_adapter writes.
    config = json.loads((out / "final" / CONFIG_NAME).read_text())
    assert config == json.loads((tmp_path / "saved" / CONFIG_NAME).read_text())
    assert_same_adapter(load_file(out / "final" / WEIGHTS_NAME), trained)
    assert_same_adapter(load_file(out / "checkpoint-6" / WEIGHTS_NAME), trained)
    early = load_file(out / "checkpoint-2" / WEIGHTS_NAME)
    assert not torch.equal(early["classifier.weight"], trained["classifier.weight"])


def test_load_adapter_gives_the_trained_model(bert, unbroken):
    out, _, _, model = unbroken
    inputs = bert[2]
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        fresh = replora.load_adapter(fresh_bert(bert[0]), out / "final").eval()
        torch.testing.assert_close(fresh(**inputs).logits, expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(fresh_bert(bert[0]).eval()(**inputs).logits, expected, atol=1e-3)


@pytest.mark.parametrize("resume", ["path", "last"])
def test_resume_ends_like_an_unbroken_run(bert, unbroken, resume, tmp_path):
    out, trained, history, _ = unbroken
    if resume == "path":
        model, trainer = train_bert(bert, tmp_path / "run", resume=str(out / "checkpoint-2"))
    else:  # a run stopped after its step-4 checkpoint; resume_from_checkpoint=True finds that one
        shutil.copytree(out / "checkpoint-2", tmp_path / "run" / "checkpoint-2")
        shutil.copytree(out / "checkpoint-4", tmp_path / "run" / "checkpoint-4")
        model, trainer = train_bert(bert, tmp_path / "run", resume=True)
    assert_same_adapter(adapter(model), trained)
    # (the losses of the steps before the checkpoint come from its trainer_state.json)
    assert losses(trainer.state.log_history) == pytest.approx(losses(history), rel=1e-6)


def test_load_best_model_at_end_loads_the_best_checkpoint(bert, tmp_path):
    ranks = iter(range(100))  # each evaluation scores worse than the one before: the best checkpoint is the first
    model, trainer = train_bert(bert, tmp_path, compute_metrics=lambda _: {"rank": next(ranks)}, eval_strategy="steps",
                                eval_steps=2, load_best_model_at_end=True, metric_for_best_model="rank",
                                greater_is_better=False)
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    assert_same_adapter(adapter(model), load_file(tmp_path / "checkpoint-2" / WEIGHTS_NAME))
    assert not torch.equal(adapter(model)["classifier.weight"],
                           load_file(tmp_path / "checkpoint-6" / WEIGHTS_NAME)["classifier.weight"])


def test_from_pretrained_on_the_folder_fails_loudly(bert, unbroken, monkeypatch):
    """transformers hands a folder with adapter_config.json to PEFT, which refuses a config without
    peft_type; without PEFT it finds no config.json or no weights. Either way an error, never a half-loaded model."""
    final = unbroken[0] / "final"
    for cls in (AutoModelForSequenceClassification, BertForSequenceClassification):
        with pytest.raises(TypeError, match="peft_type"):
            cls.from_pretrained(final)
    import transformers.integrations.peft
    import transformers.models.auto.auto_factory

    for module in (transformers.integrations.peft, transformers.models.auto.auto_factory):
        monkeypatch.setattr(module, "is_peft_available", lambda: False)
    for cls in (AutoModelForSequenceClassification, BertForSequenceClassification):
        with pytest.raises((OSError, ValueError)):  # no config.json, no model weights
            cls.from_pretrained(final)


def test_save_pretrained_is_the_adapters_until_unload(bert, tmp_path):
    folder, _, inputs = bert
    model = replora.inject(fresh_bert(folder), replora.AdapterConfig(**CONFIG))
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(0.05)
    model.save_pretrained(tmp_path / "direct")
    assert sizes(tmp_path / "direct").keys() == ADAPTER_FILES
    assert_same_adapter(load_file(tmp_path / "direct" / WEIGHTS_NAME), adapter(model))
    # A deep copy saves itself, not the original.
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.classifier.copies["default"].weight.add_(1.0)
    twin.save_pretrained(tmp_path / "twin")
    assert torch.equal(load_file(tmp_path / "twin" / WEIGHTS_NAME)["classifier.weight"],
                       twin.classifier.copies["default"].weight)
    # save_merged still writes a whole transformers folder, the adapter merged in.
    replora.save_merged(model, tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= sizes(tmp_path / "merged").keys()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    # unload leaves nothing behind: the class's save_pretrained writes the whole model again.
    plain = replora.unload(model)
    assert "save_pretrained" not in plain.__dict__ and "replora_state" not in plain.__dict__
    plain.save_pretrained(tmp_path / "plain")
    assert {"config.json", "model.safetensors"} <= sizes(tmp_path / "plain").keys()


# ---- TRL's SFTTrainer on a tiny LLaMA ----

SFT_ROWS = [{"prompt": f"what is {i} plus {i}?", "completion": f" it is {2 * i}."} for i in range(12)]


def train_sft(folder: str, out: Path, resume=None):
    from trl import SFTConfig, SFTTrainer

    model = replora.inject(AutoModelForCausalLM.from_pretrained(folder), replora.AdapterConfig(method="moslora", r=4))
    args = SFTConfig(output_dir=str(out), **{**STEPS, "max_steps": 4, "per_device_train_batch_size": 3},
                     max_length=64, packing=False, bf16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SFT_ROWS),
                         processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_sft_trainer_saves_adapters_and_resumes(tiny_lm_folders, tmp_path):
    folder = tiny_lm_folders["plain"]
    model, trainer = train_sft(folder, tmp_path / "a")
    trainer.save_model(str(tmp_path / "a" / "final"))
    trained = adapter(model)
    replora.save_adapter(model, tmp_path / "saved")
    adapter_size = sum(sizes(tmp_path / "saved").values())
    assert adapter_size < (Path(folder) / "model.safetensors").stat().st_size / 50
    for name in ("checkpoint-2", "checkpoint-4", "final"):
        assert_adapter_only(tmp_path / "a" / name, limit=adapter_size + 1024)
    assert_same_adapter(load_file(tmp_path / "a" / "final" / WEIGHTS_NAME), trained)

    resumed, _ = train_sft(folder, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert_same_adapter(adapter(resumed), trained)

    ids = torch.tensor([[101, 2054, 2003, 1015, 4606, 1015, 102]])
    model.eval()
    with torch.no_grad():
        fresh = replora.load_adapter(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "a" / "final").eval()
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="peft_type"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final")


@pytest.mark.slow
def test_importing_replora_patches_nothing_and_model_py_imports_no_glue_at_the_top():
    """The Trainer glue is reached only where it acts: inject and unload import trainer.py for transformers models
    (it builds on saving.py, which builds on model.py); importing replora leaves transformers' Trainer as it is."""
    import ast
    import subprocess
    import sys

    import replora.model

    tree = ast.parse(Path(replora.model.__file__).read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    imported = {node.module for node in top if isinstance(node, ast.ImportFrom)}
    assert not imported & {"saving", "trainer", "replora.saving", "replora.trainer"}, imported
    code = ("import replora, transformers.trainer as t; "
            "assert not getattr(t.Trainer._load_from_checkpoint, 'replora_patched', False); "
            "import sys; assert 'replora.trainer' not in sys.modules and 'replora.training' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_patched_trainer_methods_match_the_installed_transformers(tiny_folders):
    """patch_trainer wraps two private Trainer methods: this fails when a transformers upgrade changes them, and the
    wrappers keep the originals' names and signatures (Trainer, TRL and users see the same methods)."""
    import inspect

    from transformers import Trainer

    import replora.trainer

    assert replora.trainer.trainer_api_problem(Trainer) is None
    replora.inject(BertForSequenceClassification.from_pretrained(tiny_folders["bert"]), replora.AdapterConfig())
    for name, parameters in replora.trainer.PATCHED_METHODS.items():
        method = getattr(Trainer, name)
        assert method.replora_patched and method.__name__ == name
        assert tuple(inspect.signature(method).parameters) == parameters


def test_a_changed_trainer_is_left_alone_with_a_warning():
    """Where the private methods differ (a future transformers), nothing is patched and the user hears what is
    lost and what to do instead."""
    from transformers import Trainer

    import replora.trainer

    class ChangedTrainer(Trainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None, strict=True):
            pass

    assert "takes (self, resume_from_checkpoint, model, strict)" in replora.trainer.trainer_api_problem(ChangedTrainer)
