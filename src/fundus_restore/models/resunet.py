"""A residual U-Net denoiser (after DRUNet, Zhang et al., TPAMI 2021): a wide view at little compute.

DnCNN sees 41 pixels across and leaves the noise whose wavelength is longer: below 1/64
cycle per pixel its output's error is about the noise's own (``docs/results.md``). A
U-Net sees far wider for less work, most of it done at reduced resolution. Each of the
``len(widths)`` levels holds ``blocks`` residual blocks (3×3 conv, ReLU, 3×3 conv, plus
the input); 2×2 stride-2 convolutions go down, 2×2 stride-2 transposed convolutions come
up, and each decoder level adds its encoder's maps. No batch norm, so nothing to fold.
Like DnCNN it learns the noise: the output is ``x - body(x)``, and the last convolution
starts at zero, so an untrained network is the identity.

With the default widths (32, 64, 128, 256) and 2 blocks it has 4.3 M parameters and
costs about 40 % of DnCNN-20's multiply-adds per pixel. Any input size works: the
image is padded (by replication) to a multiple of ``factor`` and the output cropped
back. Tiles must start on multiples of ``factor`` (``tile_alignment``) for the strided
layers to see the same grid as on the whole image; ``fundus_restore.inference`` does so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.models import register_architecture

WIDTHS = (32, 64, 128, 256)


class ResidualBlock(nn.Sequential):
    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def _blocks(width: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(width) for _ in range(count)))


@register_architecture("resunet")
class ResUNet(nn.Module):
    def __init__(self, channels: int = 3, widths: tuple[int, ...] | list[int] = WIDTHS, blocks: int = 2) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or blocks < 1:
            raise ValueError(f"a residual U-Net needs at least 2 levels and 1 block, got widths={widths}, blocks={blocks}")
        self.config = {"channels": channels, "widths": list(widths), "blocks": blocks}
        levels = range(len(widths) - 1)
        self.head = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(_blocks(widths[i], blocks) for i in levels)
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 2, stride=2) for i in levels)
        self.middle = _blocks(widths[-1], blocks)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in levels)
        self.decoder = nn.ModuleList(_blocks(widths[i], blocks) for i in levels)
        self.tail = nn.Conv2d(widths[0], channels, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)
        self.factor = 2 ** (len(widths) - 1)
        self.tile_alignment = self.factor
        # Per level, the encoder's and decoder's 2·blocks 3×3 convolutions and the 2×2 down
        # and up convolutions reach 2^level pixels each; the head, the tail and the padding
        # to a multiple of the factor add the rest.
        per_level = [(4 * blocks + 2) * 2**level for level in levels]
        self.receptive_field_radius = 2 + sum(per_level) + 2 * blocks * 2 ** (len(widths) - 1) + self.factor

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x`` (N×C×H×W). The network is blind: ``sigma`` is accepted and ignored."""
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % self.factor, -width % self.factor
        padded = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate") if pad_bottom or pad_right else x
        features = self.head(padded)
        skips = []
        for blocks, down in zip(self.encoder, self.down, strict=True):
            features = blocks(features)
            skips.append(features)
            features = down(features)
        features = self.middle(features)
        for up, blocks, skip in zip(reversed(self.up), reversed(self.decoder), reversed(skips), strict=True):
            features = blocks(up(features) + skip)
        return x - self.tail(features)[..., :height, :width]
