"""Properties checked at random (hypothesis): layer shapes, ranks, alphas, dtypes, layer kinds (Linear, Conv1D,
Conv2d of random kernel, stride, padding and dilation) and methods."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import replora
from replora.layer import AdaptedLayer

from conftest import METHOD_VARIANTS

TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 5e-2}


class Block(nn.Module):
    def __init__(self, d_in, d_q, d_v, kind, conv2d):
        super().__init__()
        make = {"linear": lambda i, o: nn.Linear(i, o), "conv1d": lambda i, o: Conv1D(o, i),
                "conv2d": lambda i, o: nn.Conv2d(i, o, **conv2d)}[kind]
        self.q, self.v = make(d_in, d_q), make(d_in, d_v)
        self.channels = 1 if kind == "conv2d" else -1
        if kind == "conv1d":  # Conv1D starts with std 0.02 weights and zero bias; give it a real scale
            for layer in (self.q, self.v):
                nn.init.normal_(layer.weight, std=d_in ** -0.5)
                nn.init.normal_(layer.bias, std=0.1)

    def forward(self, x):
        return torch.cat([self.q(x), self.v(x)], dim=self.channels)


class Net(nn.Module):
    def __init__(self, d_in, d_q, d_v, kind, dtype, conv2d):
        super().__init__()
        self.layers = nn.ModuleList([Block(d_in, d_q, d_v, kind, conv2d)])
        self.to(dtype)

    def forward(self, x):
        return self.layers[0](x)


cases = st.fixed_dictionaries({
    "d_in": st.integers(1, 24), "d_q": st.integers(1, 24), "d_v": st.integers(1, 24), "r": st.integers(1, 8),
    "alpha": st.floats(0.25, 64), "kind": st.sampled_from(["linear", "conv1d", "conv2d"]),
    "conv2d": st.fixed_dictionaries({"kernel_size": st.integers(1, 3), "stride": st.integers(1, 2),
                                     "padding": st.integers(0, 1), "dilation": st.integers(1, 2)}),
    "variant": st.sampled_from(sorted(METHOD_VARIANTS)),
    "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), "seed": st.integers(0, 2 ** 16),
})


def build(case):
    torch.manual_seed(case["seed"])
    return Net(case["d_in"], case["d_q"], case["d_v"], case["kind"], case["dtype"], case["conv2d"]).eval()


def adapted(case):
    options = {**METHOD_VARIANTS[case["variant"]], "r": case["r"], "lora_alpha": case["alpha"],
               "target_modules": ["q", "v"]}
    model = replora.inject(build(case), replora.AdapterConfig(**options))
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    with torch.no_grad():  # move every adapter tensor off its init, as training would
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return model


def inputs(case):
    shape = (3, case["d_in"], 7, 7) if case["kind"] == "conv2d" else (3, case["d_in"])
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7)).to(case["dtype"])


def dora_conditioning(model):
    """Unmerged DoRA adds (m / ‖W0 + s·B A‖)·(W0 + s·B A)x as two terms that cancel when a row norm is small
    against its magnitude, so its rounding grows with max m / norm (PEFT's forward shares this); 1 otherwise."""
    worst = 1.0
    for m in model.modules():
        if isinstance(m, AdaptedLayer) and hasattr(a := m.lora[m.active_adapter], "lora_magnitude"):
            norms = (m.base_weight() + a.delta_weight()).norm(dim=1)  # base_weight() is (out, in) for Conv1D too
            worst = max(worst, (a.lora_magnitude.abs() / norms).max().item())
    return worst


def close(a, b, dtype, scale=None):
    scale = scale if scale is not None else 1 + b.abs().max().item()
    assert (a - b).abs().max().item() <= TOLERANCE[dtype] * scale, (a - b).abs().max().item()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    model = adapted(case)
    x = inputs(case)
    with torch.no_grad():
        unmerged = model(x)
        weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
        # DoRA's unmerge scales the merged weight back up by its row norms, so its rounding counts at the
        # size of W0 + s·B A before the normalization: bounded by |W0| + |s·B A|.
        updates = {f"{n}.base_layer.weight": m.lora[m.active_adapter].delta_weight().abs().max().item()
                   for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
        conditioning = dora_conditioning(model)
        replora.merge(model)
        close(model(x), unmerged, case["dtype"], scale=(1 + unmerged.abs().max().item()) * conditioning)
        merged = {n: p.clone() for n, p in model.named_parameters() if n in weights}
        replora.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:  # exact up to the rounding of the merged weights in their own dtype
                folded = max(merged[n].abs().max().item(), weights[n].abs().max().item() + updates.get(n, 0.0))
                close(p, weights[n], case["dtype"], scale=1 + folded)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_save_then_load_is_exact(case):
    model = adapted(case)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        replora.save_adapter(model, Path(tmp) / "a")
        fresh = replora.load_adapter(build(case), Path(tmp) / "a")
        assert torch.equal(fresh(inputs(case)), model(inputs(case)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases.filter(lambda c: c["dtype"] != torch.bfloat16 and (c["kind"] != "conv2d" or c["conv2d"]["dilation"] == 1)))
def test_export_to_peft_gives_equal_outputs(case):  # (PEFT's Conv2d LoRA ignores dilation: export refuses it)
    from peft import PeftModel

    model = adapted(case)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        replora.export_peft(model, Path(tmp) / "p")
        peft_model = PeftModel.from_pretrained(build(case), Path(tmp) / "p").eval()
        expected = model(inputs(case))
        close(peft_model(inputs(case)), expected, case["dtype"],
              scale=(1 + expected.abs().max().item()) * dora_conditioning(model))
