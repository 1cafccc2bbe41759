"""replora.from_pretrained(folder): the base model the folder records, loaded with its task's Auto class and a head
of the adapter's width, plus the adapter, in one call; from replora adapter folders, run folders of replora train
and PEFT adapter folders; and one clear line when the folder or its base model cannot be found."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, ViTConfig, ViTForImageClassification, ViTModel)

import replora
from replora.training.cli import main
from replora.training.pretrained import load_model

from conftest import TINY_MODELS, TinyModel, outputs, write_jsonl
from data.make_v0_1_adapters import CASES

V0_1 = Path(__file__).parent / "data" / "v0.1"
BERT = dict(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=32)
LLAMA = dict(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=32)
TEXT = TinyModel("text", None, None, None)  # for its inputs: token ids with padding in one row


def perturbed(model, config: replora.AdapterConfig):
    """The model with an adapter away from its init: every trainable tensor (factors and head) changed."""
    replora.inject(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


# The base folder saved, the model a user trains from it (another head, or none before), its task_type, the adapter.
CASES_BY_TASK = {
    # a bare encoder folder (like the packaged MiniLM): the classifier's 5 labels come from the adapter's head
    "seq-cls": (lambda: BertModel(BertConfig(**BERT)),
                lambda base: BertForSequenceClassification.from_pretrained(base, num_labels=5),
                "SEQ_CLS", dict(method="replora", modules_to_save=["classifier"])),
    # a folder saved with a 2-label head, an adapter trained with a 7-label one
    "token-cls": (lambda: BertForTokenClassification(BertConfig(**BERT, num_labels=2)),
                  lambda base: BertForTokenClassification.from_pretrained(base, num_labels=7,
                                                                          ignore_mismatched_sizes=True),
                  "TOKEN_CLS", dict(method="dora", modules_to_save=["classifier"])),
    "question-answering": (lambda: BertModel(BertConfig(**BERT)), BertForQuestionAnswering.from_pretrained,
                           "QUESTION_ANS", dict(method="moslora", modules_to_save=["qa_outputs"])),
    "causal-lm": (lambda: LlamaForCausalLM(LlamaConfig(**LLAMA)), LlamaForCausalLM.from_pretrained,
                  "CAUSAL_LM", dict(method="replora", target_modules="all-linear")),
    # a decoder classifier (3 labels) on a causal-LM folder, which names its pad token
    "decoder-seq-cls": (lambda: LlamaForCausalLM(LlamaConfig(**LLAMA, pad_token_id=0)),
                        lambda base: LlamaForSequenceClassification.from_pretrained(base, num_labels=3),
                        "SEQ_CLS", dict(method="lora", modules_to_save=["score"])),
}


@pytest.mark.parametrize("case", list(CASES_BY_TASK))
def test_adapter_folder_loads_with_its_base_in_one_call(case, tmp_path):
    build_base, start, task, options = CASES_BY_TASK[case]
    torch.manual_seed(0)
    build_base().save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = perturbed(start(tmp_path / "base"), replora.AdapterConfig(r=4, **options))
    replora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == task and config["base_model_name_or_path"] == str(tmp_path / "base")

    loaded = replora.from_pretrained(tmp_path / "adapter").eval()
    assert type(loaded) is type(model)
    inputs = TEXT.inputs()
    with torch.no_grad():
        expected, got = model(**inputs), loaded(**inputs)
    for name in ("logits", "start_logits", "end_logits"):
        if name in expected:
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert replora.get_config(loaded).to_dict() == replora.get_config(model).to_dict()
    # Ready to resume training, as load_adapter leaves it.
    assert replora.count_parameters(loaded) == replora.count_parameters(model)


def test_model_override_and_a_model_object(tmp_path):
    torch.manual_seed(0)
    BertModel(BertConfig(**BERT)).save_pretrained(tmp_path / "base")
    start = CASES_BY_TASK["seq-cls"][1]
    model = perturbed(start(tmp_path / "base"), replora.AdapterConfig(modules_to_save=["classifier"]))
    replora.save_adapter(model, tmp_path / "adapter")
    expected = outputs(model, TEXT.inputs())
    shutil.move(tmp_path / "base", tmp_path / "moved")  # the recorded base is gone
    with pytest.raises(FileNotFoundError, match=r"does not exist.*base_model_name_or_path in .*pass model="):
        replora.from_pretrained(tmp_path / "adapter")
    for override in (tmp_path / "moved", str(tmp_path / "moved")):
        assert torch.equal(outputs(replora.from_pretrained(tmp_path / "adapter", model=override).eval(), TEXT.inputs()),
                           expected)
    # A model object gets the adapter (as PeftModel.from_pretrained(model, folder)).
    base = BertForSequenceClassification.from_pretrained(tmp_path / "moved", num_labels=5).eval()
    assert replora.from_pretrained(tmp_path / "adapter", model=base) is base
    assert torch.equal(outputs(base, TEXT.inputs()), expected)
    with pytest.raises(TypeError, match="loading options \\(dtype\\) apply to a base model it loads"):
        replora.from_pretrained(tmp_path / "adapter", model=base, dtype=torch.bfloat16)
    # load_kwargs go to transformers' from_pretrained.
    half = replora.from_pretrained(tmp_path / "adapter", model=tmp_path / "moved", dtype=torch.bfloat16)
    assert half.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_a_0_1_adapter_without_base_or_task_loads_with_model(tmp_path):
    """Files that record neither base nor task: the task comes from the base folder's class, the head from the file."""
    tiny = TINY_MODELS[CASES["bert-lora"][0]]
    tiny.build().save_pretrained(tmp_path / "base")
    expected = load_file(V0_1 / "bert-lora" / "expected.safetensors")
    want = expected.pop("logits")
    with pytest.raises(ValueError, match=r"does not record its base model.*pass model="):
        replora.from_pretrained(V0_1 / "bert-lora")
    model = replora.from_pretrained(V0_1 / "bert-lora", model=tmp_path / "base").eval()
    assert isinstance(model, BertForSequenceClassification)
    torch.testing.assert_close(outputs(model, expected), want, atol=1e-6, rtol=1e-6)


