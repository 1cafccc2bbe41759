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
        A = torch.empty(config.r, layer.in_features, **like(layer))
        B = torch.zeros(layer.out_features, config.r, **like(layer))
        if layer.kind == "embedding":
            # A one-hot input would meet an A of scale 1/sqrt(vocabulary) and barely learn: PEFT's choice,
            # A = 0 and B ~ N(0, 1) (still dW = 0 at init).
            self.lora_A, self.lora_B = nn.Parameter(A.zero_()), nn.Parameter(nn.init.normal_(B))
        else:
            self.lora_A, self.lora_B = nn.Parameter(lora_A_init_(A)), nn.Parameter(B)

    def factors(self):
        return self.lora_A, self.lora_B
