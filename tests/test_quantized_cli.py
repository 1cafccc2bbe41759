"""`replora train --quantize 4bit|8bit` and what follows from it, with the real bitsandbytes on the CPU: tiny LLaMA
(sft and classification) and BERT (classification) folders trained a few steps; settings.json records the setting,
the quantized base stays as loaded, eval / resume / from_pretrained load the base as the run trained it, and bad
input (no bitsandbytes, image models, --method full) stops with one line and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import replora
from conftest import ENV, assert_resumed, sentiment_rows, write_jsonl
from replora.training import evaluation, loop
from replora.training.cli import main

bnb = pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

QUANTIZED = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


def qa_rows(n: int):
    return [{"prompt": f"item {i} is {'hot' if i % 2 else 'cold'}", "response": "yes" if i % 2 else "no"}
            for i in range(n)]


def packed(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantized base's stored tensors: packed weights and their scales (absmax / SCB), by layer."""
    found = {}
    for name, module in model.named_modules():
        if replora.quantized.is_quantized(module):
            weight = module.weight
            found[f"{name}.weight"] = weight.data.clone()
            state = getattr(weight, "quant_state", None)
            # (an 8-bit layer's row scales: on the weight until its first forward, then in the layer's state)
            scales = state.absmax if state is not None else getattr(weight, "SCB", None)
            found[f"{name}.scales"] = (scales if scales is not None else module.state.SCB).clone()
    return found


def the_model_trained(monkeypatch) -> dict:
    """Runs of `replora train` (through main) give their model to the dict returned, at the first and last step:
    the packed base tensors and the model itself."""
    seen = {}
    real_train = loop.train

    def train(settings, on_step=None):
        def observe(model, step):
            seen.setdefault("first", packed(model))
            seen["last"], seen["model"] = packed(model), model
            if on_step is not None:
                on_step(model, step)
        return real_train(settings, observe)

    monkeypatch.setattr(loop, "train", train)
    return seen


CASES = [  # (model folder, task, quantize, method): every method, both precisions, decoder and encoder
    ("lm", "sft", "4bit", "lora"), ("lm", "sft", "8bit", "replora"),
    ("llama", "classification", "4bit", "moslora"), ("llama", "classification", "8bit", "dora"),
    ("bert", "classification", "4bit", "dora"), ("bert", "classification", "8bit", "replora"),
]


