from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import structural_similarity

from fundus_restore.degrade import downsample, bicubic_upsample
from fundus_restore.metrics import band_mse, band_psnr, image_quality, psnr, ssim, ssim_map


@pytest.fixture(scope="module")
def retina_pair() -> tuple[np.ndarray, np.ndarray]:
    """A real fundus crop and a noisy, 8-bit quantised copy of it (float64, [0, 1])."""
    reference = data.retina()[450:578, 520:680].astype(np.float64) / 255
    noisy = reference + np.random.default_rng(0).normal(0, 20 / 255, reference.shape)
    return reference, np.round(np.clip(noisy, 0, 1) * 255) / 255


def _skimage_ssim(reference: np.ndarray, restored: np.ndarray, gaussian_weights: bool) -> float:
    return structural_similarity(
        reference,
        restored,
        channel_axis=-1 if reference.ndim == 3 else None,
        data_range=1.0,
        gaussian_weights=gaussian_weights,
        sigma=1.5,
        use_sample_covariance=False,
    )


def test_psnr_of_constant_offset() -> None:
    reference = np.random.default_rng(0).random((20, 30, 3))
    assert psnr(reference, reference + 0.1) == pytest.approx(20.0)
    assert psnr(reference, reference - 0.01) == pytest.approx(40.0)
    assert psnr(reference, reference + 10, data_range=100.0) == pytest.approx(20.0)
    assert psnr(reference, reference) == np.inf


def test_psnr_is_the_255_peak_formula_on_8_bit_data() -> None:
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 256, (40, 50, 3))
    noisy = np.clip(clean + rng.integers(-30, 31, clean.shape), 0, 255)
    paper = 10 * np.log10(255**2 / np.mean((clean - noisy) ** 2.0))
    assert psnr(clean / 255, noisy / 255) == pytest.approx(paper, abs=1e-9)


def test_psnr_per_channel_and_mask() -> None:
    reference = np.zeros((10, 12, 3))
    restored = reference + [0.1, 0.01, 0.001]
    np.testing.assert_allclose(psnr(reference, restored, per_channel=True), [20, 40, 60])
    # The overall PSNR pools the MSE of all channels (not the mean of channel PSNRs).
    assert psnr(reference, restored) == pytest.approx(10 * np.log10(3 / (0.1**2 + 0.01**2 + 0.001**2)))
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    restored[~mask] += 0.5  # errors outside the mask must not count
    np.testing.assert_allclose(psnr(reference, restored, mask=mask, per_channel=True), [20, 40, 60])


