"""MoSLoRA (Wu et al., 2024): dW = s B M A with a learnable r x r mixer M between the subspaces."""
from __future__ import annotations

import torch
from torch import nn

from .base import Option, like, lora_A_init_
from .lora import LoRA


class MoSLoRA(LoRA):
    name = "moslora"
    summary = "s·B M A, mixer M r×r"
    options = {"moslora_mixer_init": Option("kaiming", "init of the r x r mixer: kaiming (the authors' code) or "
                                                       "orthogonal", ("kaiming", "orthogonal"))}

    def __init__(self, config, layer):
        super().__init__(config, layer)
        mixer = torch.empty(config.r, config.r, **like(layer))
        if config.moslora_mixer_init == "orthogonal":
            # orthogonal_ needs QR, which has no half-precision kernel on every device.
            mixer.copy_(nn.init.orthogonal_(torch.empty(config.r, config.r, device=mixer.device)))
        else:
            lora_A_init_(mixer)
        self.lora_mixer = nn.Parameter(mixer)

    def factors(self):
        return self.lora_mixer @ self.lora_A, self.lora_B  # materialized as plain LoRA: A' = M A

    @classmethod
    def parameter_count(cls, config, shapes):
        return super().parameter_count(config, shapes) + config.r ** 2 * len(shapes)
