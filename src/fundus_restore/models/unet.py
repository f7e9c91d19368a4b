"""A small U-Net vessel segmenter (Ronneberger et al., 2015), trained on DRIVE's expert maps.

Four levels of two 3×3 convolutions (``widths`` 16, 32, 64, 128 by default) with
batch norm and ReLU, 2×2 max pooling down, bilinear upsampling and concatenation
with the encoder's maps up, and a 1×1 convolution to one map of vessel logits
(``torch.sigmoid`` gives the probability). ``forward(x, sigma=None)`` keeps the
models' contract; ``sigma`` is ignored. ``features(x)`` gives the encoder's maps
with the logits, for the vessel-aware perceptual loss (``perceptual.VesselUNetFeatures``).

Any input size works: the image is padded (by replication) to a multiple of the
pooling factor and the logits cropped back. Small on purpose — about 0.49 M
parameters with the default widths (batch norm folded) — so that it trains in minutes on a CPU and
segments a 565×584 DRIVE photograph in a fraction of a second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.models import register_architecture
from fundus_restore.models.folding import fold_into

WIDTHS = (16, 32, 64, 128)


def _double_conv(inputs: int, outputs: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index in range(2):
        layers.append(nn.Conv2d(inputs if index == 0 else outputs, outputs, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(outputs))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_architecture("unet", task="segment-vessels")
class VesselUNet(nn.Module):
    def __init__(self, channels: int = 3, widths: tuple[int, ...] | list[int] = WIDTHS, batch_norm: bool = True) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got widths={widths}")
        self.config = {"channels": channels, "widths": list(widths), "batch_norm": batch_norm}
        self.encoder = nn.ModuleList(
            _double_conv(channels if i == 0 else widths[i - 1], w, batch_norm) for i, w in enumerate(widths)
        )
        self.decoder = nn.ModuleList(
            _double_conv(widths[i] + widths[i + 1], widths[i], batch_norm) for i in reversed(range(len(widths) - 1))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)
        self.factor = 2 ** (len(widths) - 1)
        # Two 3×3 convolutions per level, at strides 1, 2, 4, ... down and up again.
        self.receptive_field_radius = sum(2 * 2**level for level in range(len(widths))) * 2

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder's maps at the padded size, and the logits cropped to the input's size."""
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % self.factor, -width % self.factor
        if pad_bottom or pad_right:
            x = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate")
        skips = []
        for index, level in enumerate(self.encoder):
            x = level(x if index == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for level, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = level(torch.cat([skip, x], dim=1))
        return skips, self.head(x)[..., :height, :width]

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x)[1]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's output at each level, then the vessel logits, from one pass.

        Level ``i`` is ``widths[i]`` × ceil(H / 2^i) × ceil(W / 2^i) (the padding
        cropped off); the logits are 1 × H × W, as ``forward`` returns them.
        """
        height, width = x.shape[-2:]
        skips, logits = self._run(x)
        cropped = [skip[..., : -(-height // 2**i), : -(-width // 2**i)] for i, skip in enumerate(skips)]
        return cropped + [logits]

    def fold_batch_norm(self) -> VesselUNet:
        """The same function without batch norm layers (eval-mode statistics folded in)."""
        if not self.config["batch_norm"]:
            return self
        return fold_into(self, VesselUNet(self.config["channels"], self.config["widths"], batch_norm=False))