def test_image_classifier_without_task_type(tmp_path):
    """PEFT has no task type for image classification: saved as null, found from the base folder's config."""
    vit = dict(image_size=16, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96)
    torch.manual_seed(0)
    ViTModel(ViTConfig(**vit), add_pooling_layer=False).save_pretrained(tmp_path / "base")
    start = ViTForImageClassification.from_pretrained(tmp_path / "base", num_labels=4)
    model = perturbed(start, replora.AdapterConfig(modules_to_save=["classifier"]))
    replora.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["task_type"] is None
    loaded = replora.from_pretrained(tmp_path / "adapter").eval()
    inputs = TINY_MODELS["vit"].inputs()
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))


def test_peft_adapter_folders_load(tmp_path):
    """An export_peft folder, and one PEFT itself wrote, load as AutoPeftModelForCausalLM loads them."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "base")
    model = perturbed(LlamaForCausalLM.from_pretrained(tmp_path / "base"), replora.AdapterConfig(method="replora"))
    replora.export_peft(model, tmp_path / "exported")
    inputs = TEXT.inputs()
    loaded = replora.from_pretrained(tmp_path / "exported").eval()
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), atol=1e-5, rtol=1e-5)

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model.eval()
    loaded = replora.from_pretrained(tmp_path / "peft").eval()
    torch.testing.assert_close(outputs(loaded, inputs), outputs(peft_model, inputs), atol=1e-5, rtol=1e-5)
    assert not isinstance(loaded, PeftModel) and replora.get_config(loaded).method == "lora"


def test_run_folder_of_replora_train(tmp_path, tiny_folders):
    """A run folder: the run's model (a decoder classifier here) built as the run built it, head and padding too."""
    rows = [{"text": f"a {w} day", "label": i % 3} for i, w in enumerate(["sunny", "rainy", "windy"] * 8)]
    data = write_jsonl(tmp_path / "weather.jsonl", rows)
    code = main(["train", "--model", tiny_folders["llama"], "--dataset", str(data), "--method", "replora",
                 "--max-steps", "2", "--batch-size", "4", "--output", str(tmp_path / "run")])
    assert code == 0
    expected, tokenizer = load_model(tiny_folders["llama"], num_labels=3)
    replora.load_adapter(expected, tmp_path / "run" / "adapter")
    loaded = replora.from_pretrained(tmp_path / "run").eval()
    batch = tokenizer(["a sunny day", "windy"], padding=True, return_tensors="pt")
    assert loaded.config.pad_token_id == expected.config.pad_token_id is not None
    assert torch.equal(outputs(loaded, dict(batch)), outputs(expected.eval(), dict(batch)))


