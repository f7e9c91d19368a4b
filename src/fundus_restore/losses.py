"""Training losses for restoration networks on N×C×H×W tensors.

The paper's equation 1 weights the mean squared error of each colour channel: the
green channel carries the vessel contrast a grader reads, so R:G:B = 1:3:2 spends
the network's capacity where the vessels are. The weights are normalised to sum to
one, so equal weights give exactly the plain MSE and the loss scale (hence the
learning rate) does not depend on how the weights are written.

The paper's proposed next step weights errors on vessels more: with a
``vessel_weight`` w, each pixel's squared error counts 1 + w·v, v in [0, 1] being how
much the clean target shows a vessel there (``fundus_restore.ridges.vessel_weight_map``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GREEN_WEIGHTS = (1.0, 3.0, 2.0)


def _normalised_weights(weights: Sequence[float] | torch.Tensor, channels: int) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if weights.numel() != channels:
        raise ValueError(f"{weights.numel()} channel weights for {channels} channels")
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"channel weights must be finite, non-negative and not all zero, got {weights.tolist()}")
    return weights / weights.sum()


def channel_weighted_mse(
    restored: torch.Tensor,
    target: torch.Tensor,
    weights: Sequence[float] | torch.Tensor = GREEN_WEIGHTS,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_c w_c · MSE_c / Σ_c w_c over images N×C×H×W (the paper's equation 1).

    ``mask`` (N×1×H×W or N×H×W, bool or 0/1) limits every channel's mean to the
    pixels it marks, e.g. the field of view; an all-false mask gives a loss of 0.
    Non-negative float values weight the pixels instead (a weighted mean).
    """
    if restored.shape != target.shape or restored.dim() != 4:
        raise ValueError(f"expected two N×C×H×W tensors of one shape, got {tuple(restored.shape)} and {tuple(target.shape)}")
    normalised = _normalised_weights(weights, restored.shape[1]).to(restored.device)
    squared_error = (restored - target).float().square()
    if mask is None:
        per_channel = squared_error.mean(dim=(0, 2, 3))
    else:
        mask = mask.reshape(restored.shape[0], 1, *restored.shape[2:]).to(squared_error.dtype)
        # The true total weight, however small; an all-zero mask makes 0 / tiny = 0.
        per_channel = (squared_error * mask).sum(dim=(0, 2, 3)) / mask.sum().clamp(min=torch.finfo(mask.dtype).tiny)
    return (normalised * per_channel).sum()


class ChannelWeightedMSE(nn.Module):
    """Module form of :func:`channel_weighted_mse` with fixed channel weights and, with
    ``vessel_weight`` > 0, pixels weighted 1 + ``vessel_weight`` × the target's vessel map."""

    def __init__(self, weights: Sequence[float] = GREEN_WEIGHTS, vessel_weight: float = 0.0) -> None:
        super().__init__()
        self.weights = tuple(float(w) for w in weights)
        _normalised_weights(self.weights, len(self.weights))  # refuse bad weights at construction
        if not vessel_weight >= 0:
            raise ValueError(f"vessel_weight must be non-negative, got {vessel_weight}")
        self.vessel_weight = float(vessel_weight)
        self.ridge_features: nn.Module | None = None
        if self.vessel_weight > 0:
            from fundus_restore.ridges import RidgeFeatures  # ridges builds on vessels, which is heavier

            self.ridge_features = RidgeFeatures()  # a submodule: built once, moved with the loss

    def forward(self, restored: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.ridge_features is not None:
            from fundus_restore.ridges import vessel_weight_map

            pixels = vessel_weight_map(target, self.vessel_weight, self.ridge_features)
            mask = pixels if mask is None else pixels * mask.reshape(pixels.shape).to(pixels.dtype)
        return channel_weighted_mse(restored, target, self.weights, mask)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, vessel_weight={self.vessel_weight}"


def vessel_segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy on the logits plus ``dice_weight`` × (1 − soft Dice), for a
    vessel segmenter: N×1×H×W logits against a 0/1 map of the same shape.

    Vessels are about 12 % of a fundus field of view: cross-entropy alone settles on
    thick vessels and background, the Dice term keeps the thin ones worth finding.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits and target differ in shape: {tuple(logits.shape)} and {tuple(target.shape)}")
    logits, target = logits.float(), target.float()
    cross_entropy = nn.functional.binary_cross_entropy_with_logits(logits, target)
    probability = torch.sigmoid(logits)
    dice = (2 * (probability * target).sum() + 1.0) / (probability.sum() + target.sum() + 1.0)
    return cross_entropy + dice_weight * (1 - dice)


class VesselSegmentationLoss(nn.Module):
    """Module form of :func:`vessel_segmentation_loss`."""

    def __init__(self, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vessel_segmentation_loss(logits, target, self.dice_weight)
