"""SRResNet, the SRGAN generator (Ledig et al., CVPR 2017), for ×2 or ×4 super-resolution.

A 9×9 convolution + PReLU, ``blocks`` residual blocks (conv3×3-BN-PReLU-conv3×3-BN
plus the identity), a conv3×3-BN whose output is added to the first features (the
global skip), one sub-pixel ×2 upsampler per factor of two (conv ``width``→4·``width``,
PixelShuffle(2), PReLU) and a 9×9 output convolution to ``channels``.

Deviations from the paper, each for a reason:

* the input is the low-resolution image on [0, 1] and the output is linear on the
  same scale (the paper's HR side was on [-1, 1] behind a tanh): the pipeline stays on
  one scale and the output is not squashed, like the package's denoisers;
* PReLU slopes are per channel (one per feature map);
* the upsampler convolutions start with ICNR initialisation (Aitken et al. 2017):
  the four sub-pixels of each output channel share one kernel, so the untrained
  network upsamples like nearest neighbour and not with the checkerboard that
  random sub-pixel kernels paint, which could pass for fine vessel texture.

Our option beyond the paper, ``bicubic_skip=True``: the network adds its output to the
bicubic enlargement of the input (the image-level residual of VDSR), with the output
convolution starting at zero, so the untrained model *is* bicubic interpolation (torch's,
a = −0.75 with edges repeated, not the MATLAB kernel of ``degrade.bicubic_upsample``, a = −0.5,
that the tables' bicubic row uses) and
training only ever learns the detail bicubic misses. Fundus photographs are smooth
enough that bicubic ×4 already reaches 43 dB on HEI-MED crops; a network that must
first relearn interpolation needs far more steps than one that starts from it.

Batch norm can be folded into the preceding convolution for inference
(``fold_batch_norm``), and ``receptive_field_radius`` tells tiled inference the
overlap at which tiling is exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.models import register_architecture
from fundus_restore.models.folding import fold_into

OUTER_KERNEL = 9  # the first and the output convolution
INNER_KERNEL = 3


def _conv_norm(inputs: int, outputs: int, batch_norm: bool) -> list[nn.Module]:
    """A 3×3 convolution, followed by batch norm when asked (the convolution then needs no bias)."""
    conv = nn.Conv2d(inputs, outputs, INNER_KERNEL, padding=INNER_KERNEL // 2, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(outputs)] if batch_norm else [conv]


class ResidualBlock(nn.Module):
    """conv3×3-BN-PReLU-conv3×3-BN plus the identity."""

    def __init__(self, width: int, batch_norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_norm(width, width, batch_norm), nn.PReLU(width), *_conv_norm(width, width, batch_norm)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _icnr_(conv: nn.Conv2d, factor: int) -> None:
    """Give the ``factor``² sub-pixels of each PixelShuffle output channel the same kernel.

    PixelShuffle takes output channel c's sub-pixel k from input channel c·factor² + k,
    so repeating each kernel factor² times along the output axis does it.
    """
    shared = torch.empty(conv.out_channels // factor**2, *conv.weight.shape[1:])
    nn.init.kaiming_normal_(shared)
    with torch.no_grad():
        conv.weight.copy_(shared.repeat_interleave(factor**2, dim=0))
        if conv.bias is not None:
            conv.bias.zero_()


def upsampler_x2(width: int) -> nn.Sequential:
    """Sub-pixel ×2 upsampling: conv ``width``→4·``width``, PixelShuffle(2), PReLU."""
    conv = nn.Conv2d(width, 4 * width, INNER_KERNEL, padding=INNER_KERNEL // 2)
    _icnr_(conv, 2)
    return nn.Sequential(conv, nn.PixelShuffle(2), nn.PReLU(width))


@register_architecture("srresnet", task="upscale")
class SRResNet(nn.Module):
    def __init__(
        self,
        channels: int = 3,
        blocks: int = 16,
        width: int = 64,
        scale: int = 4,
        batch_norm: bool = True,
        bicubic_skip: bool = False,
    ) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"SRResNet upscales by 2 or 4, got scale={scale}")
        if blocks < 1:
            raise ValueError(f"SRResNet needs at least 1 residual block, got blocks={blocks}")
        self.config = {
            "channels": channels, "blocks": blocks, "width": width, "scale": scale, "batch_norm": batch_norm,
            "bicubic_skip": bicubic_skip,
        }
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(channels, width, OUTER_KERNEL, padding=OUTER_KERNEL // 2), nn.PReLU(width))
        self.blocks = nn.Sequential(*(ResidualBlock(width, batch_norm) for _ in range(blocks)))
        self.fuse = nn.Sequential(*_conv_norm(width, width, batch_norm))
        upsamplers = int(math.log2(scale))
        self.upsample = nn.Sequential(*(upsampler_x2(width) for _ in range(upsamplers)))
        self.tail = nn.Conv2d(width, channels, OUTER_KERNEL, padding=OUTER_KERNEL // 2)
        if bicubic_skip:  # start as bicubic interpolation
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        self.receptive_field_radius = self._receptive_field_radius(blocks, upsamplers)

    @staticmethod
    def _receptive_field_radius(blocks: int, upsamplers: int) -> int:
        """Radius in input pixels of the region one output pixel depends on.

        A convolution of radius r run at f times the input resolution reaches
        ceil(r / f) input pixels further; summed over the path through every conv
        (the skips are shorter paths). Measured tight by the tests.
        """
        low_resolution = OUTER_KERNEL // 2 + INNER_KERNEL // 2 * (2 * blocks + 1)  # head, blocks, fuse
        # Each upsampler's conv runs at the resolution before its shuffle: 1, 2, ...
        upsampling = sum(math.ceil((INNER_KERNEL // 2) / 2**k) for k in range(upsamplers))
        output = math.ceil((OUTER_KERNEL // 2) / 2**upsamplers)
        return low_resolution + upsampling + output

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Upscale ``x`` (N×C×H×W, on [0, 1]) to N×C×(scale·H)×(scale·W). ``sigma`` is ignored."""
        features = self.head(x)
        features = features + self.fuse(self.blocks(features))
        detail = self.tail(self.upsample(features))
        if not self.config["bicubic_skip"]:
            return detail
        return detail + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)

    def with_config(self, changes: Mapping[str, Any]) -> SRResNet:
        """The same function under the config ``changes``, for training from these weights.

        Only more residual blocks keep it: the new blocks go after the trained ones, with
        their last layer at zero (the batch norm's scale, or the convolution without it),
        so each starts as the identity. That tests whether depth adds what more steps of
        the trained network no longer do.
        """
        requested = dict(changes)
        blocks = int(requested.get("blocks", self.config["blocks"]))
        if set(requested) - {"blocks"} or blocks < self.config["blocks"]:
            raise ValueError(f"config {requested} would change the function of {self.config}")
        deeper = SRResNet(**{**self.config, "blocks": blocks})
        # Every trained weight in its place (a strict load); the new blocks' stay as built.
        deeper.load_state_dict(deeper.state_dict() | self.state_dict())
        with torch.no_grad():
            for block in deeper.blocks[self.config["blocks"]:]:
                last = block.body[-1]
                nn.init.zeros_(last.weight)
                if last.bias is not None:
                    nn.init.zeros_(last.bias)
        return deeper.to(self.head[0].weight.device).train(self.training)

    def fold_batch_norm(self) -> SRResNet:
        """Return an equivalent inference model with every batch norm folded into its conv."""
        if not self.config["batch_norm"]:
            return self
        return fold_into(self, SRResNet(**{**self.config, "batch_norm": False}))
