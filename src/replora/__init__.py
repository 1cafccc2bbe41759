"""replora: LoRA, DoRA, MoSLoRA and RepLoRA adapters for any PyTorch / transformers model.

The library is this package's top level: methods/ (one file per method, and their registry), layer.py
(the adapted layer), model.py (inject, merge, unload...), saving.py, auto.py (a base model and its adapter folder
in one call), trainer.py (transformers' Trainer and TRL), interop.py (PEFT), gguf.py (llama.cpp). The fine-tuning pipeline (data, pretrained models, training loop, CLI) is the
`replora.training` subpackage.
"""
from .config import AdapterConfig
from .gguf import export_gguf
from .interop import export_peft, import_peft, merged_state_dict, save_merged
from .methods import METHODS, Method, register_method
from .model import (active_adapter, add_adapter, count_parameters, delete_adapter, disable_adapters, get_config,
                    inject, merge, print_trainable_parameters, set_adapter, unload, unmerge)
from .quantized import prepare_for_quantized_training
from .saving import load_adapter, read_adapter, save_adapter
from .version import __version__


def __getattr__(name: str):
    """replora.from_pretrained, imported on first use: the core's (auto.from_pretrained: adapter folders) with what the
    training app adds (run folders of `replora train`, packaged model names), which the core does not know."""
    if name == "from_pretrained":
        from .training.adapted_model import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'replora' has no attribute {name!r}")


__all__ = ["AdapterConfig", "inject", "merge", "unmerge", "unload", "save_adapter", "load_adapter",
           "read_adapter", "from_pretrained", "count_parameters", "print_trainable_parameters", "get_config",
           "add_adapter", "set_adapter", "active_adapter", "disable_adapters", "delete_adapter", "export_peft",
           "export_gguf", "import_peft", "save_merged", "merged_state_dict", "prepare_for_quantized_training", "METHODS", "Method", "register_method",
           "__version__"]
