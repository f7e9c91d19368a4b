"""CBM3D (Dabov et al., ICIP 2007) under the package's denoiser contract: the classical
baseline as a model, so that ``denoise``, ``restore`` and the Python API run it like the
networks (``load_model("cbm3d")``; it has no weights).

``cbm3d`` is the function (BM3D on a grey image, CBM3D on colour, by the ``bm3d``
package) and ``CBM3D`` the module that runs it on every image of a batch; ``evaluate``
calls the function with the true noise level, the module is told the photo's estimate.

Tiling bounds CBM3D's memory too, which grows with the pixels it is given (907 MiB for a
1024² crop: ``python benchmarks/bench_denoise.py --size 1024 --bm3d-size 1024``). Tiles
overlap by ``RECEPTIVE_FIELD_RADIUS`` and start on the grid of reference blocks, but the
``bm3d`` package's estimate is not local, so the tiled result is not the whole-image one:
on a 261×251 green-channel crop of scikit-image's retina at sigma 25, BM3D tiled at 240
differs from the whole crop by up to 6 levels of 255 at a pixel (0.2 on average, 5 % of
pixels by more than one level), and the crop shifted by one grid step (3 px) differs as
much far from the cut. (CBM3D also scales its colour transform by each tile's range.)
Tile it only where memory asks for it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fundus_restore.models import register_architecture

# The bm3d package refuses images under its 8-pixel block and crashes on exactly 8×8.
MIN_SIDE = 9
# The grid of reference blocks ("np" profile: a step of 3 in both stages).
REFERENCE_STEP = 3
# How far a pixel's estimate reaches: an 8-pixel block covering it (7), the reference
# block it was matched to within the 39-pixel search window (19), that group's other
# blocks (19 + 7): 52 pixels for the hard-thresholding stage, twice that once the
# Wiener stage matches blocks on its output.
RECEPTIVE_FIELD_RADIUS = 2 * (7 + 19 + 19 + 7)


def cbm3d(image: np.ndarray, sigma: float) -> np.ndarray:
    """Denoise an H×W×C float ``image`` (C 1 or 3, [0, 1] scale) whose white Gaussian
    noise has standard deviation ``sigma`` on the same scale; returns float32 H×W×C.
    A colour image is filtered in the opponent colour space (CBM3D), a grey one (or a grey
    one stored in three equal channels) by BM3D."""
    import bm3d

    height, width, channels = image.shape
    if channels not in (1, 3):
        raise ValueError(f"CBM3D takes grey or RGB images, got {channels} channels")
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"CBM3D needs at least {MIN_SIDE}×{MIN_SIDE} pixels, got {height}×{width}")
    if not sigma >= 0:
        raise ValueError(f"CBM3D needs a noise sigma >= 0, got {sigma}")
    if channels == 1 or (image == image[..., :1]).all():  # grey, maybe stored as RGB
        grey = bm3d.bm3d(image[..., 0], sigma_psd=sigma)[..., None].astype(np.float32)
        return np.repeat(grey, channels, axis=2)
    # CBM3D divides each opponent colour channel by its range over the image: a channel that
    # is constant (R - B everywhere the same, say) gives NaN, and each channel is then filtered alone.
    with np.errstate(divide="ignore", invalid="ignore"):
        restored = bm3d.bm3d_rgb(image, sigma_psd=sigma).astype(np.float32)
    if np.isfinite(restored).all():
        return restored
    return np.stack([bm3d.bm3d(image[..., c], sigma_psd=sigma) for c in range(channels)], axis=2).astype(np.float32)


@register_architecture("cbm3d")
class CBM3D(nn.Module):
    """``cbm3d`` on each N×C×H×W image of a batch, on the CPU whatever the input's device.

    It must be told the noise level: ``forward(x, sigma)`` with ``sigma`` on the [0, 1]
    scale, one number or one per image. ``denoise`` gives it the photo's estimate."""

    needs_noise_level = True
    receptive_field_radius = RECEPTIVE_FIELD_RADIUS
    tile_alignment = REFERENCE_STEP

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        if sigma is None:
            raise ValueError("CBM3D must be told the noise level: forward(x, sigma)")
        sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).tolist()
        images = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
        restored = np.stack([cbm3d(image, level) for image, level in zip(images, sigmas)])
        return torch.from_numpy(restored).permute(0, 3, 1, 2).to(x.device, x.dtype)
