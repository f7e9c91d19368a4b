from __future__ import annotations

from pathlib import Path

import numpy as np

from matplotlib.colors import to_rgb

from fundus_restore.report import (
    OVERLAY_COLOURS,
    comparison_figure,
    error_maps_figure,
    reduced_view,
    thin_vessel_window,
    vessel_overlay,
)
from fundus_restore.vessel_metrics import vessel_changes


def _background_with_thin_vessels(rows: slice, cols: slice) -> np.ndarray:
    image = np.full((256, 256, 3), [0.7, 0.35, 0.2], dtype=np.float32)
    for offset in range(0, 60, 12):  # thin dark lines, 1-2 px wide, in one region only
        image[rows.start + offset, cols] *= 0.7
    return image


def test_window_finds_the_thin_vessels():
    image = _background_with_thin_vessels(slice(150, 220), slice(140, 230))
    top, left = thin_vessel_window(image, size=64)
    assert 110 <= top <= 210 and 120 <= left <= 200


def test_window_avoids_the_bright_disc_and_stays_inside_the_image():
    image = _background_with_thin_vessels(slice(150, 220), slice(140, 230))
    rows, cols = np.mgrid[:256, :256]
    disc = (rows - 60) ** 2 + (cols - 60) ** 2 < 30**2
    image[disc] = 0.95
    image[disc & (cols % 8 == 0)] = 0.6  # many vessels cross the disc: still not where thin vessels are shown
    top, left = thin_vessel_window(image, size=64)
    assert top > 100 and 0 <= left <= 256 - 64


def test_comparison_figure_writes_a_png(tmp_path: Path):
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    path = comparison_figure({"a": image, "b": image * 0.5}, tmp_path / "fig.png", zoom=(8, 8, 16), captions={"a": "x"})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _three_line_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean, restored, expert map): clean has thin dark lines at rows 30 and 70 (the
    expert's map); the restored image keeps the first, loses the second and adds one at row 100."""
    clean = np.full((128, 128, 3), [0.7, 0.4, 0.2], dtype=np.float32)
    restored = clean.copy()
    for image, rows in ((clean, (30, 70)), (restored, (30, 100))):
        for row in rows:
            image[row, 16:112] *= 0.6
    expert = np.zeros((128, 128), dtype=bool)
    expert[(30, 70), 16:112] = True
    return clean, restored, expert


def test_vessel_changes_show_the_kept_the_lost_and_the_added_thin_line():
    clean, restored, expert = _three_line_case()
    # The segmenter's blurred maps are wide; the expert's one-pixel lines are the thin reference.
    changes = vessel_changes(clean, restored, expert=expert, fov=np.ones_like(expert), scale=1.0)
    kept_rows, lost_rows, spurious_rows = (set(np.nonzero(m)[0]) for m in (changes.kept_thin, changes.lost_thin, changes.spurious))
    assert kept_rows and kept_rows <= {29, 30, 31}
    assert lost_rows and lost_rows <= {69, 70, 71}
    assert spurious_rows and spurious_rows <= {99, 100, 101}
    overlay = vessel_overlay(restored, changes)
    row, col = np.argwhere(changes.lost_thin)[0]
    np.testing.assert_allclose(overlay[row, col], to_rgb(OVERLAY_COLOURS["lost thin"]))
    untouched = ~(changes.kept_thin | changes.lost_thin | changes.spurious)
    np.testing.assert_array_equal(overlay[untouched], restored[untouched])


def test_error_maps_figure_writes_a_png(tmp_path: Path):
    clean, restored, _ = _three_line_case()
    path = error_maps_figure(clean, {"a": restored, "b": clean + 0.01}, tmp_path / "errors.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reduced_view_averages_blocks_down_to_the_size_limit():
    image = np.random.default_rng(0).random((1000, 600, 3)).astype(np.float32)
    reduced, step = reduced_view(image, max_side=400)
    assert step == 3 and reduced.shape == (334, 200, 3)
    np.testing.assert_allclose(reduced[0, 0], image[:3, :3].mean(axis=(0, 1)), rtol=1e-5)