@pytest.mark.integration
def test_packaged_model_name_of_a_run(tmp_path):
    """A run folder whose model is a packaged name (minilm): the name is resolved, not the recorded path."""
    model, tokenizer = load_model("minilm", num_labels=2)
    model = perturbed(model, replora.AdapterConfig(modules_to_save=["classifier"]))
    replora.save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"model": "minilm", "task": "classification"}))
    config = tmp_path / "run" / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "/gone"}))
    batch = dict(tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt"))
    assert torch.equal(outputs(replora.from_pretrained(tmp_path / "run").eval(), batch), outputs(model, batch))


@pytest.mark.integration
@pytest.mark.parametrize("name", ["efficientnet-lite0", "dinov2-small"])
def test_packaged_image_models_of_a_run(name, tmp_path):
    """Image runs: EfficientNet-Lite0 (no transformers model, no task_type) and DINOv2 at the run's image size."""
    from replora.training.vision_models import load_image_classifier

    model, _, targets = load_image_classifier(name, 4, 56)
    model = perturbed(model, replora.AdapterConfig(target_modules=targets, modules_to_save=["classifier"]))
    replora.save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"model": name, "task": "classification",
                                                                "image_size": 56}))
    pixels = {"pixel_values": torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))}
    loaded = replora.from_pretrained(tmp_path / "run").eval()
    assert type(loaded) is type(model) and torch.equal(outputs(loaded, pixels), outputs(model, pixels))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; give the folder that save_adapter"):
        replora.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"neither an adapter folder .* nor a run folder"):
        replora.from_pretrained(tmp_path / "empty")
    # No base recorded (a model built from a config, never saved), and no model= given.
    model = replora.inject(BertForSequenceClassification(BertConfig(**BERT)), replora.AdapterConfig())
    replora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"does not record its base model \(base_model_name_or_path.*: pass model="):
        replora.from_pretrained(tmp_path / "adapter")
    # A base that does not exist, given as model=.
    with pytest.raises(FileNotFoundError, match=r"does not exist.*model=.*pass model= to load another"):
        replora.from_pretrained(tmp_path / "adapter", model=tmp_path / "no-such-model")
    # A run folder whose settings name no model.
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    (tmp_path / "run" / "settings.json").write_text("{}")
    with pytest.raises(ValueError, match="does not record its base model"):
        replora.from_pretrained(tmp_path / "run")


def test_the_core_knows_neither_the_training_app_nor_the_packaged_models():
    """The library (replora/*.py, methods/) imports nothing from replora.training; replora.from_pretrained is the
    core's auto.from_pretrained plus the app's run folders and packaged names."""
    import ast

    core = Path(replora.__file__).parent
    for source in [*core.glob("*.py"), *(core / "methods").glob("*.py")]:
        tree = ast.parse(source.read_text())
        modules = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        app = {m for m in modules if m.split(".")[0] == "training" or ".training" in m}
        # The exceptions: replora.from_pretrained, imported from the app on first use (never at import), and
        # `python -m replora`, the app's command line
        allowed = {"__init__.py": {"training.adapted_model"}, "__main__.py": {"training.cli"}}
        assert app == (allowed.get(source.name, set()) if source.parent == core else set()), source
    text = (core / "auto.py").read_text()
    assert not any(name in text for name in ("minilm", "smollm2", "dinov2", "efficientnet", "EvalSettings"))


def test_the_core_loads_an_adapter_folder_and_refuses_a_run_folder_with_the_fix(tmp_path):
    from replora import auto

    base = BertModel(BertConfig(**BERT))
    base.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=5)
    perturbed(model, replora.AdapterConfig(method="replora", modules_to_save=["classifier"]))
    replora.save_adapter(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "settings.json").write_text(json.dumps({"model": str(tmp_path / "base")}))
    loaded = auto.from_pretrained(tmp_path / "run" / "adapter").eval()
    ids = torch.tensor([[2, 5, 7, 9]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(FileNotFoundError, match="is not an adapter folder"):
        auto.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(replora.from_pretrained(tmp_path / "run").eval()(ids).logits, model(ids).logits)
