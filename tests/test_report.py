from __future__ import annotations

from pathlib import Path

import numpy as np

from fundus_restore.report import comparison_figure, thin_vessel_window


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
