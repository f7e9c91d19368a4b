"""Differentiable vessel ridges: the classical segmenter's Hessian measure in torch.

``fundus_restore.vessels`` finds vessels with the scale-normalised largest Hessian
eigenvalue of the green channel (scikit-image, NumPy). The same measure written
with convolutions runs on batches, on the GPU, and passes gradients, for the
losses that care about vessels: the vessel-aware perceptual loss of
super-resolution (``perceptual.features: vessels``) and the vessel weighting of
the denoisers' MSE (``loss.vessel_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.vessels import HESSIAN_SIGMAS

# Ridge strength at which a pixel counts fully as vessel in ``vessel_weight_map``: the
# median over the expert's vessel pixels of DRIVE test image 01 (its background's
# median is 0.003, its 90th percentile 0.008).
RIDGE_SATURATION = 0.02


def _gaussian_derivatives(sigma: float) -> torch.Tensor:
    """3×K 1-D kernels: the Gaussian of ``sigma`` and its first and second derivatives
    (radius 4 sigma, as ``scipy.ndimage.gaussian_filter``)."""
    radius = max(1, round(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    gaussian = torch.exp(-(x**2) / (2 * sigma**2))
    gaussian /= gaussian.sum()
    first = -x / sigma**2 * gaussian
    second = (x**2 / sigma**4 - 1 / sigma**2) * gaussian
    second -= second.sum() * gaussian  # sums to 0 as it should, so flat regions give exactly no ridge
    return torch.stack([gaussian, first, second]).float()


class RidgeFeatures(nn.Module):
    """Vessel-aware features with no learnt weights: for each Hessian scale sigma, the
    scale-normalised largest Hessian eigenvalue sigma²·λ₁ of the green channel (large on
    dark lines, i.e. vessels, of width about 2·sigma). N×3×H×W in (or N×1×H×W, a grey
    red-free image, its own green), N×S×H×W out.

    ``scale`` multiplies the sigmas (``fundus_restore.vessels.HESSIAN_SIGMAS`` at DRIVE
    scale) for photographs of another resolution.
    """

    weights_loaded = True  # nothing to load: the filters are analytic

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.sigmas = tuple(sigma * scale for sigma in HESSIAN_SIGMAS)
        for index, sigma in enumerate(self.sigmas):
            self.register_buffer(f"kernels{index}", _gaussian_derivatives(sigma), persistent=False)

    def _separable(self, image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        radius = rows.numel() // 2
        padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
        filtered = F.conv2d(padded, rows.view(1, 1, -1, 1))
        return F.conv2d(filtered, cols.view(1, 1, 1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"ridge features take N×3×H×W colour or N×1×H×W grey images, got shape {tuple(x.shape)}")
        green = (x[:, 1:2] if x.shape[1] == 3 else x).float()
        responses = []
        for index, sigma in enumerate(self.sigmas):
            gaussian, first, second = getattr(self, f"kernels{index}")
            rr = self._separable(green, second, gaussian)
            cc = self._separable(green, gaussian, second)
            rc = self._separable(green, first, first)
            half_trace, half_gap = (rr + cc) / 2, (rr - cc) / 2
            largest = half_trace + torch.sqrt(half_gap**2 + rc**2 + 1e-16)  # finite gradient where flat
            responses.append(sigma**2 * largest)
        return torch.cat(responses, dim=1)



def vessel_weight_map(
    images: torch.Tensor, vessel_weight: float, ridge_features: RidgeFeatures | None = None
) -> torch.Tensor:
    """Per-pixel loss weights N×1×H×W: 1 + ``vessel_weight`` × how much each pixel of
    ``images`` (N×3×H×W or grey N×1×H×W, the clean targets) is vessel, from 0 (no ridge) to 1 (a ridge
    of ``RIDGE_SATURATION`` or more, at any scale). No gradient flows through it.
    A loss called every step passes its own ``ridge_features`` (built once, on its device)."""
    ridge_features = RidgeFeatures().to(images.device) if ridge_features is None else ridge_features
    with torch.no_grad():
        ridges = ridge_features(images).amax(dim=1, keepdim=True)
        return 1 + vessel_weight * (ridges / RIDGE_SATURATION).clamp(0, 1)
