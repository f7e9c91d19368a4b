from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from fundus_restore.degrade import (
    KERNELS, add_gaussian_noise, bicubic_upsample, degrade_for_protocol, downsample, estimate_noise_sigma, quantize,
)


@pytest.fixture(scope="module")
def retina_crop() -> np.ndarray:
    """An 8-bit fundus crop with vessels, 240×312×3 (both divisible by 2, 3 and 4)."""
    return data.retina()[400:640, 500:812]


def test_noise_is_reproducible_and_documented() -> None:
    image = np.full((16, 24, 3), 0.5, dtype=np.float32)
    noisy = add_gaussian_noise(image, 25.0, seed=7)
    assert noisy.dtype == np.float32
    np.testing.assert_array_equal(noisy, add_gaussian_noise(image, 25.0, seed=7))
    # The documented recipe, so evaluation is reproducible anywhere.
    expected = image + np.random.default_rng(7).standard_normal(image.shape, dtype=np.float32) * np.float32(25 / 255)
    np.testing.assert_array_equal(noisy, expected)
    assert not np.array_equal(noisy, add_gaussian_noise(image, 25.0, seed=8))


def test_generator_is_advanced() -> None:
    image = np.zeros((8, 8), dtype=np.float32)
    rng = np.random.default_rng(3)
    first, second = add_gaussian_noise(image, seed=rng), add_gaussian_noise(image, seed=rng)
    assert not np.array_equal(first, second)


@pytest.mark.parametrize("sigma", [5.0, 25.0, 50.0])
def test_noise_std_matches_sigma(sigma: float) -> None:
    flat = np.full((256, 256, 3), 0.5, dtype=np.float32)
    noise = add_gaussian_noise(flat, sigma, seed=0) - flat
    assert abs(noise.mean()) < 1e-3
    assert noise.std() == pytest.approx(sigma / 255, rel=0.01)


def test_clip_keeps_range() -> None:
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    unclipped = add_gaussian_noise(image, 50.0, seed=0)
    assert unclipped.min() < 0 and unclipped.max() > 1
    clipped = add_gaussian_noise(image, 50.0, seed=0, clip=True)
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    np.testing.assert_array_equal(clipped, np.clip(unclipped, 0, 1))


@pytest.mark.parametrize("bits", [1, 4, 8, 16])
def test_quantize_levels(bits: int) -> None:
    image = np.random.default_rng(0).uniform(-0.2, 1.2, (50, 60)).astype(np.float32)
    quantized = quantize(image, bits)
    top = 2**bits - 1
    levels = quantized * top
    assert quantized.dtype == np.float32
    assert quantized.min() >= 0 and quantized.max() <= 1
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    np.testing.assert_allclose(quantized, np.clip(image, 0, 1), atol=0.5 / top + 1e-6)
    np.testing.assert_array_equal(quantize(quantized, bits), quantized)


def test_quantize_rejects_bad_bits() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(np.zeros(3), 0)


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_downsample_agrees_with_pillow(retina_crop: np.ndarray, factor: int) -> None:
    image = retina_crop.astype(np.float32) / 255
    small = downsample(image, factor)
    height, width = 240 // factor, 312 // factor
    assert small.shape == (height, width, 3) and small.dtype == np.float32
    # Pillow's BICUBIC is the same antialiased a=-0.5 kernel but renormalises at the
    # borders where MATLAB mirrors: identical inside, close at the edge.
    pillow_float = np.stack(
        [np.asarray(Image.fromarray(image[..., c], "F").resize((width, height), Image.BICUBIC)) for c in range(3)], axis=-1
    )
    np.testing.assert_allclose(small[3:-3, 3:-3], pillow_float[3:-3, 3:-3], atol=1e-5)
    assert np.abs(small - pillow_float).max() < 0.02
    pillow_8bit = np.asarray(Image.fromarray(retina_crop).resize((width, height), Image.BICUBIC)).astype(np.float32)
    assert np.abs(np.round(np.clip(small, 0, 1) * 255) - pillow_8bit)[3:-3, 3:-3].max() <= 1


def test_upsample_agrees_with_pillow(retina_crop: np.ndarray) -> None:
    small = retina_crop[::4, ::4, 1].astype(np.float32) / 255
    large = bicubic_upsample(small, 4)
    assert large.shape == (240, 312)
    pillow = np.asarray(Image.fromarray(small, "F").resize((312, 240), Image.BICUBIC))
    np.testing.assert_allclose(large[8:-8, 8:-8], pillow[8:-8, 8:-8], atol=1e-5)


