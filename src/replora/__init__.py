"""replora: LoRA, DoRA, MoSLoRA and RepLoRA adapters for any PyTorch / transformers model."""
__version__ = "0.1.0"

from .config import AdapterConfig  # noqa: E402
from .interop import export_peft, import_peft, merged_state_dict, save_merged  # noqa: E402
from .io import load_adapter, read_adapter, save_adapter  # noqa: E402
from .model import (active_adapter, add_adapter, count_parameters, delete_adapter, disable_adapters,  # noqa: E402
                    get_config, inject, merge, set_adapter, unload, unmerge)

__all__ = ["AdapterConfig", "inject", "merge", "unmerge", "unload", "save_adapter", "load_adapter",
           "read_adapter", "count_parameters", "get_config", "add_adapter", "set_adapter", "active_adapter",
           "disable_adapters", "delete_adapter", "export_peft", "import_peft", "save_merged", "merged_state_dict",
           "__version__"]
