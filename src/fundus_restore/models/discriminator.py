"""The SRGAN discriminator (Ledig et al., CVPR 2017): is this high-resolution image real?

Eight 3×3 convolutions with 64, 64, 128, 128, 256, 256, 512, 512 filters, stride 2
on every second one (where the filter count stays), LeakyReLU(0.2), batch norm on all
but the first; then dense 1024, LeakyReLU(0.2), dense 1. ``width`` scales every
filter count (64 is the paper's; smaller ones make fast tests). Unlike the
restoration models its ``forward`` takes no ``sigma``: it judges, it restores nothing.

Deviations from the paper, each for a reason:

* ``forward`` returns the logit, not the sigmoid: train with
  ``BCEWithLogitsLoss`` (see ``fundus_restore.perceptual``), which computes
  log-sigmoid without the overflow of log(sigmoid(x)) for confident outputs;
  ``torch.sigmoid(logit)`` is the paper's probability;
* an adaptive average pooling to 6×6 before the dense layers lets the network take
  any patch size. The paper's 96-pixel patches give 6×6 maps after the four stride-2
  convolutions, where the pooling is the identity: there the network is exactly the
  paper's.
"""

from __future__ import annotations

import torch
from torch import nn

from fundus_restore.models import register_architecture

WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512)
POOLED_SIZE = 6  # the map size of the paper's 96-pixel patches
DENSE_WIDTH = 1024
NEGATIVE_SLOPE = 0.2


@register_architecture("srgan-discriminator", task="discriminate")
class SRGANDiscriminator(nn.Module):
    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.config = {"channels": channels, "width": width}
        widths = [w * width // WIDTHS[0] for w in WIDTHS]
        layers: list[nn.Module] = []
        inputs = channels
        for index, outputs in enumerate(widths):
            stride = 2 if index % 2 else 1
            first = index == 0
            layers.append(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=first))
            if not first:
                layers.append(nn.BatchNorm2d(outputs))
            layers.append(nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True))
            inputs = outputs
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(POOLED_SIZE)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(inputs * POOLED_SIZE**2, DENSE_WIDTH),
            nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
            nn.Linear(DENSE_WIDTH, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (shape N) that each image of ``x`` (N×C×H×W, on [0, 1]) is a real photograph."""
        return self.classifier(self.pool(self.features(x))).squeeze(1)
