from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.fov import crop_to_fov, fov_bounding_box, fov_mask
from fundus_restore.io import read_image, read_mask

DRIVE_IMAGES = [("training", f"{n:02d}_training") for n in range(21, 41)] + [("test", f"{n:02d}_test") for n in range(1, 21)]


def _disc(height: int, width: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_synthetic_disc_with_dark_edge_and_hole() -> None:
    truth = _disc(120, 150, (60, 80), 50)
    # A disc that fades to a dim left edge, with dark "vessels" and a black hole inside,
    # on a near-black noisy surround: plain Otsu would cut the dim half away.
    cols = np.mgrid[:120, :150][1]
    brightness = np.where(truth, 0.08 + 0.6 * cols / 150, 0.0)
    brightness[55:58, 40:120] *= 0.3
    brightness[70:75, 90:95] = 0.0
    image = np.clip(brightness[..., None] * [1.0, 0.5, 0.3] + np.random.default_rng(0).normal(0, 0.01, (120, 150, 3)), 0, 1)
    mask = fov_mask(image.astype(np.float32))
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.97
    assert mask[72, 92]  # the hole is filled


def test_image_without_surround_is_all_fov() -> None:
    inside = data.retina()[500:800, 500:800].astype(np.float32) / 255
    assert fov_mask(inside).all()
    assert fov_mask(np.full((8, 8), 0.5, dtype=np.float32)).all()
    # Flat but for float rounding (a 1×1 photo upscaled): too little range for Otsu's histogram.
    assert fov_mask(np.full((4, 4, 3), 0.3, dtype=np.float32) + np.float32(1e-7) * np.eye(4, dtype=np.float32)[..., None]).all()


def test_a_crop_inside_the_disc_that_holds_the_optic_disc_is_all_fov() -> None:
    # The bright optic disc (0.77) on darker retina (0.34): 2.3× apart, as a disc on its surround
    # would be, but the retina is far from black.
    image = np.full((120, 120, 3), [0.34, 0.17, 0.08], dtype=np.float32)
    image[_disc(120, 120, (60, 60), 25)] = [0.77, 0.55, 0.35]
    assert fov_mask(image).all()


def test_grey_image_works() -> None:
    truth = _disc(80, 80, (40, 40), 30)
    assert _iou(fov_mask(truth.astype(np.float32) * 0.6), truth) > 0.97


def test_bounding_box_is_a_centred_square() -> None:
    mask = np.zeros((100, 120), dtype=bool)
    mask[20:60, 30:50] = True  # 40 high, 20 wide
    assert fov_bounding_box(mask) == (20, 20, 40, 40)


def test_bounding_box_shifts_inside_and_clips_to_image() -> None:
    mask = np.zeros((100, 120), dtype=bool)
    mask[10:40, 0:20] = True  # centred square would start at column -5
    assert fov_bounding_box(mask) == (10, 0, 30, 30)
    wide = np.zeros((50, 120), dtype=bool)
    wide[:, 5:115] = True  # a disc cut by the top and bottom border, as in HEI-MED
    assert fov_bounding_box(wide) == (0, 5, 50, 110)


def test_bounding_box_rejects_empty_mask() -> None:
    with pytest.raises(ValueError, match="empty"):
        fov_bounding_box(np.zeros((4, 4), dtype=bool))


def test_crop_to_fov_removes_the_background() -> None:
    truth = _disc(100, 140, (50, 70), 40)  # rows 10..90, columns 30..110
    image = truth[..., None] * np.float32([0.7, 0.4, 0.2])
    cropped, mask = crop_to_fov(image, truth)
    np.testing.assert_array_equal(cropped, image[10:91, 30:111])
    np.testing.assert_array_equal(mask, truth[10:91, 30:111])
    detected, detected_mask = crop_to_fov(image)
    # The detected disc may lose its one-pixel tips to the median filter.
    assert 79 <= detected.shape[0] == detected.shape[1] <= 81 and detected_mask.shape == detected.shape[:2]
    assert detected_mask.mean() > 0.75
    with pytest.raises(ValueError, match="does not match"):
        crop_to_fov(image, truth[:-1])


def test_skimage_retina() -> None:
    image = data.retina().astype(np.float32) / 255
    mask = fov_mask(image)
    truth = _disc(*mask.shape, centre=((mask.shape[0] - 1) / 2, (mask.shape[1] - 1) / 2), radius=0.49 * mask.shape[0])
    assert _iou(mask, truth) > 0.95
    assert not mask[:20, :20].any()


@pytest.mark.filterwarnings("error")  # no logarithm of a negative surround
def test_unclipped_noise_below_zero_finds_the_same_field_of_view() -> None:
    image = data.retina().astype(np.float32) / 255
    noisy = add_gaussian_noise(image, 25, seed=0)  # the paper's protocol: not clipped
    assert noisy.min() < 0
    assert _iou(fov_mask(noisy), fov_mask(image)) > 0.99


@pytest.mark.shared
@pytest.mark.parametrize("split,name", DRIVE_IMAGES)
def test_matches_drive_masks(drive_dir: Path, split: str, name: str) -> None:
    image = read_image(drive_dir / split / "images" / f"{name}.tif")
    truth = read_mask(drive_dir / split / "mask" / f"{name}_mask.gif")
    assert _iou(fov_mask(image), truth) >= 0.97


@pytest.mark.shared
@pytest.mark.parametrize("sigma", [25, 50])
def test_noisy_drive_image(drive_dir: Path, sigma: float) -> None:
    image = add_gaussian_noise(read_image(drive_dir / "test" / "images" / "01_test.tif"), sigma, seed=1, clip=True)
    truth = read_mask(drive_dir / "test" / "mask" / "01_test_mask.gif")
    assert _iou(fov_mask(image), truth) >= 0.97


@pytest.mark.shared
def test_heimed_disc(heimed_dir: Path) -> None:
    image = read_image(heimed_dir / "(00000053).jpg")
    mask = fov_mask(image)
    height, width = mask.shape
    # The disc fills the frame's width and is cut at top and bottom; the corners are black.
    assert 0.8 < mask.mean() < 0.9
    assert mask[height // 2].mean() > 0.98 and mask[:, width // 2].all()
    assert not (mask[:40, :40].any() or mask[-40:, -40:].any())
    cropped, _ = crop_to_fov(image, mask)
    assert cropped.shape[0] == height and cropped.shape[1] >= 0.99 * width


def test_channels_first_or_nan_images_are_refused() -> None:
    photo = np.zeros((40, 50, 3), np.float32)
    with pytest.raises(ValueError, match=r"got shape \(3, 40, 50\) \(channels first\? move them last\)"):
        fov_mask(photo.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fov_mask(np.full((40, 50, 3), np.nan, np.float32))
