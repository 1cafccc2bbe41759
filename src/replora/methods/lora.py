"""LoRA (Hu et al., 2021): A and B are the parameters; B = 0 at init, so the model starts as the base model."""
from __future__ import annotations

import torch
from torch import nn

from .base import Method, like, lora_A_init_


class LoRA(Method):
    name = "lora"
    summary = "s·B A"

    def __init__(self, config, layer):
        super().__init__(config)
        self.lora_A = nn.Parameter(lora_A_init_(torch.empty(config.r, layer.in_features, **like(layer))))
        self.lora_B = nn.Parameter(torch.zeros(layer.out_features, config.r, **like(layer)))

    def factors(self):
        return self.lora_A, self.lora_B
