"""Image classification end to end: tiny DINOv2 / ViT folders (real transformers classes, a real image
processor) trained on a real image folder (scikit-learn's digits as PNG files) and on CIFAR-10, by
every method; bad input stops a run before it writes anything."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification

import replora
from replora.layer import AdaptedLayer
from replora.training.loop import freeze_batch_norm_statistics, train
from replora.training.objectives import ImageCollator
from replora.training.vision_models import load_image_classifier
from replora.training.settings import TrainSettings

from conftest import ENV, REPLORA


def settings(model, dataset, out, **kwargs):
    return TrainSettings(model=model, dataset=dataset, output=str(out), epochs=1, batch_size=8, lr=5e-3,
                         eval_batch_size=16, **kwargs)


@pytest.mark.parametrize("method", list(replora.METHODS) + ["full", "head"])
def test_every_method_trains_dinov2_on_an_image_folder(vision_folders, digits, tmp_path, method):
    metrics = train(settings(vision_folders["dinov2"], digits, tmp_path / "run", method=method))
    assert metrics["task"] == "classification" and metrics["dataset"] == "digits"
    assert (metrics["train_examples"], metrics["validation_examples"], metrics["test_examples"]) == (100, 10, 10)
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["history"][0]["train_examples_per_second"] > 0
    if method == "head":  # a linear probe: the new head, (2 x 32 features: CLS and mean patch) x 10 + 10
        assert metrics["trainable_parameters"] == 64 * 10 + 10 and metrics["adapter_config"] is None
    if method in ("full", "head"):
        assert not (tmp_path / "run" / "adapter").exists()
        return
    config = metrics["adapter_config"]
    # DINOv2's attention (transformers 5 names) gets the adapter; the new head trains in full.
    assert config["target_modules"] is None and config["modules_to_save"] == ["classifier"]
    model, processor, _ = load_image_classifier(vision_folders["dinov2"], num_labels=10)
    adapted = replora.load_adapter(model, tmp_path / "run" / "adapter").eval()
    names = {n for n, m in adapted.named_modules() if isinstance(m, AdaptedLayer)}
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
    assert len(names) == 4  # query and value of both blocks


def test_replora_groups_query_and_value_of_each_vit_block(vision_folders):
    model, _, _ = load_image_classifier(vision_folders["dinov2"], num_labels=3)
    replora.inject(model, replora.AdapterConfig(method="replora", modules_to_save=["classifier"]))
    groups = [n for n, _ in model.named_modules() if n.endswith("lora_shared.default.group")]
    assert len(groups) == 2 and all(".layer.0." in g or ".layer.1." in g for g in groups)


def test_image_size_resizes_and_vit_interpolates_its_positions(vision_folders, digits, tmp_path):
    model, processor, _ = load_image_classifier(vision_folders["vit"], num_labels=10, image_size=8)
    batch = ImageCollator(processor)([{"image": str(p), "label": 0} for p in sorted(Path(digits).rglob("*.png"))[:2]])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert model(pixel_values=batch["pixel_values"]).logits.shape == (2, 10)
    dinov2, processor, _ = load_image_classifier(vision_folders["dinov2"], num_labels=10, image_size=12)
    assert processor.crop_size == {"height": 12, "width": 12} and processor.size == {"shortest_edge": 14}
    metrics = train(settings(vision_folders["vit"], digits, tmp_path / "run", image_size=8))
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["image_size"] == 8
    assert 0 <= metrics["test_accuracy"] <= 1


@pytest.mark.slow
def test_cifar10_from_the_command_line(vision_folders, tmp_path):
    import subprocess

    out = tmp_path / "cifar"
    result = subprocess.run(REPLORA + ["train", "--dataset", "cifar10", "--model", vision_folders["dinov2"],
                                       "--method", "replora", "--max-train-examples", "40", "--max-eval-examples",
                                       "20", "--epochs", "1", "--batch-size", "8", "--output", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["train_examples"], metrics["validation_examples"], metrics["test_examples"]) == (40, 20, 20)
    assert metrics["dataset"] == "cifar10" and (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("model, task, message", [
    ("text", None, "is a bert model that reads text; use an image model such as --model dinov2-small"),
    ("dinov2", "sft", "is an image classification task, not sft"),
])
def test_images_with_the_wrong_model_or_task_are_refused_before_anything_is_written(
        vision_folders, tiny_folders, digits, tmp_path, model, task, message):
    model = tiny_folders["bert"] if model == "text" else vision_folders[model]
    extra = {"task": task} if task else {}
    with pytest.raises(ValueError, match=message):
        train(settings(model, digits, tmp_path / "run", **extra))
    assert not (tmp_path / "run").exists()


def test_efficientnet_targets_its_pointwise_convolutions_by_default():
    pytest.importorskip("efficientnet_lite_pytorch")
    model, _, targets = load_image_classifier("efficientnet-lite0", num_labels=3)
    replora.inject(model, replora.AdapterConfig(method="dora", target_modules=targets, modules_to_save=["classifier"]))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    assert len(layers) == 31 and all(m.kind == "conv2d" for m in layers.values())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(pixel_values=x).logits
        replora.merge(model)
        torch.testing.assert_close(model(pixel_values=x).logits, before, atol=1e-5, rtol=1e-5)
        replora.unmerge(model)
    # A training step leaves the frozen BatchNorm statistics alone (no adapter file could hold them).
    statistics = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    freeze_batch_norm_statistics(model)
    model.train()
    model(pixel_values=x, labels=torch.tensor([0, 1])).loss.backward()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in statistics.items())


@pytest.mark.slow
def test_a_bad_image_folder_stops_the_command_line_with_one_line(vision_folders, tmp_path):
    import subprocess

    from PIL import Image

    (tmp_path / "photos" / "cat").mkdir(parents=True)
    Image.new("RGB", (9, 7), "red").save(tmp_path / "photos" / "cat" / "a.png")
    (tmp_path / "photos" / "cat" / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    result = subprocess.run(REPLORA + ["train", "--dataset", str(tmp_path / "photos"), "--model",
                                       vision_folders["dinov2"], "--output", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "one class" in result.stderr.lower() or "two classes" in result.stderr.lower(), result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr  # (a skipped-files warning may come first)
    assert not out.exists()
