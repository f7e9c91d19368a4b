"""CBM3D as a model: the function, the module, loading it by name and running it through ``denoise``.

Its outputs are compared within 2e-4: the bm3d package sums in parallel, in no fixed order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from fundus_restore import denoise, load_model
from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.inference import estimated_noise_level
from fundus_restore.metrics import psnr
from fundus_restore.models.cbm3d import CBM3D, MIN_SIDE, cbm3d


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return data.retina()[460:556, 520:616].astype(np.float32) / 255


@pytest.mark.parametrize("channels", [3, 1])
def test_cbm3d_removes_most_of_the_noise(clean: np.ndarray, channels: int):
    image = clean if channels == 3 else clean[..., 1:2]
    noisy = add_gaussian_noise(image, 25, seed=0)
    restored = cbm3d(noisy, 25 / 255)
    assert restored.shape == image.shape and restored.dtype == np.float32
    assert psnr(restored, image) > psnr(noisy, image) + 8


def test_cbm3d_takes_grey_stored_as_rgb_and_constant_colour_channels(clean: np.ndarray):
    # bm3d_rgb divides each opponent colour channel by its range over the image: NaN here.
    grey = add_gaussian_noise(clean[..., 1:2], 25, seed=5)
    as_rgb = cbm3d(np.repeat(grey, 3, axis=2), 25 / 255)
    # Equal but for float rounding: bm3d's threads may sum in another order on a loaded machine (3e-7 seen).
    np.testing.assert_allclose(as_rgb, np.repeat(cbm3d(grey, 25 / 255), 3, axis=2), rtol=0, atol=1e-6)
    flat = np.broadcast_to(np.float32([0.5, 0.3, 0.2]), (32, 32, 3))  # every opponent channel constant
    np.testing.assert_allclose(cbm3d(flat, 5 / 255), flat, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "sigma", "problem"),
    [
        ((MIN_SIDE, 8, 3), 0.1, "at least 9×9"),  # the bm3d package crashes the process on 8×8
        ((16, 16, 2), 0.1, "grey or RGB"),
        ((16, 16, 3), -0.1, "sigma >= 0"),
        ((16, 16, 3), float("nan"), "sigma >= 0"),
    ],
)
def test_cbm3d_refuses_what_bm3d_cannot_take(shape: tuple[int, int, int], sigma: float, problem: str):
    with pytest.raises(ValueError, match=problem):
        cbm3d(np.zeros(shape, np.float32), sigma)


def test_the_module_runs_each_image_of_a_batch_at_its_own_level(clean: np.ndarray):
    images = np.stack([add_gaussian_noise(clean, 10, seed=1), add_gaussian_noise(clean, 30, seed=2)])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    restored = CBM3D()(batch, torch.tensor([10 / 255, 30 / 255]))
    for index, level in enumerate((10, 30)):
        expected = cbm3d(images[index], level / 255)
        np.testing.assert_allclose(restored[index].permute(1, 2, 0).numpy(), expected, atol=2e-4)
    with pytest.raises(ValueError, match="told the noise level"):
        CBM3D()(batch)


def test_denoise_runs_it_by_name_told_the_estimated_level(clean: np.ndarray):
    model = load_model("cbm3d")
    assert (model.name, model.task, model.needs_noise_level, model.noise_range) == ("cbm3d", "denoise", True, None)
    noisy = add_gaussian_noise(clean, 20, seed=3)
    told = cbm3d(noisy, estimated_noise_level(noisy))
    np.testing.assert_allclose(denoise(noisy, "cbm3d"), told, atol=2e-4)
    # A grey H×W image stays grey, through BM3D.
    grey = denoise(noisy[..., 1], "cbm3d", sigma=20 / 255, channel_axis=None)
    np.testing.assert_allclose(grey, cbm3d(noisy[..., 1:2], 20 / 255)[..., 0], atol=2e-4)


def test_tiles_bound_its_memory_without_seams():
    # Not bitwise (CBM3D scales its colour transform by each tile's range), but tiles that
    # start on its grid of reference blocks, with its reach as overlap, leave no seam.
    clean = data.retina()[200:600, 450:570, 1:2].astype(np.float32) / 255
    noisy = add_gaussian_noise(clean, 25, seed=4)
    whole = denoise(noisy, "cbm3d", sigma=25 / 255)
    tiled = denoise(noisy, "cbm3d", sigma=25 / 255, tile=330)  # two tiles down, one across
    assert psnr(tiled, whole) > 50
    assert abs(psnr(tiled, clean) - psnr(whole, clean)) < 0.05
