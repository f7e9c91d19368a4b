"""Figures for people: side-by-side comparisons with a zoom on thin vessels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.filters import sato  # noqa: E402


def thin_vessel_window(image: np.ndarray, mask: np.ndarray | None = None, size: int = 128) -> tuple[int, int]:
    """Top-left corner of the ``size``² window richest in thin dark ridges (thin vessels).

    Thin vessels show best in the green channel as dark ridges one or two pixels wide;
    a small-scale Sato ridge filter averaged over windows finds where they are dense.
    The search runs on a copy reduced to about 512 px so it stays fast on any photo.
    """
    height, width = image.shape[:2]
    size = min(size, height, width)
    step = max(1, max(height, width) // 512)
    green = image[::step, ::step, 1 if image.shape[-1] >= 3 else 0]
    ridges = sato(green, sigmas=[1.0], black_ridges=True)
    if mask is not None:
        # Stay well inside the field of view: its rim is a strong false ridge.
        inside = ndimage.binary_erosion(mask[::step, ::step], iterations=max(2, size // (2 * step)))
        ridges = np.where(inside, ridges, 0.0)
    window = max(1, size // step)
    # The optic disc is the brightest blob and its rim a ring of false ridges: keep
    # the window off it, where thin vessels run on plain background.
    brightness = ndimage.gaussian_filter(image[::step, ::step].mean(axis=-1) if image.ndim == 3 else image[::step, ::step], window / 2)
    disc = brightness > np.percentile(brightness, 99)
    ridges = np.where(ndimage.binary_dilation(disc, iterations=window), 0.0, ridges)
    density = ndimage.uniform_filter(ridges, size=window, mode="constant")
    # uniform_filter centres the window; move from centre to top-left and clamp.
    row, col = np.unravel_index(np.argmax(density), density.shape)
    top = int(np.clip(row * step - size // 2, 0, height - size))
    left = int(np.clip(col * step - size // 2, 0, width - size))
    return top, left


def comparison_figure(
    panels: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    zoom: tuple[int, int, int] | None = None,
    captions: Mapping[str, str] | None = None,
) -> Path:
    """Write a row of images (title → H×W×3 array) with, under each, the zoomed window.

    ``zoom`` is (top, left, size); the window is outlined on the full views.
    ``captions`` adds a line (e.g. PSNR/SSIM) under a panel's title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = 2 if zoom else 1
    figure, axes = plt.subplots(rows, len(panels), figsize=(4 * len(panels), 4 * rows), squeeze=False)
    for column, (title, image) in enumerate(panels.items()):
        shown = np.clip(image, 0.0, 1.0)
        caption = (captions or {}).get(title)
        axes[0, column].imshow(shown)
        axes[0, column].set_title(f"{title}\n{caption}" if caption else title, fontsize=11)
        if zoom:
            top, left, size = zoom
            axes[0, column].add_patch(Rectangle((left, top), size, size, fill=False, edgecolor="yellow", linewidth=1.2))
            axes[1, column].imshow(shown[top : top + size, left : left + size], interpolation="nearest")
    for axis in axes.flat:
        axis.set_axis_off()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
