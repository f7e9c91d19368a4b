"""DnCNN (Zhang et al., IEEE TIP 2017): residual learning of the noise.

``depth`` convolutions of 3×3: conv+ReLU, (depth-2)× conv+BN+ReLU, conv. The network
predicts the noise and the denoised image is ``x - noise``. The official blind
weights have 20 convolutions, the sigma-specific ones 17. Batch norm can be folded
into the preceding convolution for inference (the official MatConvNet files are
already folded: build with ``batch_norm=False`` to load them).
"""

from __future__ import annotations

import torch
from torch import nn

from fundus_restore.models import register_architecture
from fundus_restore.models.folding import fold_into


@register_architecture("dncnn")
class DnCNN(nn.Module):
    def __init__(self, channels: int = 3, depth: int = 17, width: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN needs at least 3 layers, got depth={depth}")
        self.config = {"channels": channels, "depth": depth, "width": width, "batch_norm": batch_norm}
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            # A convolution followed by batch norm needs no bias of its own.
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width, eps=1e-4, momentum=0.05))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x`` (N×C×H×W). DnCNN is blind: ``sigma`` is accepted and ignored."""
        return x - self.body(x)

    def fold_batch_norm(self) -> "DnCNN":
        """Return an equivalent inference model with every batch norm folded into its conv."""
        if not self.config["batch_norm"]:
            return self
        return fold_into(self, DnCNN(**{**self.config, "batch_norm": False}))
