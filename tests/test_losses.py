from __future__ import annotations

import pytest
import torch

from fundus_restore.losses import ChannelWeightedMSE, channel_weighted_mse


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 8, 9, generator=generator), torch.rand(2, 3, 8, 9, generator=generator)


def test_equal_weights_give_plain_mse() -> None:
    restored, target = _pair()
    plain = torch.nn.functional.mse_loss(restored, target)
    torch.testing.assert_close(channel_weighted_mse(restored, target, (1.0, 1.0, 1.0)), plain, rtol=1e-6, atol=0)
    # Only the ratios matter: 5:5:5 is the same loss.
    torch.testing.assert_close(channel_weighted_mse(restored, target, (5.0, 5.0, 5.0)), plain, rtol=1e-6, atol=0)


def test_weights_follow_equation_1() -> None:
    restored, target = _pair(1)
    per_channel = ((restored - target) ** 2).mean(dim=(0, 2, 3))
    expected = (1 * per_channel[0] + 3 * per_channel[1] + 2 * per_channel[2]) / 6
    torch.testing.assert_close(channel_weighted_mse(restored, target), expected)


def test_error_in_green_costs_more_than_the_same_error_in_red() -> None:
    target = torch.zeros(1, 3, 4, 4)
    red_error, green_error = target.clone(), target.clone()
    red_error[:, 0] = 0.1
    green_error[:, 1] = 0.1
    assert channel_weighted_mse(green_error, target) == pytest.approx(3 * channel_weighted_mse(red_error, target).item())


def test_mask_limits_the_mean_to_marked_pixels() -> None:
    restored, target = _pair(2)
    mask = torch.zeros(2, 1, 8, 9, dtype=torch.bool)
    mask[:, :, 2:6, 3:7] = True
    inside = channel_weighted_mse(restored[..., 2:6, 3:7], target[..., 2:6, 3:7], (1, 3, 2))
    torch.testing.assert_close(channel_weighted_mse(restored, target, (1, 3, 2), mask=mask), inside)
    empty = torch.zeros_like(mask)
    assert channel_weighted_mse(restored, target, mask=empty).item() == 0.0
    # Float weights give a weighted mean whatever their total: a uniform weight is the plain loss.
    for weight in (1e-3, 1.0, 7.0):
        uniform = torch.full((2, 1, 8, 9), weight)
        torch.testing.assert_close(channel_weighted_mse(restored, target, (1, 3, 2), mask=uniform),
                                   channel_weighted_mse(restored, target, (1, 3, 2)))


def test_module_calls_the_function_and_backpropagates() -> None:
    restored, target = _pair(3)
    restored.requires_grad_(True)
    loss = ChannelWeightedMSE((1.0, 3.0, 2.0))(restored, target)
    torch.testing.assert_close(loss, channel_weighted_mse(restored, target, (1.0, 3.0, 2.0)))
    loss.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0


@pytest.mark.parametrize("weights", [(1.0, 2.0), (1.0, -1.0, 1.0), (0.0, 0.0, 0.0), (1.0, float("nan"), 1.0)])
def test_bad_weights_are_refused(weights: tuple[float, ...]) -> None:
    restored, target = _pair()
    with pytest.raises(ValueError, match="weights"):
        channel_weighted_mse(restored, target, weights)
    if len(weights) == 3:
        with pytest.raises(ValueError, match="weights"):
            ChannelWeightedMSE(weights)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="N×C×H×W"):
        channel_weighted_mse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))


def test_vessel_segmentation_loss_rewards_confident_right_maps_and_module_agrees() -> None:
    from fundus_restore.losses import VesselSegmentationLoss, vessel_segmentation_loss

    target = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.15).float()
    right, wrong = (target * 2 - 1) * 8, (1 - target * 2) * 8
    assert vessel_segmentation_loss(right, target) < 0.01 < 1.0 < vessel_segmentation_loss(wrong, target)
    unsure = torch.zeros_like(target)
    assert torch.equal(VesselSegmentationLoss(0.5)(unsure, target), vessel_segmentation_loss(unsure, target, 0.5))


def test_vessel_weight_counts_errors_on_vessels_more() -> None:
    from fundus_restore.losses import ChannelWeightedMSE

    target = torch.full((1, 3, 48, 48), 0.6)
    target[..., 23:26] = 0.4  # a dark vertical vessel, 3 px wide
    on_vessel, off_vessel = target.clone(), target.clone()
    on_vessel[..., 20:30, 23:26] += 0.1
    off_vessel[..., 20:30, 5:8] += 0.1
    plain, weighted = ChannelWeightedMSE((1, 3, 2)), ChannelWeightedMSE((1, 3, 2), vessel_weight=4.0)
    torch.testing.assert_close(plain(on_vessel, target), plain(off_vessel, target))
    assert weighted(on_vessel, target) > 2 * weighted(off_vessel, target)
    assert torch.equal(ChannelWeightedMSE((1, 3, 2), vessel_weight=0.0)(on_vessel, target), plain(on_vessel, target))


def test_vessel_weight_works_on_grey_images_as_on_their_green_channel() -> None:
    from fundus_restore.losses import ChannelWeightedMSE

    target = torch.full((1, 3, 48, 48), 0.6)
    target[..., 23:26] = 0.4
    restored = target + 0.05 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    grey, colour = ChannelWeightedMSE((1,), vessel_weight=4.0), ChannelWeightedMSE((0, 1, 0), vessel_weight=4.0)
    torch.testing.assert_close(grey(restored[:, 1:2], target[:, 1:2]), colour(restored, target))
    with pytest.raises(ValueError, match=r"N×3×H×W colour or N×1×H×W grey images, got shape \(1, 2, 48, 48\)"):
        ChannelWeightedMSE((1, 1), vessel_weight=4.0)(restored[:, :2], target[:, :2])