def test_band_psnr_splits_the_error_at_the_cutoff(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = retina_pair
    below, above = band_psnr(reference, noisy, 1 / 8)
    # The two bands' squared errors add up to the whole image's.
    assert 10 ** (-below / 10) + 10 ** (-above / 10) == pytest.approx(10 ** (-psnr(reference, noisy) / 10))
    # White noise spreads evenly: the band below 1/8 holds (2 * 1/8)² of its energy.
    assert below - above == pytest.approx(10 * np.log10(1 / 0.25**2 - 1), abs=0.3)
    rows, columns = np.meshgrid(np.arange(64), np.arange(48), indexing="ij")
    slow = 0.1 * np.cos(np.pi * 5 * (rows + 0.5) / 64)  # DCT frequency 5 / 128 cycles per pixel
    fast = 0.1 * np.cos(np.pi * 30 * (columns + 0.5) / 48)  # 30 / 96
    flat = np.full((64, 48), 0.5)
    assert band_psnr(flat, flat + slow, 1 / 8)[1] > 200 > band_psnr(flat, flat + slow, 1 / 8)[0]
    assert band_psnr(flat, flat + fast, 1 / 8)[0] > 200 > band_psnr(flat, flat + fast, 1 / 8)[1]
    assert band_psnr(flat, flat + fast, 1 / 8)[1] == pytest.approx(psnr(flat, flat + fast))
    with pytest.raises(ValueError, match="cutoff"):
        band_psnr(flat, flat, 0.5)


def test_band_mse_puts_each_frequency_in_its_ring(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = retina_pair
    edges = [0, 1 / 16, 1 / 8, 1 / 4, 0.5]
    bands = band_mse(reference, noisy, edges)
    assert bands.shape == (4,)
    assert bands.sum() == pytest.approx(np.mean((reference - noisy) ** 2))
    # The two-band split is the same computation.
    below, above = band_psnr(reference, noisy, 1 / 8)
    assert 10 ** (-below / 10) == pytest.approx(bands[:2].sum())
    rows = np.arange(64)[:, None] * np.ones((1, 48))
    ripple = 0.1 * np.cos(np.pi * 20 * (rows + 0.5) / 64)  # 20 / 128 cycles per pixel, in [1/8, 1/4)
    flat = np.full((64, 48), 0.5)
    energy = band_mse(flat, flat + ripple, edges)
    assert energy[2] == pytest.approx(np.mean(ripple**2))
    assert energy[[0, 1, 3]].max() < 1e-20
    for bad in ([0.1, 0.5], [0, 0.3, 0.2, 0.5], [0, 0.25]):
        with pytest.raises(ValueError, match="edges"):
            band_mse(flat, flat, bad)


def test_band_psnr_bounds_an_upscaler_that_invents_nothing() -> None:
    """Bicubic ×4 is accurate below the small image's Nyquist frequency, and against the
    reference's own content above it (the bound for a method that invents nothing) it
    does no better."""
    reference = data.retina()[400:656, 480:736].astype(np.float64) / 255
    upscaled = bicubic_upsample(downsample(reference, 4), 4)
    below, above = band_psnr(reference, upscaled, 1 / 8)
    bound = band_psnr(reference, np.zeros_like(reference), 1 / 8)[1]
    assert below > above + 3
    assert above == pytest.approx(bound, abs=0.5)


@pytest.mark.parametrize("gaussian_weights", [True, False])
def test_ssim_matches_skimage_on_random_images(gaussian_weights: bool) -> None:
    rng = np.random.default_rng(2)
    reference = rng.random((48, 56, 3))
    restored = np.clip(reference + rng.normal(0, 0.2, reference.shape), 0, 1)
    expected = _skimage_ssim(reference, restored, gaussian_weights)
    assert ssim(reference, restored, gaussian_weights=gaussian_weights) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("gaussian_weights", [True, False])
def test_ssim_matches_skimage_on_a_fundus(retina_pair: tuple[np.ndarray, np.ndarray], gaussian_weights: bool) -> None:
    reference, noisy = retina_pair
    expected = _skimage_ssim(reference, noisy, gaussian_weights)
    assert ssim(reference, noisy, gaussian_weights=gaussian_weights) == pytest.approx(expected, abs=1e-4)
    per_channel = ssim(reference, noisy, gaussian_weights=gaussian_weights, per_channel=True)
    expected_channels = [_skimage_ssim(reference[..., c], noisy[..., c], gaussian_weights) for c in range(3)]
    np.testing.assert_allclose(per_channel, expected_channels, atol=1e-4)


def test_ssim_of_float32_grey_images(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = (image[..., 1].astype(np.float32) for image in retina_pair)
    assert ssim(reference, noisy) == pytest.approx(_skimage_ssim(reference, noisy, True), abs=1e-4)


def test_ssim_of_identical_images_is_one(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, _ = retina_pair
    assert ssim(reference, reference) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(ssim(reference, reference, per_channel=True), 1.0, atol=1e-12)


def test_masked_ssim(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = retina_pair
    full = np.ones(reference.shape[:2], dtype=bool)
    assert ssim(reference, noisy, mask=full) == pytest.approx(ssim(reference, noisy), abs=1e-12)
    # Damage outside a central mask: the masked SSIM (with the window border) must not see it.
    mask = np.zeros_like(full)
    mask[40:90, 50:110] = True
    damaged = noisy.copy()
    grown = np.zeros_like(full)
    grown[35:95, 45:115] = True  # the mask plus the window radius (5)
    damaged[~grown] = 0.0
    assert ssim(reference, damaged, mask=mask) == pytest.approx(ssim(reference, noisy, mask=mask), abs=1e-12)
    assert ssim(reference, damaged) < ssim(reference, noisy) - 0.05
    with pytest.raises(ValueError, match="selects no pixel"):
        ssim(reference, noisy, mask=np.pad(np.ones((3, 3), dtype=bool), ((0, 125), (0, 157))))


def test_ssim_map_core_is_differentiable_and_batched() -> None:
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.random((2, 3, 32, 40)), dtype=torch.float32)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    values = ssim_map(x, y)
    assert values.shape == (2, 3, 22, 30)
    (1 - values.mean()).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    second = ssim(x[1].permute(1, 2, 0).numpy(), y[1].detach().permute(1, 2, 0).numpy())
    assert float(values[1].detach().mean()) == pytest.approx(second, abs=1e-5)


def test_shape_mismatch_and_tiny_images_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="mask shape"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), mask=np.ones((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
    # NaN would spread into a mean over photos that no longer says it lost one.
    with pytest.raises(ValueError, match="the restored contains NaN or infinite values"):
        psnr(np.zeros((4, 4, 3)), np.full((4, 4, 3), np.nan))
    with pytest.raises(ValueError, match="sigma must be positive, got 0"):  # it said "win_size must be odd"
        ssim(np.zeros((16, 16)), np.zeros((16, 16)), sigma=0)
    with pytest.raises(ValueError, match="data_range must be positive, got 0"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)), data_range=0)


def test_image_quality_keys_and_values(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = retina_pair
    mask = np.zeros(reference.shape[:2], dtype=bool)
    mask[20:100, 30:130] = True
    quality = image_quality(reference, noisy, mask=mask)
    names = ["psnr", "ssim"] + [f"{metric}_{c}" for metric in ("psnr", "ssim") for c in "rgb"]
    assert set(quality) == set(names) | {name.replace(name[:4], name[:4] + "_fov", 1) for name in names}
    assert all(isinstance(value, float) for value in quality.values())
    assert quality["psnr"] == pytest.approx(psnr(reference, noisy))
    assert quality["ssim"] == pytest.approx(ssim(reference, noisy))
    assert quality["psnr_fov"] == pytest.approx(psnr(reference, noisy, mask=mask))
    assert quality["ssim_fov"] == pytest.approx(ssim(reference, noisy, mask=mask))
    for index, channel in enumerate("rgb"):
        assert quality[f"psnr_{channel}"] == pytest.approx(psnr(reference, noisy, per_channel=True)[index])
        assert quality[f"ssim_fov_{channel}"] == pytest.approx(ssim(reference, noisy, mask=mask, per_channel=True)[index])
    assert set(image_quality(reference, noisy)) == set(names)
    assert set(image_quality(reference[..., 0], noisy[..., 0])) == {"psnr", "ssim"}


def test_metrics_take_channels_on_any_axis(retina_pair: tuple[np.ndarray, np.ndarray]) -> None:
    reference, noisy = retina_pair
    first = (reference.transpose(2, 0, 1), noisy.transpose(2, 0, 1))
    mask = np.zeros(reference.shape[:2], bool)
    mask[10:100, 20:120] = True
    assert psnr(*first, channel_axis=0, mask=mask) == psnr(reference, noisy, mask=mask)
    np.testing.assert_array_equal(
        ssim(*first, channel_axis=0, per_channel=True), ssim(reference, noisy, per_channel=True)
    )
    assert band_psnr(*first, 1 / 8, channel_axis=0) == band_psnr(reference, noisy, 1 / 8)
    assert image_quality(*first, channel_axis=0, mask=mask) == image_quality(reference, noisy, mask=mask)
    # An H×W image is grey whatever the axis says; channel_axis=None is for it alone.
    grey = (reference[..., 1], noisy[..., 1])
    assert psnr(*grey, channel_axis=None) == psnr(*grey) == psnr(reference[..., 1:2], noisy[..., 1:2])
    with pytest.raises(ValueError, match="channel_axis=None"):
        psnr(reference, noisy, channel_axis=None)


def test_a_soft_mask_is_refused_not_read_as_every_pixel_above_zero() -> None:
    from fundus_restore.degrade import estimate_noise_sigma
    from fundus_restore.vessel_metrics import dice

    rng = np.random.default_rng(1)
    clean = rng.random((64, 64, 3)).astype(np.float32)
    noisy = np.clip(clean + 0.05 * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    weights = np.full((64, 64), 0.01)
    weights[16:48, 16:48] = 1.0
    soft = r"the mask holds values other than 0 and 1 \(e\.g\. 0\.01\): threshold a soft mask first \(mask > 0\.5\)"
    for measure in (psnr, ssim, estimate_noise_sigma):
        with pytest.raises(ValueError, match=soft):
            measure(clean, noisy, mask=weights) if measure is not estimate_noise_sigma else measure(noisy, weights)
    with pytest.raises(ValueError, match=r"the truth holds values other than 0 and 1"):
        dice(weights > 0.5, weights)
    # 0/1 numbers are a mask like bools, and so are an 8-bit file's 0/255.
    for levels in ((weights > 0.5).astype(np.uint8), (weights > 0.5).astype(np.float32), (weights > 0.5) * np.uint8(255)):
        assert psnr(clean, noisy, mask=levels) == psnr(clean, noisy, mask=weights > 0.5)
    with pytest.raises(ValueError, match=r"the mask holds more than two levels \(e\.g\. 0, 128 and 255\)"):
        psnr(clean, noisy, mask=np.where(weights > 0.5, 255, 128) * (np.arange(64) > 8)[:, None])