@pytest.mark.parametrize("kind,task,quantize,method", CASES)
def test_train_quantized_records_it_and_leaves_the_base_as_loaded(tmp_path, tiny_folders, tiny_lm_folders, monkeypatch,
                                                                   kind, task, quantize, method):
    folder = tiny_lm_folders["plain"] if kind == "lm" else tiny_folders[kind]
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(24) if task == "sft" else sentiment_rows(32))
    seen = the_model_trained(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--model", folder, "--dataset", str(data), "--method", method, "--quantize", quantize,
                 "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "2", "--output", str(out)]) == 0
    assert json.loads((out / "settings.json").read_text())["quantize"] == quantize
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["steps"] >= 3

    model = seen["model"]
    layers = replora.model.adapted_layers(model)
    assert layers and all(layer.quantized and isinstance(layer.base_layer, QUANTIZED[quantize])
                          for layer in layers.values())
    # The base as loaded: its packed tensors the same at the last step as at the first, and as a fresh load's.
    assert seen["first"].keys() == seen["last"].keys() and seen["last"]
    assert all(torch.equal(seen["first"][k], seen["last"][k]) for k in seen["first"])
    reloaded = replora.from_pretrained(out)  # documented: the base quantized as the run loaded it
    assert packed(reloaded).keys() == seen["last"].keys()
    assert all(torch.equal(packed(reloaded)[k], seen["last"][k]) for k in seen["last"]), "the quantized base changed"
    if task == "classification":  # the new head: unquantized, float32, trained (modules_to_save)
        head = "classifier" if kind == "bert" else "score"
        copy = getattr(model, head).copies["default"]
        assert type(copy) is nn.Linear and copy.weight.dtype == torch.float32 and copy.weight.requires_grad
        assert not replora.quantized.is_quantized(getattr(reloaded, head).copies["default"])


def test_eval_resume_and_from_pretrained_use_the_runs_setting(tmp_path, tiny_lm_folders, monkeypatch, capsys):
    """A 4-bit sft run interrupted after its first checkpoint: `--output X --resume` alone continues it quantized;
    `replora eval` scores it on the 4-bit base (or as --quantize says); from_pretrained gives the 4-bit base back
    (or full precision with quantization_config=None)."""
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    out = tmp_path / "run"
    seen = the_model_trained(monkeypatch)
    steps_per_epoch = 3

    def stop_in_epoch_two(model, step):
        if step == steps_per_epoch + 1:  # epoch 1's checkpoint is written: as if interrupted here
            raise KeyboardInterrupt

    real = loop.train
    monkeypatch.setattr(loop, "train", lambda settings, on_step=None: real(settings, stop_in_epoch_two))
    assert main(["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--method", "replora",
                 "--quantize", "4bit", "--epochs", "2", "--batch-size", "8", "--max-new-tokens", "2",
                 "--output", str(out)]) == 130
    assert (out / "checkpoints" / "latest").read_text() == "epoch-1"
    monkeypatch.setattr(loop, "train", real)
    seen = the_model_trained(monkeypatch)
    assert main(["train", "--output", str(out), "--resume", "--quantize", "8bit"]) == 2  # not the run's
    assert "settings that differ from the run" in capsys.readouterr().err and not seen
    assert main(["train", "--output", str(out), "--resume"]) == 0
    assert_resumed(out, steps_per_epoch)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit)
               for layer in replora.model.adapted_layers(seen["model"]).values())

    loaded = []
    real_load = evaluation.load_causal_lm

    def load_causal_lm(name, quantize=None):  # the real loader; the test reads what it gave
        model, tokenizer = real_load(name, quantize)
        loaded.append(model)
        return model, tokenizer

    monkeypatch.setattr(evaluation, "load_causal_lm", load_causal_lm)
    rows = {}
    for given in (None, "8bit"):
        args = ["eval", "--adapter", str(out), "--dataset", str(data), "--max-new-tokens", "2",
                "--output", str(tmp_path / f"eval-{given}")]
        assert main(args + (["--quantize", given] if given else [])) == 0
        rows[given] = json.loads((tmp_path / f"eval-{given}" / "eval.json").read_text())
    assert rows[None]["quantize"] == "4bit" and rows["8bit"]["quantize"] == "8bit"
    for model, layer_class in zip(loaded, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        layers = replora.model.adapted_layers(model).values()
        assert layers and all(isinstance(layer.base_layer, layer_class) and not layer.merged_adapters for layer in layers)
    # the trainable share of the whole model: each 4-bit weight counted by its values, not its packed bytes
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(tiny_lm_folders["plain"])
    share = 100 * sum(t.numel() for t in adapter.values()) / sum(p.numel() for p in plain.parameters())
    assert rows[None]["trainable_percent"] == pytest.approx(share, rel=1e-9)
    assert rows["8bit"]["trainable_percent"] == pytest.approx(share, rel=1e-9)
    full = replora.from_pretrained(out, quantization_config=None)

    # from_pretrained(run folder): the base as the run trained it, the adapter's outputs of the run's last model
    reloaded = replora.from_pretrained(out).eval()
    layers = replora.model.adapted_layers(reloaded).values()
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers)
    ids = torch.tensor([[101, 2009, 2003, 102]])
    with torch.no_grad():
        manual = replora.from_pretrained(
            out, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_compute_dtype=torch.float32), device_map="cpu").eval()
        torch.testing.assert_close(reloaded(ids).logits, manual(ids).logits, rtol=0, atol=0)
        assert not any(replora.quantized.is_quantized(m) for m in full.modules())  # quantization_config=None: full
        replora.load_adapter(plain, out / "adapter")  # the full-precision base with the adapter, by hand
        torch.testing.assert_close(full.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)


