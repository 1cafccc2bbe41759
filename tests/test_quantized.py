"""Quantized bases (QLoRA) with the real bitsandbytes on the CPU: tiny LLaMA and BERT saved to a folder, loaded
with transformers' BitsAndBytesConfig (4-bit NF4 / FP4, 8-bit). Every method trains, saves, reloads and exports
as on a full-precision base; what cannot be exact (an in-place merge) or read (other quantized layers) is refused."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

import replora
from conftest import ENV, logits

bnb = pytest.importorskip("bitsandbytes")
from transformers import BitsAndBytesConfig  # noqa: E402

METHODS = ["lora", "dora", "moslora", "replora"]
QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# Every method on NF4 and 8-bit, one on FP4; BERT (an encoder with a trained head) with every method on NF4.
CASES = ([("llama", m, q) for m in METHODS for q in ("nf4", "int8")] + [("llama", "lora", "fp4"), ("bert", "dora", "fp4")]
         + [("bert", m, "nf4") for m in METHODS] + [("bert", "lora", "int8")])
AUTO = {"llama": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    models = {
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32)),
        "bert": BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, intermediate_size=128,
                                                         max_position_embeddings=32, num_labels=3)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: str(root / name) for name in models}


def quantization(kind: str, quant: str) -> BitsAndBytesConfig:
    # A classifier's head is trained in full (modules_to_save): it must stay unquantized.
    return BitsAndBytesConfig(**QUANTS[quant], llm_int8_skip_modules=["classifier"] if kind == "bert" else None)


def load(folder: str, kind: str, quant: str | None, **kwargs) -> nn.Module:
    quantization_ = {} if quant is None else {"quantization_config": quantization(kind, quant)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AUTO[kind].from_pretrained(folder, device_map="cpu", **quantization_, **kwargs).eval()


def config_for(kind: str, method: str, **options) -> replora.AdapterConfig:
    defaults = {"target_modules": "all-linear"} if kind == "llama" else {"modules_to_save": ["classifier"]}
    return replora.AdapterConfig(method=method, r=4, lora_alpha=8, **{**defaults, **options})


def inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' "inputs will be cast to float16" on every 8-bit matmul
        return logits(model(**inputs()))


def base_tensors(model) -> dict[str, torch.Tensor]:
    """The base model's own tensors (quantized weights, their absmax and scales), keyed as before inject."""
    found = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" in f".{key}" or ".copies." in key or "lora_shared" in key:
            continue
        found[key.replace("base_layer.", "").replace("original_module.", "")] = tensor.detach().clone()
    return found


def train_step(model) -> float:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = logits(model(**inputs(seed=7))).float().pow(2).mean()
        loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    model.eval()
    return loss.item()


def files(folder) -> dict:
    """What a folder's files hold: bytes, and a safetensors file as its metadata and tensors (its header's key
    order varies from one write to the next)."""
    from safetensors import safe_open

    found = {}
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(f, "pt") as st:
                found[f.name] = (st.metadata(), {k: st.get_tensor(k) for k in st.keys()})
        else:
            found[f.name] = f.read_bytes()
    return found


def same_files(a, b) -> None:
    a, b = files(a), files(b)
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], bytes):
            assert a[name] == b[name], name
        else:
            assert a[name][0] == b[name][0] and a[name][1].keys() == b[name][1].keys(), name
            for key, tensor in a[name][1].items():
                assert tensor.dtype == b[name][1][key].dtype and torch.equal(tensor, b[name][1][key]), key


