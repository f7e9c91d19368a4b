"""Perceptual and adversarial losses for super-resolution (SRGAN, Ledig et al. 2017).

The generator's objective is the paper's equation 3: a content loss plus 1e-3 times
the adversarial loss. Our content loss is the pixel MSE (optionally channel-weighted
1:3:2, see ``fundus_restore.losses``) plus, when a feature extractor is given, the
MSE between feature maps (``PerceptualLoss``): VGG19 ``relu5_4`` features are the
paper's VGG54; any frozen network that maps images to feature maps will do.
``fundus_restore.ridges.RidgeFeatures`` is the vessel-aware one that needs no
ImageNet weights: the multi-scale Hessian ridge responses of the green channel that
the classical vessel segmenter thresholds, so the loss compares what makes a vessel a vessel.
``VesselUNetFeatures`` is the learned counterpart: the feature maps of the bundled
vessel segmenter ``vessels-unet``.

Feature maps are multiplied by ``feature_scale`` before the MSE; the paper's 1/12.75
brings VGG losses to the scale of the pixel MSE.

The discriminator returns logits and both adversarial losses use
binary cross-entropy on logits: the generator's term is −log D(G(x)) (the paper's
non-saturating form), the discriminator's −log D(y) − log(1 − D(G(x))).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fundus_restore.losses import channel_weighted_mse
from fundus_restore.pretrained import WeightsError, load_model
from fundus_restore.ridges import RidgeFeatures
from fundus_restore.vessels import LEARNED_SEGMENTER

SRGAN_FEATURE_SCALE = 1 / 12.75
ADVERSARIAL_WEIGHT = 1e-3
EQUAL_WEIGHTS = (1.0, 1.0, 1.0)

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]


def _feature_list(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


def perceptual_loss(
    restored: torch.Tensor,
    target: torch.Tensor,
    feature_extractor: FeatureExtractor,
    feature_scale: float = SRGAN_FEATURE_SCALE,
) -> torch.Tensor:
    """MSE between the features of ``restored`` and ``target`` (N×C×H×W), scaled by ``feature_scale``.

    An extractor returning several feature maps gets the mean of their MSEs. The
    target's features are computed without gradient: only ``restored`` is trained.
    """
    if restored.shape != target.shape:
        raise ValueError(f"restored and target differ in shape: {tuple(restored.shape)} and {tuple(target.shape)}")
    restored_features = _feature_list(feature_extractor(restored))
    with torch.no_grad():
        target_features = _feature_list(feature_extractor(target))
    errors = [
        F.mse_loss(feature_scale * r.float(), feature_scale * t.float())
        for r, t in zip(restored_features, target_features, strict=True)
    ]
    return torch.stack(errors).mean()


class PerceptualLoss(nn.Module):
    """Module form of :func:`perceptual_loss` around a frozen feature extractor.

    An extractor that says its weights are not loaded (``weights_loaded`` False, as a
    ``VGG19Features`` built without a file) is refused here, before any training.
    """

    def __init__(self, feature_extractor: nn.Module, feature_scale: float = SRGAN_FEATURE_SCALE) -> None:
        super().__init__()
        if not getattr(feature_extractor, "weights_loaded", True):
            raise WeightsError(
                f"{type(feature_extractor).__name__} has random weights: a perceptual loss needs trained "
                "features (for VGG19, VGG19Features.from_file(PATH), i.e. --vgg-weights)"
            )
        self.feature_extractor = feature_extractor.requires_grad_(False).eval()
        self.feature_scale = feature_scale

    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return perceptual_loss(restored, target, self.feature_extractor, self.feature_scale)

    def extra_repr(self) -> str:
        return f"feature_scale={self.feature_scale:.4g}"


class VesselUNetFeatures(nn.Module):
    """The frozen learned vessel segmenter's features (``VesselUNet.features``): each
    encoder level's output and the vessel logits. N×3×H×W in, a list of maps out.

    The encoder levels are the segmenter's multi-scale description of the image (from
    edges at full size to vessel context at 1/8, as VGG's layers are for ImageNet); the
    logits are its decision, which a restoration must keep. The decoder's maps are
    left out: they mix the encoder's again on the way to the logits.

    The images are fed as ``vessels.learned_vesselness`` feeds the segmenter and as
    it was trained: RGB on [0, 1] as is, no mean or deviation normalisation, no clipping.
    That function also resizes photos to DRIVE's scale (565 px wide); a training
    patch's photo size is unknown here, so patches are seen at their own scale, as
    with ``RidgeFeatures()``.

    The unscaled loss (the mean over the five maps, the logits' MSE the largest) is about
    100 times the pixel MSE: on 64-px DRIVE crops σ = 25 noise gives 1.0–1.3 against a
    pixel MSE of 0.0095, so the default ``feature_scale`` 1/12.75 (for VGG's features)
    brings it to the pixel MSE's order; the ridge features' is some 4000 times smaller.
    """

    def __init__(self) -> None:
        super().__init__()
        self.segmenter = load_model(LEARNED_SEGMENTER).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.segmenter.features(x)


# The perceptual features that need no ImageNet weights, by their config name (``perceptual.features``).
VESSEL_FEATURES: dict[str, type[nn.Module]] = {"vessels": RidgeFeatures, "vessels-unet": VesselUNetFeatures}


class GeneratorLoss(NamedTuple):
    """The generator's loss (``total``, to minimise) and its terms, for logging.

    ``adversarial`` is the unweighted −log D(G(x)); ``total`` holds it times the
    adversarial weight. A term that is off is 0.
    """

    total: torch.Tensor
    pixel: torch.Tensor
    perceptual: torch.Tensor
    adversarial: torch.Tensor


def generator_loss(
    sr: torch.Tensor,
    hr: torch.Tensor,
    fake_logits: torch.Tensor | None = None,
    *,
    pixel_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    perceptual: PerceptualLoss | None = None,
    adversarial_weight: float = ADVERSARIAL_WEIGHT,
) -> GeneratorLoss:
    """Content (pixel MSE + perceptual) + ``adversarial_weight`` × adversarial loss (the paper's equation 3).

    ``sr`` is the generator's output and ``hr`` the ground truth (N×C×H×W);
    ``fake_logits`` the discriminator's logits on ``sr`` (None, as in SRResNet
    pre-training, leaves the adversarial term out). ``pixel_loss(sr, hr)`` is the pixel
    term: plain MSE by default, or the criterion a restoration trains on, e.g.
    ``ChannelWeightedMSE(GREEN_WEIGHTS, vessel_weight)`` for vessel contrast.
    """
    zero = sr.new_zeros(())
    pixel = channel_weighted_mse(sr, hr, EQUAL_WEIGHTS) if pixel_loss is None else pixel_loss(sr, hr)
    perceptual_term = perceptual(sr, hr) if perceptual is not None else zero
    if fake_logits is None:
        adversarial = zero
    else:
        adversarial = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    total = pixel + perceptual_term + adversarial_weight * adversarial
    return GeneratorLoss(total, pixel, perceptual_term, adversarial)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log D(hr) − log(1 − D(sr)), from logits; compute ``fake_logits`` on ``sr.detach()``."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake
