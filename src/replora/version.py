__version__ = "0.3.0"
# Adapter files: 1 = replora 0.1 (RepLoRA's tensors under the model's `replora.` child), 2 = RepLoRA's
# tensors where the model holds them (a block's `lora_shared`), 3 = RepLoRA's generator design recorded
# (replora_hidden_init, _hidden_bias, _head_bias; older files mean 0.2's design). All load.
ADAPTER_FORMAT = 3
