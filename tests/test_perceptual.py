from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fundus_restore.losses import GREEN_WEIGHTS, ChannelWeightedMSE, channel_weighted_mse
from fundus_restore.models.unet import VesselUNet
from fundus_restore.models.vgg import VGG19Features
from fundus_restore.perceptual import (
    PerceptualLoss,
    VesselUNetFeatures,
    discriminator_loss,
    generator_loss,
    perceptual_loss,
)
from fundus_restore.pretrained import WeightsError


def identity_features(x: torch.Tensor) -> torch.Tensor:
    return x


def test_equal_features_give_zero() -> None:
    # A per-image mean: images that differ by nothing the extractor sees have no perceptual loss.
    mean_colour = nn.AdaptiveAvgPool2d(1)
    a = torch.rand(2, 3, 8, 8)
    b = a.flip(-1)  # same pixels, another place
    assert perceptual_loss(a, b, mean_colour, feature_scale=1.0) < 1e-12  # summation order only
    torch.testing.assert_close(perceptual_loss(a, a + 0.1, mean_colour, feature_scale=1.0), torch.tensor(0.01))


def test_feature_mse_is_scaled_by_the_square_of_feature_scale() -> None:
    a, b = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    torch.testing.assert_close(perceptual_loss(a, b, identity_features, feature_scale=1.0), torch.tensor(0.25))
    torch.testing.assert_close(perceptual_loss(a, b, identity_features, feature_scale=2.0), torch.tensor(1.0))


def test_several_feature_maps_are_averaged() -> None:
    a, b = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    two_layers = lambda x: [x, 3 * x]  # noqa: E731 - MSEs 1 and 9
    torch.testing.assert_close(perceptual_loss(a, b, two_layers, feature_scale=1.0), torch.tensor(5.0))


def test_module_and_function_agree_and_only_the_restored_image_gets_gradient() -> None:
    extractor = nn.Conv2d(3, 4, 3, padding=1)
    restored = torch.rand(2, 3, 8, 8, requires_grad=True)
    target = torch.rand(2, 3, 8, 8, requires_grad=True)
    loss = PerceptualLoss(extractor, feature_scale=0.5)
    value = loss(restored, target)
    torch.testing.assert_close(value, perceptual_loss(restored, target, extractor, 0.5))
    value.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    assert target.grad is None
    assert not any(p.requires_grad for p in extractor.parameters())


def test_vgg_without_weights_is_refused() -> None:
    with pytest.raises(WeightsError, match="random weights.*--vgg-weights"):
        PerceptualLoss(VGG19Features("relu2_2"))


def test_adversarial_term_is_bce_of_ones() -> None:
    sr, hr = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    fake_logits = torch.tensor([0.0, 2.0])
    loss = generator_loss(sr, hr, fake_logits)
    # −log σ(0) = log 2, −log σ(2) = log(1 + e⁻²)
    expected_adversarial = (math.log(2) + math.log1p(math.exp(-2))) / 2
    torch.testing.assert_close(loss.adversarial, torch.tensor(expected_adversarial))
    torch.testing.assert_close(loss.pixel, nn.functional.mse_loss(sr, hr))
    torch.testing.assert_close(loss.total, loss.pixel + 1e-3 * loss.adversarial)
    assert loss.perceptual == 0


def test_content_only_and_green_weighted_pixels() -> None:
    sr, hr = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    loss = generator_loss(sr, hr, pixel_loss=ChannelWeightedMSE(GREEN_WEIGHTS), perceptual=PerceptualLoss(nn.Identity(), 1.0))
    torch.testing.assert_close(loss.pixel, channel_weighted_mse(sr, hr, GREEN_WEIGHTS))
    torch.testing.assert_close(loss.perceptual, nn.functional.mse_loss(sr, hr))
    assert loss.adversarial == 0
    torch.testing.assert_close(loss.total, loss.pixel + loss.perceptual)


def test_discriminator_loss_from_logits() -> None:
    # Confident and right: near 0. Undecided (logit 0 everywhere): 2 log 2.
    assert discriminator_loss(torch.tensor([20.0]), torch.tensor([-20.0])) < 1e-8
    torch.testing.assert_close(discriminator_loss(torch.zeros(3), torch.zeros(3)), torch.tensor(2 * math.log(2)))
    # Logits far past where a sigmoid saturates stay finite.
    assert torch.isfinite(discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


@pytest.fixture(scope="module")
def unet_loss() -> PerceptualLoss:
    return PerceptualLoss(VesselUNetFeatures(), feature_scale=1.0)


def vessel_photo(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth orange fundus-like image without and with a dark 3-px line across it (a vessel)."""
    rows, cols = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    background = torch.tensor([0.75, 0.4, 0.2])[:, None, None] * (0.8 + 0.2 * torch.sin(6 * rows + 4 * cols))
    with_vessel = background.clone()
    with_vessel[:, size // 2 - 1 : size // 2 + 2, 6:-6] *= 0.6
    return background[None], with_vessel[None]


def test_vessel_unet_features_are_frozen_but_pass_gradient_to_the_image(unet_loss: PerceptualLoss) -> None:
    assert not any(p.requires_grad for p in unet_loss.parameters())
    assert not unet_loss.feature_extractor.segmenter.training
    restored, target = vessel_photo(32)
    restored.requires_grad_(True)
    unet_loss(restored, target).backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0


def test_vessel_unet_features_are_the_encoder_levels_and_the_logits(unet_loss: PerceptualLoss) -> None:
    image = torch.rand(1, 3, 36, 44)  # not a multiple of the pooling factor 8: the padding is cropped off
    features = unet_loss.feature_extractor(image)
    shapes = [tuple(f.shape[1:]) for f in features]
    assert shapes == [(16, 36, 44), (32, 18, 22), (64, 9, 11), (128, 5, 6), (1, 36, 44)]
    segmenter = unet_loss.feature_extractor.segmenter
    assert isinstance(segmenter, VesselUNet)
    torch.testing.assert_close(features[-1], segmenter(image))  # the logits forward gives


def test_vessel_unet_loss_sees_a_removed_vessel_more_than_noise_of_its_energy(unet_loss: PerceptualLoss) -> None:
    without_vessel, with_vessel = vessel_photo()
    assert unet_loss(with_vessel, with_vessel) == 0
    removal = without_vessel - with_vessel
    noise = torch.randn(with_vessel.shape, generator=torch.Generator().manual_seed(0))
    noisy = with_vessel + noise * removal.norm() / noise.norm()
    pixel_mse = nn.functional.mse_loss
    torch.testing.assert_close(pixel_mse(noisy, with_vessel), pixel_mse(without_vessel, with_vessel))
    # Measured 1.00 against 0.17, 4.7-6.1 times over noise seeds (ridge features: 2.5-2.7 times).
    assert unet_loss(without_vessel, with_vessel) > 3 * unet_loss(noisy, with_vessel)


def test_the_pixel_term_is_the_restorations_criterion_vessel_weights_included() -> None:
    hr = torch.full((1, 3, 32, 32), 0.6)
    hr[:, :, 15:17, 4:28] = 0.3  # a vessel, which vessel_weight > 0 weights up
    sr = hr + 0.05 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    criterion = ChannelWeightedMSE(GREEN_WEIGHTS, vessel_weight=4.0)
    loss = generator_loss(sr, hr, torch.zeros(1), pixel_loss=criterion)
    torch.testing.assert_close(loss.pixel, criterion(sr, hr))
    assert not torch.isclose(loss.pixel, channel_weighted_mse(sr, hr, GREEN_WEIGHTS))