@pytest.mark.parametrize("kind,method,quant", CASES)
def test_train_save_reload_export(folders, tmp_path, kind, method, quant):
    model = load(folders[kind], kind, quant)
    before = base_tensors(model)
    replora.inject(model, config_for(kind, method))
    layers = replora.model.adapted_layers(model)
    assert all(layer.quantized for layer in layers.values())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the compute dtype
    with replora.disable_adapters(model):
        base_out = run(model)
    torch.testing.assert_close(run(model), base_out, rtol=0, atol=0)  # every method starts as the base model
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    assert torch.isfinite(torch.tensor(train_step(model)))
    assert [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])] == []
    after = base_tensors(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), \
        "the quantized base changed"
    out = run(model)
    assert not torch.allclose(out, base_out)

    # Save, then reload onto a fresh quantized base (replora.from_pretrained): the same logits.
    replora.save_adapter(model, tmp_path / "adapter")
    reloaded = replora.from_pretrained(tmp_path / "adapter", quantization_config=quantization(kind, quant),
                                       device_map="cpu").eval()
    torch.testing.assert_close(run(reloaded), out, rtol=0, atol=0)

    # The same files as an adapter on the full-precision base writes, once it holds the same tensors.
    full = load(folders[kind], kind, None)
    replora.load_adapter(full, tmp_path / "adapter")
    replora.save_adapter(full, tmp_path / "full-adapter")
    same_files(tmp_path / "full-adapter", tmp_path / "adapter")
    replora.export_peft(model, tmp_path / "peft")
    replora.export_peft(full, tmp_path / "full-peft")
    same_files(tmp_path / "full-peft", tmp_path / "peft")

    # PEFT loads the export onto the same quantized base and computes what replora does.
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(folders[kind], kind, quant), tmp_path / "peft").eval()
    for module in peft_model.modules():  # bitsandbytes' CPU kernel for eval (absmax in bfloat16) is another sum
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    torch.testing.assert_close(run(peft_model), out, rtol=1e-5, atol=1e-5)
    imported = replora.import_peft(load(folders[kind], kind, quant), tmp_path / "peft")  # and back
    torch.testing.assert_close(run(imported), out, rtol=0, atol=0)

    if kind == "llama":
        if method == "dora":
            with pytest.raises(ValueError, match="dora adapter cannot be written as a llama.cpp LoRA adapter"):
                replora.export_gguf(model, tmp_path / "adapter.gguf")
        else:
            replora.export_gguf(model, tmp_path / "adapter.gguf")
            replora.export_gguf(full, tmp_path / "full.gguf")
            assert (tmp_path / "adapter.gguf").read_bytes() == (tmp_path / "full.gguf").read_bytes()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_evaluating_then_training_trains_every_adapter(folders, quant, method):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel at an eval forward without grad (on AVX512-BF16 CPUs,
    as this one), after which no gradient reaches the layers before it: an adapted layer keeps it unpacked."""
    model = load(folders["llama"], "llama", quant)
    run(model)  # the base model evaluated first: bitsandbytes may repack it here
    replora.inject(model, config_for("llama", method))
    run(model)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, trainable[n])] == []
    run(model)
    assert not any(getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
                   for layer in replora.model.adapted_layers(model).values())


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_dora_magnitude_is_the_dequantized_row_norm(folders, quant):
    model = load(folders["llama"], "llama", quant)
    layer = model.model.layers[0].self_attn.q_proj
    weight = layer.weight
    if quant == "int8":
        W = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    else:
        W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    replora.inject(model, config_for("llama", "dora"))
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.lora["default"].lora_magnitude,
                               W.float().norm(dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_in_place_merge_is_refused(folders, quant):
    model = load(folders["llama"], "llama", quant)
    q_proj = model.model.layers[0].self_attn.q_proj
    fast_kernel = q_proj.__dict__.get("support_avx512bf16_for_cpu")
    replora.inject(model, config_for("llama", "lora"))
    train_step(model)
    before, out = base_tensors(model), run(model)
    for call in (lambda: replora.merge(model), lambda: replora.unload(model)):
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*requantized.*save_merged"):
            call()
    with pytest.raises(ValueError, match="requantized.*save_merged"):  # the layer refuses too, called alone
        model.model.layers[0].self_attn.q_proj.merge("default")
    assert all(torch.equal(t, before[k]) for k, t in base_tensors(model).items())
    assert not any(layer.merged_adapters for layer in replora.model.adapted_layers(model).values())
    torch.testing.assert_close(run(model), out, rtol=0, atol=0)
    replora.unload(model, merge=False)  # the base model back, still quantized, bitsandbytes' CPU kernel as it was
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert q_proj.__dict__.get("support_avx512bf16_for_cpu") == fast_kernel


def test_dequantize_reads_a_weight_bitsandbytes_repacked(folders):
    model = load(folders["llama"], "llama", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    W = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    run(model)  # repacks it for the CPU kernel where the CPU has AVX512-BF16 (its absmax then in bfloat16)
    torch.testing.assert_close(replora.quantized.dequantize(layer), W, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_save_merged_writes_the_dequantized_model(folders, tmp_path, quant):
    model = load(folders["llama"], "llama", quant)
    replora.inject(model, config_for("llama", "dora", target_modules=["q_proj", "v_proj"]))  # k_proj etc. unadapted
    train_step(model)
    out = run(model)
    replora.save_merged(model, tmp_path / "merged")
    assert model.config.quantization_config is not None and model.hf_quantizer is not None  # the model is unchanged

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert not [k for k in saved if "absmax" in k or "quant" in k or "SCB" in k or "weight_format" in k]
    k_proj = model.model.layers[0].self_attn.k_proj  # not a target: written dequantized
    torch.testing.assert_close(saved["model.layers.0.self_attn.k_proj.weight"],
                               replora.quantized.dequantize(k_proj), rtol=0, atol=0)
    q_proj = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(saved["model.layers.0.self_attn.q_proj.weight"], q_proj.merged_weight("default"),
                               rtol=0, atol=0)

    merged = load(tmp_path / "merged", "llama", None)  # a plain model: no quantization_config in its config
    assert not hasattr(merged.config, "quantization_config")
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    # 4-bit layers multiply by the dequantized weight, so the merged model computes what was trained; 8-bit ones
    # also round their inputs to int8 (LLM.int8), which the float merged model does not.
    tolerance = 1e-4 if quant == "nf4" else 5e-2
    torch.testing.assert_close(run(merged), out, rtol=tolerance, atol=tolerance)


class QuantLinear(nn.Module):
    """Another library's quantized linear layer (as GPTQ / AWQ store theirs: packed int32 qweight)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(i // 8, o, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, o))

    def forward(self, x):
        return x @ torch.zeros(x.shape[-1], self.scales.shape[1])


