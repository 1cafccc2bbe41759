"""export_gguf: any method's adapter as a llama.cpp LoRA adapter (GGUF) for a LLaMA-architecture model.

The file is what llama.cpp's `llama_adapter_lora_init` (`llama-cli --lora`, `llama-server --lora`) reads:
  general.architecture "llama", general.type "adapter", adapter.type "lora", adapter.lora.alpha;
  per target, `blk.N.<tensor>.weight.lora_a` = A (r, in) and `.lora_b` = B (out, r), as numpy arrays
  (GGUF lists dimensions the other way round: ggml's ne = [in, r] and [r, out]).
Every method is first reduced to plain LoRA factors (`adapter.factors()`: MoSLoRA's M A, RepLoRA's
generated A_t, B_t). llama.cpp scales each update by adapter.lora.alpha / r (times the user's --lora
scale), so alpha is written as s·r, which reproduces replora's s = lora_alpha / r, or lora_alpha / sqrt(r)
with use_rslora, exactly. The rows of q_proj and k_proj are stored permuted in a LLaMA GGUF (llama.cpp's
rotary embedding pairs neighbouring rows, transformers' pairs row i with row i + head_dim/2; its
converter permutes them per head), so B of q_proj / k_proj gets the same row permutation.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .files import write_file
from .methods import export_form
from .model import adapted_layers, get_config, require_adapter, saved_modules
from .version import __version__

ARCHITECTURE = "llama"
DTYPES = (torch.float32, torch.float16)
MERGE_HINT = ("merge the adapter (replora.save_merged) and convert the merged folder with llama.cpp's own "
              "convert_hf_to_gguf.py")


def modules_to_save_refusal(adapter_name: str, modules: list[str]) -> str:
    """Why an adapter with modules_to_save (a classifier head such as `score`, a trained lm_head) has no GGUF form,
    and what to do instead; export_gguf and `replora export-gguf` (before it loads any model) say it alike."""
    return (f"adapter {adapter_name!r} trains whole modules (modules_to_save: {', '.join(modules[:3])}), which GGUF "
            f"cannot hold: a llama.cpp LoRA adapter carries low-rank factors only; {MERGE_HINT}")


def _rotary_rows(rows: int, n_heads: int) -> torch.Tensor:
    """The row order of a q/k projection in a LLaMA GGUF: within each head, rows (j, j + half) become
    neighbours (2j, 2j + 1), for llama.cpp's rotary embedding on neighbouring pairs."""
    half = rows // n_heads // 2
    return torch.arange(rows).view(n_heads, 2, half).transpose(1, 2).reshape(-1)


def _gguf_name_map(n_blocks: int):
    import gguf

    kinds = {gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K, gguf.MODEL_TENSOR.ATTN_V,
             gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP,
             gguf.MODEL_TENSOR.FFN_DOWN}
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks), kinds


def gguf_tensors(model: nn.Module, adapter_name: str | None = None, dtype: torch.dtype = torch.float32,
                 permute: bool = True) -> tuple[dict[str, torch.Tensor], float]:
    """({GGUF tensor name: tensor}, adapter.lora.alpha) of an adapter, or ValueError naming what llama.cpp
    cannot carry. `permute=False` leaves q/k rows in transformers' order (wrong for llama.cpp: for tests)."""
    import gguf  # the optional dependency (pip install gguf): an ImportError here, before anything else

    name = require_adapter(model, adapter_name)
    config = get_config(model, name)
    hf = getattr(model, "config", None)
    model_type = getattr(hf, "model_type", None)
    if model_type != ARCHITECTURE:
        found = f"model_type {model_type!r}" if model_type else f"a {type(model).__name__} with no transformers config"
        raise ValueError(f"export_gguf writes llama.cpp LoRA adapters for LLaMA-architecture models (model_type "
                         f"'llama', such as SmolLM2); this model is {found}: use replora.export_peft, or {MERGE_HINT}")
    if dtype not in DTYPES:
        raise ValueError(f"export_gguf writes float32 or float16 tensors, got dtype={dtype}")
    layers = {p: layer for p, layer in adapted_layers(model).items() if name in layer.lora}
    if export_form(config.method) != "lora":
        why = ("DoRA rescales each output row of W0 + s B A by a learned magnitude over its norm"
               if export_form(config.method) == "dora" else f"method {config.method!r} states exports_as = None")
        raise ValueError(f"a {config.method} adapter cannot be written as a llama.cpp LoRA adapter: its update is "
                         f"not a low-rank B A ({why}) and llama.cpp's adapter GGUF holds only LoRA factors; "
                         f"{MERGE_HINT}, or train with method lora, moslora or replora")
    saved = [p for p, m in saved_modules(model).items() if name in m.copies]
    if saved:
        raise ValueError(modules_to_save_refusal(name, saved))
    if not layers:
        raise ValueError(f"adapter {name!r} has no target layers to export")
    names, kinds = _gguf_name_map(hf.num_hidden_layers)
    mapped, unmapped = {}, []
    for path, layer in layers.items():
        found = names.get_type_and_name(path) or names.get_type_and_name(f"model.{path}")
        if found is None or found[0] not in kinds or layer.kind != "linear":
            unmapped.append(path)
        else:
            mapped[path] = found
    if unmapped:
        raise ValueError(f"llama.cpp LoRA adapters cover the attention and MLP projections of the decoder blocks "
                         f"(q/k/v/o_proj, gate/up/down_proj); this adapter also targets {', '.join(unmapped[:3])}"
                         f"{' ...' if len(unmapped) > 3 else ''}, which export_gguf does not carry (llama.cpp takes "
                         "embedding adapters in another layout, and a tied output layer, as SmolLM2's, has no tensor "
                         f"of its own); {MERGE_HINT}, or train without these targets")
    n_heads = hf.num_attention_heads
    n_kv_heads = getattr(hf, "num_key_value_heads", None) or n_heads
    heads = {gguf.MODEL_TENSOR.ATTN_Q: n_heads, gguf.MODEL_TENSOR.ATTN_K: n_kv_heads}
    tensors = {}
    with torch.no_grad():
        for path, layer in layers.items():
            kind, stem = mapped[path]
            A, B = (t.detach().to("cpu", torch.float32) for t in layer.lora[name].factors())
            if permute and kind in heads:
                B = B[_rotary_rows(B.shape[0], heads[kind])]
            tensors[f"{stem}.weight.lora_a"] = A.to(dtype).contiguous()
            tensors[f"{stem}.weight.lora_b"] = B.to(dtype).contiguous()
    return tensors, config.scaling * config.r


def export_gguf(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write an adapter (default: the active one) of a LLaMA-architecture model as a llama.cpp LoRA adapter
    GGUF file at `path` (`llama-cli -m base.gguf --lora path`). Any method but DoRA; targets must be the
    blocks' attention / MLP projections, without modules_to_save. An existing file is replaced atomically;
    on refusal nothing is written."""
    import gguf

    tensors, alpha = gguf_tensors(model, adapter_name, dtype)
    config = get_config(model, adapter_name)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write the GGUF adapter to {path}: it is a folder; give a file path such as "
                         f"{path / 'adapter.gguf'}")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        writer.add_type("adapter")  # general.type
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_string("replora.method", config.method)
        writer.add_string("replora.version", __version__)
        for key, tensor in tensors.items():
            writer.add_tensor(key, tensor.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_file(path, write)
