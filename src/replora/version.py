__version__ = "0.2.0"
# Adapter files: 1 = replora 0.1 (RepLoRA's tensors under the model's `replora.` child), 2 = RepLoRA's
# tensors where the model holds them (a block's `lora_shared`). Both load.
ADAPTER_FORMAT = 2
