"""Tests for the classical vessel maps: widths of drawn lines, segmentation of drawn vessels, DRIVE AUC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import line

from fundus_restore.io import read_image, read_mask
from fundus_restore.vessels import (
    centerline,
    classify_widths,
    image_scale,
    learned_vesselness,
    segment_vessels,
    vessel_width,
    vesselness,
)


def horizontal_bar(width: int, shape: tuple[int, int] = (40, 80)) -> np.ndarray:
    """A bool map with one horizontal vessel of ``width`` px across most of the image."""
    mask = np.zeros(shape, dtype=bool)
    top = shape[0] // 2 - width // 2
    mask[top : top + width, 10:-10] = True
    return mask


def drawn_vessels(widths: tuple[int, ...], shape: tuple[int, int] = (160, 160)) -> np.ndarray:
    """A bool map of diagonal-ish lines, one per width (odd widths: a 1-px line dilated by a disc)."""
    mask = np.zeros(shape, dtype=bool)
    for index, width in enumerate(widths):
        row = 20 + index * (shape[0] - 40) // max(1, len(widths) - 1)
        single = np.zeros(shape, dtype=bool)
        single[line(row, 10, min(row + 15, shape[0] - 1), shape[1] - 11)] = True
        radius = (width - 1) // 2
        mask |= ndimage.binary_dilation(single, iterations=radius) if radius else single
    return mask


def photo(vessels: np.ndarray, depth: float = 0.25) -> np.ndarray:
    """A smooth bright background with dark vessels, RGB float32."""
    rows, cols = np.mgrid[: vessels.shape[0], : vessels.shape[1]]
    background = 0.55 + 0.1 * np.sin(rows / 50.0) * np.cos(cols / 60.0)
    green = background - depth * ndimage.gaussian_filter(vessels.astype(np.float64), 0.5)
    return np.stack([green + 0.2, green, green * 0.5], axis=-1).astype(np.float32)


@pytest.mark.parametrize("width", [1, 3, 5, 7, 9])
def test_vessel_width_of_odd_bars_is_exact(width: int) -> None:
    widths = vessel_width(horizontal_bar(width))
    # Away from the bar's ends the skeleton is one straight line at the exact width.
    middle = widths[:, 25:55]
    assert np.allclose(middle[middle > 0], width)
    assert (middle > 0).sum(axis=0).tolist() == [1] * 30


def test_vessel_width_reads_even_width_one_less() -> None:
    middle = vessel_width(horizontal_bar(4))[:, 25:55]
    assert np.allclose(middle[middle > 0], 3)


def test_centerline_is_one_pixel_wide_inside_the_vessel() -> None:
    vessels = horizontal_bar(7)
    skeleton = centerline(vessels)
    assert skeleton.dtype == bool and (skeleton <= vessels).all()
    assert (skeleton[:, 25:55].sum(axis=0) == 1).all()


def test_classify_widths_splits_at_three_pixels_scaled() -> None:
    vessels = horizontal_bar(3, (60, 80)) | np.roll(horizontal_bar(7, (60, 80)), 18, axis=0)
    thin, thick = classify_widths(vessels)
    assert thin[:, 25:55].sum() == 30 and thin[:30].sum() > 0 and thin[40:].sum() == 0
    assert thick[:, 25:55].sum() == 30 and thick[:30].sum() == 0
    assert not (thin & thick).any()
    # At 2.5× DRIVE's scale thin means ≤ 7.5 px, so the 7-px vessel is thin too.
    thin_scaled, thick_scaled = classify_widths(vessels, scale=2.5)
    assert thin_scaled[:, 25:55].sum() == 60 and thick_scaled[:, 25:55].sum() == 0


def test_segment_vessels_finds_drawn_vessels_and_not_the_background() -> None:
    vessels = drawn_vessels((1, 3, 5, 7))
    image = photo(vessels)
    fov = np.ones(vessels.shape, dtype=bool)
    segmented = segment_vessels(image, fov, scale=1.0)
    inner = ndimage.binary_erosion(fov, iterations=5)
    found = (segmented & vessels & inner).sum() / (vessels & inner).sum()
    # The larger Hessian scales widen the map by up to 2–3 px at the edges of a vessel; farther is false.
    false = (segmented & ~ndimage.binary_dilation(vessels, iterations=3) & inner).sum() / (~vessels & inner).sum()
    assert found > 0.8 and false < 0.01


def test_vesselness_is_zero_outside_the_field_of_view_and_on_its_rim() -> None:
    image = photo(drawn_vessels((3, 5)))
    fov = np.zeros(image.shape[:2], dtype=bool)
    fov[20:140, 20:140] = True
    response = vesselness(image, fov, scale=1.0)
    assert response.dtype == np.float32 and response.shape == fov.shape
    assert (response[~fov] == 0).all() and (response[20:23, 20:140] == 0).all()
    assert response[fov].max() > 0


def test_vesselness_rejects_a_mask_of_another_shape() -> None:
    with pytest.raises(ValueError, match="mask shape"):
        vesselness(np.zeros((20, 20, 3), np.float32), np.ones((10, 10), bool))


def test_image_scale_is_width_over_drive_width() -> None:
    assert image_scale(np.zeros((584, 565, 3))) == 1.0
    assert image_scale(np.zeros((10, 1130))) == 2.0


def test_vesselness_ranks_drive_vessels_above_background(drive_dir) -> None:
    image = read_image(drive_dir / "test" / "images" / "01_test.tif")
    fov = read_mask(drive_dir / "test" / "mask" / "01_test_mask.gif")
    truth = read_mask(drive_dir / "test" / "1st_manual" / "01_manual1.gif")
    response = vesselness(image, fov)[fov]
    # AUC by Mann–Whitney on a sample of pixel pairs: vessel above background.
    rng = np.random.default_rng(0)
    vessel_scores = rng.choice(response[truth[fov]], 4000)
    background_scores = rng.choice(response[~truth[fov]], 4000)
    assert (vessel_scores > background_scores).mean() > 0.9
    segmented = segment_vessels(image, fov)
    dice = 2 * (segmented & truth).sum() / (segmented.sum() + truth.sum())
    assert dice > 0.65


def test_learned_vesselness_is_a_probability_inside_the_fov_at_any_size(tmp_path) -> None:
    import torch

    from fundus_restore import save_model
    from fundus_restore.models import create_model

    torch.manual_seed(0)
    model = save_model(create_model("unet", widths=[4, 8]), tmp_path / "unet.safetensors")
    image = photo(drawn_vessels((1, 3)))
    fov = np.zeros(image.shape[:2], dtype=bool)
    fov[10:-10, 10:-10] = True
    probability = learned_vesselness(image, fov, model=str(model))
    assert probability.shape == fov.shape and probability.dtype == np.float32
    assert (probability[~fov] == 0).all() and 0 < probability[fov].min() and probability[fov].max() < 1
    # A photo 4x DRIVE's width is segmented at DRIVE's scale and the map brought back to its size.
    wide = np.zeros((40, 2260, 3), dtype=np.float32) + 0.5
    with pytest.warns(UserWarning, match="all field of view"):  # as a crop of a photo would be
        assert learned_vesselness(wide, np.ones((40, 2260), bool), model=str(model)).shape == (40, 2260)


def test_segment_vessels_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="hessian or unet"):
        segment_vessels(photo(drawn_vessels((3,))), method="frangi")


def test_bundled_unet_segments_drive_test_better_than_the_classical_segmenter(drive_dir) -> None:
    from fundus_restore.vessel_metrics import dice, segmentation_auc

    image = read_image(drive_dir / "test" / "images" / "01_test.tif")
    fov = read_mask(drive_dir / "test" / "mask" / "01_test_mask.gif")
    truth = read_mask(drive_dir / "test" / "1st_manual" / "01_manual1.gif") & fov
    learned = segmentation_auc(learned_vesselness(image, fov)[fov], truth[fov])
    classical = segmentation_auc(vesselness(image, fov)[fov], truth[fov])
    assert learned > 0.96 and learned > classical
    assert dice(segment_vessels(image, fov, method="unet") & fov, truth) > 0.75


def test_vesselness_refuses_images_off_the_unit_scale() -> None:
    from fundus_restore.vessels import learned_vesselness, vesselness

    photo = np.full((64, 64, 3), 128, np.uint8)
    for measure in (vesselness, learned_vesselness):  # an 8-bit photo gave an all-zero map
        with pytest.raises(ValueError, match="got dtype uint8"):
            measure(photo, np.ones((64, 64), bool))


def test_the_learned_segmenter_refuses_a_grey_image_in_one_line() -> None:
    from fundus_restore.vessels import learned_vesselness

    with pytest.raises(ValueError, match=r"the learned segmenter takes H×W×3 colour images, got shape \(64, 64\)"):
        learned_vesselness(np.full((64, 64), 0.5, dtype=np.float32))


def test_folding_the_vessel_unet_keeps_its_function_and_leaves_the_model_in_its_mode() -> None:
    import torch

    from fundus_restore.models.unet import VesselUNet

    torch.manual_seed(0)
    model = VesselUNet(3, (4, 8), batch_norm=True)
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.uniform_(-0.2, 0.2)
        norm.running_var.uniform_(0.5, 2.0)
    model.train()  # folding used to switch a model being trained to eval mode
    folded = model.fold_batch_norm()
    assert model.training and not folded.training
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_featureless_image_has_no_vessels() -> None:
    # One 8-bit level of variation: CLAHE would stretch it into ridges everywhere.
    levels = np.random.default_rng(0).integers(127, 129, (96, 96))
    flat = np.repeat((levels / 255.0).astype(np.float32)[..., None], 3, axis=2)
    assert not segment_vessels(flat, np.ones((96, 96), bool), scale=1.0).any()