def test_head_only_on_a_quantized_base_trains_the_head(tmp_path, tiny_folders, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(32))
    seen = the_model_trained(monkeypatch)
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "head", "--quantize",
                 "8bit", "--epochs", "1", "--batch-size", "8", "--output", str(tmp_path / "run")]) == 0
    model = seen["model"]
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear8bitLt)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("replora: error: "), stderr
    return lines[0]


@pytest.mark.slow  # (a fresh interpreter each)
@pytest.mark.parametrize("command", ["train", "eval"])
def test_missing_bitsandbytes_is_one_line_naming_the_install(tmp_path, tiny_lm_folders, command):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    args = (["train", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--quantize", "4bit",
             "--output", str(tmp_path / "run")] if command == "train" else
            ["eval", "--model", tiny_lm_folders["plain"], "--dataset", str(data), "--quantize", "8bit",
             "--output", str(tmp_path / "eval")])
    code = ("import sys; sys.modules['bitsandbytes'] = None  # as if not installed\n"
            "from replora.training.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_error_line(done.stderr)
    assert "bitsandbytes, which is not installed" in line and "pip install bitsandbytes" in line
    assert "replora[quantized]" in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_from_pretrained_of_a_quantized_run_without_bitsandbytes_names_the_install(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"model": "smollm2", "task": "sft", "quantize": "4bit"}))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import replora\n"
            "try:\n"
            f"    replora.from_pretrained({str(run)!r})\n"
            "except ValueError as e:\n"
            "    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "pip install bitsandbytes" in done.stdout


@pytest.mark.parametrize("model", ["dinov2-small", "efficientnet-lite0", "vit-folder"])
def test_image_models_are_refused(tmp_path, vision_folders, digits, capsys, model):
    """The packaged image models are refused before any data is read; an image folder with any model (here a
    transformers ViT folder) once the data says it holds images."""
    name = vision_folders["vit"] if model == "vit-folder" else model
    dataset = digits if model == "vit-folder" else "/nonexistent/data.csv"  # (never read: refused first)
    assert main(["train", "--model", name, "--dataset", dataset, "--quantize", "4bit", "--epochs", "1",
                 "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    what = "image classification" if model == "vit-folder" else f"image models ({model!r})"
    assert f"--quantize 4bit is not supported for {what}" in line and "leave out --quantize" in line
    assert not (tmp_path / "run").exists()


def test_full_fine_tuning_of_a_quantized_base_is_refused(tmp_path, tiny_folders, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(32))
    assert main(["train", "--model", tiny_folders["bert"], "--dataset", str(data), "--method", "full",
                 "--quantize", "8bit", "--output", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "quantized weights cannot be trained" in line and "--method full" in line
    with pytest.raises(SystemExit):  # argparse: one of the choices
        main(["train", "--quantize", "2bit"])
    assert "argument --quantize: invalid choice: '2bit'" in capsys.readouterr().err


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_a_bfloat16_base_trains_with_the_unquantized_rest_in_float32(tmp_path, tiny_lm_folders, monkeypatch, quantize):
    """transformers loads a folder in the dtype it was saved in; --quantize loads what stays unquantized
    (embeddings, norms, the output layer) in float32, as PEFT's prepare_model_for_kbit_training leaves it: a float32
    norm (replora.prepare_for_quantized_training) before a bfloat16 output layer would not even multiply."""
    from transformers import AutoTokenizer

    folder = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_lm_folders["plain"], dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_lm_folders["plain"]).save_pretrained(folder)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(24))
    seen = the_model_trained(monkeypatch)
    assert main(["train", "--model", str(folder), "--dataset", str(data), "--quantize", quantize, "--epochs", "1",
                 "--batch-size", "8", "--max-new-tokens", "2", "--output", str(tmp_path / "run")]) == 0
    model = seen["model"]
    unquantized = [p for p in model.parameters() if p.is_floating_point()]
    assert unquantized and {p.dtype for p in unquantized} == {torch.float32}
    assert isinstance(model.model.layers[0].mlp.up_proj, QUANTIZED[quantize])
    assert not model.is_gradient_checkpointing  # (replora train has no setting that asks for it)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["test_loss"]))
