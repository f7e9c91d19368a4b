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

With ``noise_map`` it is told the noise level, as DRUNet is: ``sigma`` enters as one
more input channel, constant over the image. One network then serves every level
(a denoiser trained at sigma 25 alone smooths quieter photos and leaves noise on noisier
ones), and ``fundus_restore.denoise`` estimates the level of a photo when none is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.models import register_architecture

WIDTHS = (32, 64, 128, 256)
# The noise map holds sigma in units of 25/255, near 1 where most training happens, so that
# under Adam its weights move the output about as fast as the image's do.
NOISE_MAP_UNIT = 25.0 / 255.0


class ResidualBlock(nn.Sequential):
    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def _blocks(width: int, count: int) -> nn.Sequential:
    return nn.Sequential(*(ResidualBlock(width) for _ in range(count)))


@register_architecture("resunet")
class ResUNet(nn.Module):
    def __init__(
        self, channels: int = 3, widths: tuple[int, ...] | list[int] = WIDTHS, blocks: int = 2, noise_map: bool = False
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or blocks < 1:
            raise ValueError(f"a residual U-Net needs at least 2 levels and 1 block, got widths={widths}, blocks={blocks}")
        self.config = {"channels": channels, "widths": list(widths), "blocks": blocks}
        if noise_map:  # only when set, so that the configs of earlier weights stay as they were
            self.config["noise_map"] = True
        self.noise_map = bool(noise_map)
        levels = range(len(widths) - 1)
        self.head = nn.Conv2d(channels + self.noise_map, widths[0], 3, padding=1)
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

    @property
    def needs_noise_level(self) -> bool:
        """Whether ``forward`` needs ``sigma`` (with ``noise_map``); a blind network ignores it."""
        return self.noise_map

    def with_config(self, changes: Mapping[str, Any]) -> "ResUNet":
        """The same function under the config ``changes``, for training from these weights.

        Two changes keep it: adding the noise map (its input weights start at zero), and
        colour to grey (``channels`` 3 to 1, for red-free photographs): the head's weights
        summed over the colour channels and the tail's averaged give, for a grey image,
        the mean of the colour network's three outputs on the grey level in all three
        channels, which is what ``fundus_restore.denoise`` computes with it.
        """
        requested = dict(changes)
        target = {**self.config, "noise_map": self.noise_map, **requested}
        channels = self.config["channels"]
        to_grey = target["channels"] != channels
        add_noise_map = target["noise_map"] and not self.noise_map
        if (set(requested) - {"channels", "noise_map"} or (self.noise_map and not target["noise_map"])
                or (to_grey and (channels, target["channels"]) != (3, 1))):
            raise ValueError(f"config {requested} would change the function of {self.config}")
        changed = ResUNet(**target)
        state = self.state_dict()
        head = state["head.weight"]
        if to_grey:
            head = torch.cat([head[:, :channels].sum(dim=1, keepdim=True), head[:, channels:]], dim=1)
            state["tail.weight"] = state["tail.weight"].mean(dim=0, keepdim=True)
            state["tail.bias"] = state["tail.bias"].mean(dim=0, keepdim=True)
        if add_noise_map:
            head = torch.cat([head, torch.zeros_like(head[:, :1])], dim=1)
        state["head.weight"] = head
        changed.load_state_dict(state)
        return changed.to(self.head.weight.device).train(self.training)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x`` (N×C×H×W). ``sigma`` (0–1 scale; a number, or one per image) is
        needed with ``noise_map`` and ignored without it (the network is then blind)."""
        height, width = x.shape[-2:]
        pad_bottom, pad_right = -height % self.factor, -width % self.factor
        padded = F.pad(x, (0, pad_right, 0, pad_bottom), mode="replicate") if pad_bottom or pad_right else x
        if self.noise_map:
            # torch.cat returns NCHW; channels-last is the layout the convolutions run
            # fastest in (without it the network took 1.35 times as long on the CPU).
            padded = torch.cat([padded, self._noise_map(sigma, padded)], dim=1)
            padded = padded.contiguous(memory_format=torch.channels_last)
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

    def _noise_map(self, sigma: float | torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        if sigma is None:
            raise ValueError(
                "this residual U-Net is told the noise level: give sigma (0-1 scale); "
                "fundus_restore.denoise estimates it from the photo when not given"
            )
        levels = torch.as_tensor(sigma, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1) / NOISE_MAP_UNIT
        if levels.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"sigma holds {levels.shape[0]} levels for {like.shape[0]} images")
        return levels.expand(like.shape[0], 1, *like.shape[-2:])