def test_sizes_not_divisible_are_cropped_first() -> None:
    image = np.random.default_rng(0).random((103, 98, 3)).astype(np.float32)
    small = downsample(image, 4)
    assert small.shape == (25, 24, 3)
    np.testing.assert_array_equal(small, downsample(image[:100, :96], 4))
    assert bicubic_upsample(small, 4).shape == (100, 96, 3)


def test_box_kernel_averages_blocks_and_every_kernel_keeps_a_constant() -> None:
    image = np.random.default_rng(0).random((24, 36, 3)).astype(np.float32)
    blocks = image.reshape(6, 4, 9, 4, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(downsample(image, 4, "box"), blocks, atol=1e-6)
    constant = np.full((32, 32), 0.6, dtype=np.float32)
    for kernel in KERNELS:
        np.testing.assert_allclose(downsample(constant, 4, kernel), 0.6, atol=1e-6)
    # The kernels differ where it matters, at edges: an upscaler trained on all sees each.
    edge = np.zeros((32, 32), dtype=np.float32)
    edge[:, 15:] = 1
    rows = {kernel: downsample(edge, 4, kernel)[4] for kernel in KERNELS}
    assert len({tuple(np.round(row, 4)) for row in rows.values()}) == len(KERNELS)
    with pytest.raises(ValueError, match="unknown resampling kernel 'nearest'"):
        downsample(image, 4, "nearest")


def test_constant_survives_down_and_up() -> None:
    constant = np.full((64, 48, 3), 0.37, dtype=np.float32)
    small = downsample(constant, 4)
    np.testing.assert_allclose(small, 0.37, atol=1e-6)
    np.testing.assert_allclose(bicubic_upsample(small, 4), 0.37, atol=1e-6)


def test_grey_and_factor_one() -> None:
    grey = np.random.default_rng(0).random((12, 16)).astype(np.float32)
    assert downsample(grey, 2).shape == (6, 8)
    np.testing.assert_allclose(downsample(grey, 1), grey, atol=1e-6)


def test_bad_factor_or_tiny_image() -> None:
    with pytest.raises(ValueError, match="factor"):
        downsample(np.zeros((8, 8)), 0)
    with pytest.raises(ValueError, match="factor"):
        bicubic_upsample(np.zeros((8, 8)), 2.5)
    with pytest.raises(ValueError, match="smaller than the factor"):
        downsample(np.zeros((3, 8)), 4)


def test_protocols_differ_only_by_clipping_and_quantisation() -> None:
    clean = np.linspace(0, 1, 32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3)
    paper = degrade_for_protocol(clean, 25, "paper", seed=3)
    camera = degrade_for_protocol(clean, 25, "camera", seed=3)
    np.testing.assert_array_equal(paper, add_gaussian_noise(clean, 25, seed=3))
    assert paper.min() < 0 and camera.min() >= 0 and camera.max() <= 1
    np.testing.assert_allclose(camera, np.round(np.clip(paper, 0, 1) * 255) / 255, atol=1e-6)
    with pytest.raises(ValueError, match="protocol"):
        degrade_for_protocol(clean, 25, "phone", seed=0)


@pytest.mark.parametrize("sigma", [5.0, 15.0, 25.0, 50.0])
def test_noise_estimate_finds_the_sigma_on_a_retina(retina_crop: np.ndarray, sigma: float) -> None:
    noisy = add_gaussian_noise(retina_crop / np.float32(255), sigma, seed=1)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.03)
    # The same on the first axis, and on one grey channel.
    assert estimate_noise_sigma(np.moveaxis(noisy, -1, 0), channel_axis=0) == estimate_noise_sigma(noisy)
    assert estimate_noise_sigma(noisy[..., 1], channel_axis=None) == pytest.approx(sigma, rel=0.05)


def test_noise_estimate_of_a_clean_8bit_photo_is_small(retina_crop: np.ndarray) -> None:
    assert estimate_noise_sigma(retina_crop / np.float32(255)) < 2.0