class Int8Linear(nn.Linear):
    """An nn.Linear subclass whose weight is int8 (a quantization library replora does not know)."""

    def __init__(self, i: int, o: int):
        super().__init__(i, o)
        self.weight = nn.Parameter(torch.zeros(o, i, dtype=torch.int8), requires_grad=False)


class Net(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.q = layer(16, 16)
        self.v = nn.Linear(16, 16)

    def forward(self, x):
        return self.v(self.q(x))


@pytest.mark.parametrize("layer", [QuantLinear, Int8Linear])
@pytest.mark.parametrize("targets", [["q", "v"], ["q"], "all-linear", r"q|v"])
def test_other_quantized_layers_are_refused_by_name(layer, targets):
    model = Net(layer)
    with pytest.raises(ValueError, match=rf"'q'.*quantized layer \(.*{layer.__name__}\).*BitsAndBytesConfig"):
        replora.inject(model, replora.AdapterConfig(r=2, target_modules=targets))
    assert replora.model.adapter_state(model) is None and isinstance(model.q, layer)  # untouched


def test_quantized_modules_to_save_are_refused_with_the_fix(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AUTO["bert"].from_pretrained(folders["bert"], device_map="cpu",
                                             quantization_config=BitsAndBytesConfig(**QUANTS["nf4"]))
    assert isinstance(model.classifier, bnb.nn.Linear4bit)  # transformers quantizes an encoder's head too
    with pytest.raises(ValueError, match=r"'classifier' is quantized \(Linear4bit\).*llm_int8_skip_modules=\['classifier'\]"):
        replora.inject(model, config_for("bert", "lora"))
    assert replora.model.adapter_state(model) is None


def test_prepare_for_quantized_training(folders):
    """A bfloat16 model in 4 bits as a classifier (a new head): norms and the head in float32, the adapter in the
    compute dtype, gradient checkpointing on, and the adapter gets gradients through the checkpointed blocks."""
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_pretrained(
            folders["llama"], quantization_config=quant, device_map="cpu", dtype=torch.bfloat16, num_labels=2)
    model.config.pad_token_id = 0
    packed = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert replora.prepare_for_quantized_training(model) is model
    assert model.model.norm.weight.dtype == model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.score.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16  # not upcast: that would cost memory
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, packed)
    assert model.is_gradient_checkpointing

    replora.inject(model, replora.AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"],
                                                modules_to_save=["score"]))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.lora["default"].lora_A.dtype == torch.float32  # float32 whatever the compute dtype (as PEFT)
    assert model.score.copies["default"].weight.dtype == torch.float32
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad  # though the embeddings are frozen
    model.train()
    loss = model(**inputs(), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert q_proj.lora["default"].lora_B.grad is not None and q_proj.lora["default"].lora_B.grad.abs().sum() > 0


def test_prepare_makes_inputs_require_grad_where_transformers_does_not(folders, monkeypatch):
    """transformers before 5 turns on checkpointing without making the embeddings' output require grad."""
    model = load(folders["llama"], "llama", "nf4")
    monkeypatch.setattr(model, "activation_checkpointing_enable", lambda kwargs=None: None, raising=False)
    replora.prepare_for_quantized_training(model)
    model.requires_grad_(False)  # as inject leaves the base model
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


@pytest.mark.slow  # (a fresh interpreter)
def test_replora_works_without_bitsandbytes():
    """bitsandbytes is optional: with it absent, replora imports and adapts (quantized.py never imports it)."""
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, replora\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
            "replora.inject(m, replora.AdapterConfig(method='dora', r=2, target_modules=['0']))\n"
            "m(torch.randn(2, 4)); replora.merge(m)\n"
            "assert 'bitsandbytes' not in [k for k, v in sys.modules.items() if v is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, timeout=120)


@pytest.mark.parametrize("method", METHODS)
def test_a_bfloat16_decoder_trains_after_prepare(folders, tmp_path, method):
    """Most hub decoders are saved in bfloat16: after prepare_for_quantized_training the float32 final norm feeds
    the LM head, which must take float32 too (it did not, and the first forward failed on the dtype mix)."""
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(folders["llama"]).to(torch.bfloat16).save_pretrained(bf16)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(bf16, quantization_config=config, device_map="cpu",
                                                     dtype=torch.bfloat16)
    replora.prepare_for_quantized_training(model, gradient_checkpointing=False)
    replora.inject(model, config_for("llama", method))
    assert model.get_output_embeddings().weight.dtype == torch.float32
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_step(model)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
