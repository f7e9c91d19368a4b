"""Tests for the vessel-preservation metrics on drawn vessels of known widths, and on DRIVE."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from test_vessels import drawn_vessels, horizontal_bar, photo

from fundus_restore.io import read_image, read_mask
from fundus_restore.vessel_metrics import (
    cldice,
    contrast_retention,
    hallucinated_vessels,
    recall,
    spurious_rate,
    vessel_preservation,
)
from fundus_restore.vessels import classify_widths

KEYS = {"thin_recall", "thick_recall", "spurious_rate", "cldice", "thin_contrast_retention", "psnr_thin_band"}
WIDTHS = (1, 3, 5, 7, 9)  # two thin, three thick


@pytest.fixture(scope="module")
def vessels() -> np.ndarray:
    return drawn_vessels(WIDTHS, (200, 200))


@pytest.fixture(scope="module")
def clean(vessels: np.ndarray) -> np.ndarray:
    # Faint vessels (5% darker), as thin ones are in real photos: blur can make them vanish.
    return photo(vessels, depth=0.05)


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(image, (sigma, sigma, 0))


FOV = np.ones((200, 200), dtype=bool)


def test_identical_images_preserve_everything(clean: np.ndarray, vessels: np.ndarray) -> None:
    for expert in (None, vessels):
        scores = vessel_preservation(clean, clean, expert=expert, fov=FOV, scale=1.0)
        assert set(scores) == KEYS
        assert scores["thin_recall"] == 1.0 and scores["thick_recall"] == 1.0
        assert scores["spurious_rate"] == 0.0
        # Against the segmentation itself clDice is 1; against an expert map it also scores the segmenter.
        assert scores["cldice"] == 1.0 if expert is None else scores["cldice"] > 0.95
        assert scores["thin_contrast_retention"] == pytest.approx(1.0)
        assert scores["psnr_thin_band"] == math.inf


def test_blur_hurts_thin_vessels_more_than_thick(clean: np.ndarray, vessels: np.ndarray) -> None:
    restored = blurred(clean, 2.0)
    scores = vessel_preservation(clean, restored, expert=vessels, fov=FOV, scale=1.0)
    assert scores["thin_recall"] < scores["thick_recall"] == 1.0
    assert scores["thin_contrast_retention"] < 0.7
    thin, thick = classify_widths(vessels)
    thick_retention = contrast_retention(clean, restored, thick, vessels, FOV)
    assert scores["thin_contrast_retention"] < thick_retention - 0.2
    assert 30 < scores["psnr_thin_band"] < 60
    # More blur, fewer thin vessels found and less of their contrast kept.
    stronger = vessel_preservation(clean, blurred(clean, 3.0), expert=vessels, fov=FOV, scale=1.0)
    assert stronger["thin_recall"] < scores["thin_recall"] - 0.2
    assert stronger["thin_contrast_retention"] < scores["thin_contrast_retention"]


def test_invented_lines_raise_the_spurious_rate(clean: np.ndarray, vessels: np.ndarray) -> None:
    fake = np.zeros_like(vessels)
    # Two 3-px lines in the gaps between the drawn vessels, ≥ 10 px from any of them.
    fake[46:49, 20:170] = True
    fake[86:89, 20:170] = True
    restored = photo(vessels | fake, depth=0.05)
    scores = vessel_preservation(clean, restored, expert=vessels, fov=FOV, scale=1.0)
    assert scores["spurious_rate"] > 0.15
    assert scores["thin_recall"] == 1.0  # nothing real was lost
    assert scores["cldice"] < 0.95


def test_recall_allows_one_pixel_of_shift_and_no_more() -> None:
    reference = horizontal_bar(1)
    assert recall(reference, np.roll(reference, 1, axis=0)) == 1.0
    assert recall(reference, np.roll(reference, 1, axis=1) | np.roll(reference, 1, axis=0)) == 1.0
    assert recall(reference, np.roll(reference, 2, axis=0)) == 0.0
    assert math.isnan(recall(np.zeros_like(reference), reference))


def test_spurious_rate_counts_restored_centreline_away_from_real_vessels() -> None:
    real = horizontal_bar(3, (60, 80))
    invented = np.roll(real, 20, axis=0)
    assert spurious_rate(real, real) == 0.0
    assert spurious_rate(real | invented, real) == pytest.approx(0.5, abs=0.02)
    assert spurious_rate(np.zeros_like(real), real) == 0.0


def test_cldice_of_one_vessel_out_of_two_is_two_thirds() -> None:
    both = horizontal_bar(3, (60, 80)) | np.roll(horizontal_bar(3, (60, 80)), 20, axis=0)
    one = horizontal_bar(3, (60, 80))
    # Topology precision 1, sensitivity 1/2: harmonic mean 2/3.
    assert cldice(one, both) == pytest.approx(2 / 3, abs=0.01)
    assert cldice(both, both) == 1.0
    assert cldice(np.zeros_like(both), both) == 0.0
    assert cldice(np.zeros_like(both), np.zeros_like(both)) == 1.0  # as dice


def test_rejects_images_of_different_shapes(clean: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        vessel_preservation(clean, clean[:100])


def test_drive_image_with_noise_gives_sane_scores(drive_dir) -> None:
    clean = read_image(drive_dir / "test" / "images" / "01_test.tif")
    fov = read_mask(drive_dir / "test" / "mask" / "01_test_mask.gif")
    expert = read_mask(drive_dir / "test" / "1st_manual" / "01_manual1.gif")
    noisy = clean + np.random.default_rng(0).normal(0, 25 / 255, clean.shape).astype(np.float32)
    scores = vessel_preservation(clean, noisy, expert=expert, fov=fov)
    # Noise of sigma 25/255 everywhere: about 20.2 dB in any band.
    assert scores["psnr_thin_band"] == pytest.approx(20.17, abs=0.2)
    # Zero-mean noise leaves the mean contrast in place.
    assert scores["thin_contrast_retention"] == pytest.approx(1.0, abs=0.15)
    # Noise makes the segmenter miss thin vessels and invent some, and thick ones survive better.
    assert 0.1 < scores["thin_recall"] < scores["thick_recall"] <= 1.0
    assert 0.0 < scores["spurious_rate"] < 1.0
    assert 0.2 < scores["cldice"] < 1.0


def test_hallucination_guard_maps_lines_absent_from_the_reference(vessels: np.ndarray) -> None:
    # The reference (bicubic) shows no vessel at all; the "super-resolved" image has drawn lines.
    reference = photo(np.zeros_like(vessels), depth=0.05)
    invented = photo(vessels, depth=0.05)
    hallucinated, rate = hallucinated_vessels(invented, reference, FOV, scale=1.0)
    assert rate == 1.0
    assert hallucinated.sum() > 500 and not (hallucinated & ~ndimage.binary_dilation(vessels, iterations=2)).any()
    # Vessels present in both images are not hallucinations.
    kept, rate = hallucinated_vessels(invented, invented, FOV, scale=1.0)
    assert rate == 0.0 and not kept.any()


def test_hallucination_guard_refuses_images_of_different_shapes(clean: np.ndarray) -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        hallucinated_vessels(clean, clean[:-1], FOV, scale=1.0)


def test_vessel_maps_of_different_shapes_are_refused() -> None:
    from fundus_restore.vessel_metrics import dice, segmentation_auc

    first, second = np.zeros((8, 8), bool), np.zeros((8, 9), bool)
    for measure in (dice, segmentation_auc, recall, spurious_rate, cldice):
        with pytest.raises(ValueError, match=r"\(8, 8\) and .* \(8, 9\) differ in shape"):
            measure(first, second)


def test_dice_and_auc_on_known_cases() -> None:
    from fundus_restore.vessel_metrics import dice, segmentation_auc

    truth = np.array([True, True, False, False])
    assert dice(truth, truth) == 1.0 and dice(~truth, truth) == 0.0
    assert dice(np.array([True, False, True, False]), truth) == 0.5
    assert segmentation_auc(np.array([0.9, 0.8, 0.1, 0.2]), truth) == 1.0
    assert segmentation_auc(np.array([0.1, 0.2, 0.9, 0.8]), truth) == 0.0
    assert segmentation_auc(np.array([0.5, 0.5, 0.5, 0.5]), truth) == 0.5  # ties count half


def test_a_given_clean_segmentation_gives_the_same_measures() -> None:
    from fundus_restore.vessels import segment_vessels

    rng = np.random.default_rng(1)
    rows, cols = np.mgrid[:120, :120]
    clean = np.stack([0.6 + 0 * rows] * 3, axis=-1).astype(np.float32)
    clean[40:42, 10:110] -= 0.2
    clean[80:83, 10:110] -= 0.25
    restored = (clean + rng.normal(0, 0.02, clean.shape)).astype(np.float32)
    fov = np.ones((120, 120), dtype=bool)
    given = vessel_preservation(clean, restored, fov=fov, scale=1.0, clean_vessels=segment_vessels(clean, fov, scale=1.0))
    assert json.dumps(given) == json.dumps(vessel_preservation(clean, restored, fov=fov, scale=1.0))


def test_a_crop_is_warned_about_unless_given_its_photographs_scale() -> None:
    # Sized by its own width, a 120-px crop of a DRIVE photo would count no vessel as thin.
    clean = np.full((120, 120, 3), 0.6, dtype=np.float32)
    clean[40:42, 10:110] -= 0.2
    with pytest.warns(UserWarning, match=r"all field of view \(a crop .*120 px wide \(scale 0\.21\); for a crop give scale=") as said:
        vessel_preservation(clean, clean)
    assert all(warning.filename == __file__ for warning in said)  # it points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vessel_preservation(clean, clean, scale=1.0)