def test_noise_estimate_leaves_out_the_clipped_surround() -> None:
    # A fundus-like image: a grey disc on black, camera noise (clipped at 0) everywhere.
    rows, cols = np.mgrid[:200, :200]
    disc = (rows - 100) ** 2 + (cols - 100) ** 2 < 70**2
    noisy = degrade_for_protocol(np.where(disc, 0.5, 0.0)[..., None].repeat(3, -1), 20.0, "camera", seed=0)
    assert _pooled_haar_estimate(noisy) < 15  # the clipped surround pulls a plain estimate down
    assert estimate_noise_sigma(noisy) == pytest.approx(20.0, rel=0.03)
    assert estimate_noise_sigma(noisy, disc) == pytest.approx(20.0, rel=0.03)


@pytest.mark.parametrize("sigma", [5.0, 10.0, 25.0, 50.0])
def test_noise_estimate_reads_clipped_8bit_noise_on_a_retina(retina_crop: np.ndarray, sigma: float) -> None:
    # Rounded to grey levels, and its blue channel (mean 0.25) clipped at 0 wherever the
    # noise reaches below it: a plain estimate reads 43.7 at sigma 50.
    noisy = degrade_for_protocol(retina_crop / np.float32(255), sigma, "camera", seed=1)
    assert estimate_noise_sigma(noisy) == pytest.approx(sigma, rel=0.02)
    if sigma == 50.0:
        assert _pooled_haar_estimate(noisy) < 0.9 * sigma


def test_noise_estimate_of_a_black_frame_keeps_the_plain_estimate() -> None:
    # No block lies two sigma away from 0, so none is left to correct it with: the plain
    # (low) estimate is returned rather than nothing.
    noisy = degrade_for_protocol(np.zeros((64, 64, 3), np.float32), 25.0, "camera", seed=0)
    assert estimate_noise_sigma(noisy) == pytest.approx(_pooled_haar_estimate(noisy), rel=0.05)
    assert estimate_noise_sigma(noisy) < 15


def _pooled_haar_estimate(image: np.ndarray) -> float:
    """Donoho's estimate over every block, blind to clipping: what the estimate improves on."""
    height, width = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    a, b, c, d = (image[row:height:2, column:width:2] for row in (0, 1) for column in (0, 1))
    return float(np.median(np.abs(a - b - c + d) / 2) / 0.6745 * 255)


def test_noise_estimate_of_a_tiny_8bit_image_is_finite() -> None:
    # Two blocks whose details are 2 and 6 half-levels: the median, 4, lies between them
    # with no detail in its bin, and is kept as it is (it was NaN).
    image = np.zeros((2, 4), np.float32)
    image[0, 0], image[0, 2] = 2 / 255, 6 / 255
    assert estimate_noise_sigma(image, channel_axis=None) == pytest.approx(2 / 0.6745)


def test_noise_estimate_refuses_what_has_no_2x2_block() -> None:
    with pytest.raises(ValueError, match="1×5 pixels"):
        estimate_noise_sigma(np.zeros((1, 5, 3), np.float32))
    with pytest.raises(ValueError, match="no whole 2×2 block"):
        estimate_noise_sigma(np.zeros((4, 4, 3), np.float32), np.eye(4, dtype=bool))


def test_noise_estimate_names_a_grey_image_without_channel_axis_none_and_a_mask_of_another_shape() -> None:
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"expected an H×W×C \(an H×W image: channel_axis=None\) image, got shape \(32, 32\)"):
        estimate_noise_sigma(image[..., 1])
    assert estimate_noise_sigma(image[..., 1], channel_axis=None) > 0
    with pytest.raises(ValueError, match=r"mask of shape \(16, 32\) does not match the image's \(32, 32\)"):
        estimate_noise_sigma(image, np.ones((16, 32), dtype=bool))


def test_noise_estimate_and_noise_refuse_what_they_would_get_wrong() -> None:
    photo = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    # A uint8 photo (or 0-255 floats) read as [0, 1] would be estimated 255 times noisier.
    with pytest.raises(ValueError, match=r"expected a float image on the \[0, 1\] scale, got dtype uint8"):
        estimate_noise_sigma(photo)
    with pytest.raises(ValueError, match=r"image values reach 25\d: expected the \[0, 1\] scale"):
        estimate_noise_sigma(photo.astype(np.float32))
    with pytest.raises(ValueError, match=r"sigma is a standard deviation \(0-255 scale\), got nan"):
        add_gaussian_noise(photo / 255.0, float("nan"))
