"""replora: LoRA, DoRA, MoSLoRA and RepLoRA adapters for any PyTorch / transformers model."""
__version__ = "0.1.0"

from .config import AdapterConfig  # noqa: E402
from .io import load_adapter, read_adapter, save_adapter  # noqa: E402
from .model import count_parameters, get_config, inject, merge, unload, unmerge  # noqa: E402

__all__ = ["AdapterConfig", "inject", "merge", "unmerge", "unload", "save_adapter", "load_adapter",
           "read_adapter", "count_parameters", "get_config", "__version__"]
