"""Differentiable Hessian ridges: the definition, dark lines, and the losses built on them."""

from __future__ import annotations

import math

import numpy as np
import torch

from fundus_restore.perceptual import PerceptualLoss
from fundus_restore.ridges import RIDGE_SATURATION, RidgeFeatures, vessel_weight_map


def _dark_line(width: int, size: int = 48) -> torch.Tensor:
    """A bright image with one dark vertical line of ``width`` px, N×3×H×W."""
    image = torch.full((1, 3, size, size), 0.6)
    image[..., size // 2 - width // 2 : size // 2 - width // 2 + width] = 0.4
    return image


def test_ridge_features_are_the_largest_hessian_eigenvalue_of_gaussian_derivatives() -> None:
    from scipy import ndimage

    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = RidgeFeatures()(image)[0].double().numpy()
    green = image[0, 1].double().numpy()
    for index, sigma in enumerate(RidgeFeatures().sigmas):
        rr, cc, rc = (ndimage.gaussian_filter(green, sigma, order=o, mode="nearest") for o in ((2, 0), (0, 2), (1, 1)))
        largest = (rr + cc) / 2 + np.sqrt(((rr - cc) / 2) ** 2 + rc**2)
        # Up to our second-derivative kernel summing to exactly 0 (scipy's sums to about -1e-4).
        np.testing.assert_allclose(features[index], sigma**2 * largest, atol=2e-3)


def test_ridge_features_light_up_dark_lines_and_give_a_vessel_aware_loss() -> None:
    features = RidgeFeatures()
    flat, line = features(torch.full((1, 3, 48, 48), 0.6)), features(_dark_line(3))
    assert flat.abs().max() < 1e-5
    assert line[0, :, 10:-10, 24].min() > 0.01  # positive on the line at every scale
    # Blurring the line costs more in ridge features than an equal-MSE uniform shift does.
    blurred = torch.nn.functional.avg_pool2d(_dark_line(3), (1, 5), stride=1, padding=(0, 2), count_include_pad=False)
    shift = math.sqrt(float(((blurred - _dark_line(3)) ** 2).mean()))
    loss = PerceptualLoss(features, feature_scale=1.0)
    assert loss(blurred, _dark_line(3)) > 10 * loss(_dark_line(3) + shift, _dark_line(3))
    restored = _dark_line(3).requires_grad_()
    loss(restored, blurred).backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0


def test_vessel_weight_map_is_one_off_vessels_and_up_to_one_plus_the_weight_on_them() -> None:
    weights = vessel_weight_map(torch.cat([torch.full((1, 3, 48, 48), 0.6), _dark_line(3)]), vessel_weight=4.0)
    assert weights.shape == (2, 1, 48, 48)
    assert torch.allclose(weights[0], torch.ones(1, 48, 48), atol=1e-4)
    assert weights[1, 0, 10:-10, 24].min() > 4.0 and weights.max() <= 5.0 + 1e-6
    assert RIDGE_SATURATION > 0
