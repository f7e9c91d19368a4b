"""Figures for people: side-by-side comparisons with a zoom on thin vessels, error maps,
vessel overlays, and the self-contained HTML report of an evaluation."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.filters import sato  # noqa: E402
from skimage.measure import block_reduce  # noqa: E402

from .evaluate import Example, summarise, summary_table  # noqa: E402
from .vessel_metrics import VesselChanges, vessel_changes  # noqa: E402
from .vessels import image_scale  # noqa: E402

# Full views are reduced to at most this many pixels a side (about twice what a panel
# shows on screen); zoomed insets stay at full resolution.
FULL_VIEW_MAX_PX = 800
# Colours of the vessel overlay, chosen to stand out on a red-orange fundus.
OVERLAY_COLOURS = {"kept thin": "lime", "lost thin": "magenta", "spurious": "cyan"}


def thin_vessel_window(
    image: np.ndarray, mask: np.ndarray | None = None, size: int = 128, *, scale: float | None = None
) -> tuple[int, int]:
    """Top-left corner of the ``size``² window richest in thin dark ridges (thin vessels).

    Thin vessels show best in the green channel as dark ridges one or two pixels wide at
    DRIVE's scale (``scale`` times that; default the image's own, ``vessels.image_scale``:
    give a crop its photo's); a small-scale Sato ridge filter averaged over windows finds
    where they are dense. The search runs on a copy reduced to about 512 px so it stays
    fast on any photo.
    """
    height, width = image.shape[:2]
    size = min(size, height, width)
    step = max(1, max(height, width) // 512)
    scale = image_scale(image) if scale is None else scale
    green = image[::step, ::step, 1 if image.shape[-1] >= 3 else 0]
    ridges = sato(green, sigmas=[max(1.0, scale / step)], black_ridges=True)
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


def colour_view(image: np.ndarray) -> np.ndarray:
    """A new H×W×3 float32 copy of ``image`` clipped to [0, 1] for display; a grey
    (H×W×1) image in all three channels."""
    return np.clip(np.broadcast_to(image, (*image.shape[:2], 3)), 0.0, 1.0).astype(np.float32)


def comparison_figure(
    panels: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    zoom: tuple[int, int, int] | None = None,
    captions: Mapping[str, str] | None = None,
    legend: Mapping[str, str] | None = None,
) -> Path:
    """Write a row of images (title → H×W×3 or grey H×W×1 array) with, under each, the zoomed window.

    ``zoom`` is (top, left, size); the window is outlined on the full views.
    ``captions`` adds a line (e.g. PSNR/SSIM) under a panel's title; ``legend``
    (label → colour) a key under the row, so the PNG explains itself.
    """
    rows = 2 if zoom else 1
    figure, axes = plt.subplots(
        rows, len(panels), figsize=(4 * len(panels), 4 * rows), squeeze=False, layout="constrained"
    )
    for column, (title, image) in enumerate(panels.items()):
        shown = colour_view(image)
        reduced, step = reduced_view(shown)
        caption = (captions or {}).get(title)
        axes[0, column].imshow(reduced)
        axes[0, column].set_title(f"{title}\n{caption}" if caption else title, fontsize=11)
        if zoom:
            top, left, size = zoom
            outline = Rectangle((left / step, top / step), size / step, size / step, fill=False, edgecolor="yellow", linewidth=1.2)
            axes[0, column].add_patch(outline)
            axes[1, column].imshow(shown[top : top + size, left : left + size], interpolation="nearest")
    for axis in axes.flat:
        axis.set_axis_off()
    if legend:
        handles = [Patch(color=colour, label=label) for label, colour in legend.items()]
        figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=11)
    return _save(figure, path)


def reduced_view(image: np.ndarray, max_side: int = FULL_VIEW_MAX_PX) -> tuple[np.ndarray, int]:
    """(``image`` block-averaged by an integer step to at most ``max_side`` px a side, the step)."""
    step = max(1, math.ceil(max(image.shape[:2]) / max_side))
    if step == 1:
        return image, 1
    block = (step, step, 1) if image.ndim == 3 else (step, step)
    return block_reduce(image, block, np.mean).astype(np.float32), step


def _save(figure: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def error_maps_figure(clean: np.ndarray, restored: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """The paper's Figure 3: per-channel absolute error |restored − clean|, one row per
    channel (R, G, B; one row for a grey image), one column per method, on one colour
    scale shared by all panels (up to the 99.5th percentile of all errors, so a few
    outliers don't wash it out)."""
    errors = {name: np.abs(np.clip(image, 0.0, 1.0) - clean) for name, image in restored.items()}
    top = float(np.percentile(np.stack(list(errors.values())), 99.5)) or 1.0
    channels = ["R", "G", "B"] if clean.shape[2] == 3 else ["grey"]
    figure, axes = plt.subplots(
        len(channels), len(errors), figsize=(4 * len(errors) + 1, 4 * len(channels)), squeeze=False, layout="constrained"
    )
    for column, (name, error) in enumerate(errors.items()):
        for row, channel in enumerate(channels):
            shown = axes[row, column].imshow(reduced_view(error[..., row])[0], cmap="inferno", vmin=0.0, vmax=top)
            axes[row, column].set_title(f"{name}: |error| {channel}", fontsize=11)
            axes[row, column].set_axis_off()
    figure.colorbar(shown, ax=axes, shrink=0.6, label="absolute error (0-1 scale)")
    return _save(figure, path)


def vessel_overlay(image: np.ndarray, changes: VesselChanges) -> np.ndarray:
    """``image`` (H×W×3, or grey H×W×1) in colour with kept thin, lost thin and spurious
    vessel centrelines painted in ``OVERLAY_COLOURS``."""
    overlay = colour_view(image)
    maps = {"kept thin": changes.kept_thin, "lost thin": changes.lost_thin, "spurious": changes.spurious}
    for label, where in maps.items():
        overlay[where] = to_rgb(OVERLAY_COLOURS[label])
    return overlay


# What example_figures writes: a report rewritten into its folder removes what it no longer draws.
FIGURE_FILES = ("comparison.png", "error_maps.png", "vessel_overlays.png")


def example_figures(example: Example, rows: Sequence[dict[str, float | str]], folder: Path) -> dict[str, Path]:
    """The report's figures for one example image, written under ``folder``: comparison
    (Figure 2), error maps (Figure 3, the first two methods other than "noisy") and the
    vessel overlays; returns caption → PNG path."""
    # 128 px at DRIVE's scale: as much retina, so as many vessels, on any photo.
    scale = example.vessel_scale
    size = min(round(128 * scale), min(example.clean.shape[:2]) // 3)
    zoom = (*thin_vessel_window(example.clean, example.mask, size, scale=scale), size)
    scores = {
        row["method"]: f"PSNR {row['psnr_fov']:.2f} dB, SSIM {row['ssim_fov']:.3f} (FOV)"
        for row in rows
        if (row["image"], row["sigma"], row["protocol"]) == (example.image, example.sigma, example.protocol)
    }
    setting = f"{example.image}, σ {example.sigma:g}, {example.protocol} noise"
    panels = ", ".join(["Clean", *example.restored])
    figures = {
        f"{panels} ({setting}); the yellow window is shown at full resolution below": comparison_figure(
            {"clean": example.clean, **example.restored}, folder / FIGURE_FILES[0], zoom=zoom, captions=scores
        )
    }
    compared = {name: image for name, image in example.restored.items() if name != "noisy"}
    if compared:
        two = dict(list(compared.items())[:2])
        figures[f"Per-channel absolute error of {' and '.join(two)} ({setting})"] = error_maps_figure(
            example.clean, two, folder / FIGURE_FILES[1]
        )
    overlays = {
        name: vessel_overlay(image, vessel_changes(
            example.clean, image, expert=example.expert, fov=example.mask, scale=scale,
            segmenter=example.segmenter
        ))
        for name, image in example.restored.items()
    }
    legend = ", ".join(f"{label} {colour}" for label, colour in OVERLAY_COLOURS.items())
    figures[f"Thin vessels per method ({legend}; {setting})"] = comparison_figure(
        overlays, folder / FIGURE_FILES[2], zoom=zoom, legend=OVERLAY_COLOURS
    )
    return figures


def write_html_report(
    rows: Sequence[dict[str, float | str]],
    report_dir: str | Path,
    *,
    settings: Mapping[str, str],
    example: Example | None = None,
    title: str = "Denoising evaluation",
) -> Path:
    """``report_dir/report.html``: title, run settings, summary table and the example's
    figures embedded as base64 PNG (one self-contained file); the PNGs also go to
    ``report_dir/figures/``."""
    report_dir = Path(report_dir)
    for name in FIGURE_FILES:  # an earlier run's figures, which this report may not redraw
        (report_dir / "figures" / name).unlink(missing_ok=True)
    figures = example_figures(example, rows, report_dir / "figures") if example else {}
    header, body = summary_table(summarise(rows))
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Settings</h2><ul>",
        *(f"<li><b>{html.escape(key)}</b>: {html.escape(value)}</li>" for key, value in settings.items()),
        "</ul><h2>Summary</h2><table>",
        "<tr>" + "".join(f"<th>{html.escape(cell)}</th>" for cell in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in values) + "</tr>" for values in body),
        "</table>",
    ]
    if figures:
        parts.append("<h2>Figures</h2>")
    for caption, path in figures.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        image = f"<img src='data:image/png;base64,{encoded}' alt='{html.escape(path.stem)}'>"
        parts.append(f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    report = report_dir / "report.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(parts), encoding="utf-8")
    return report
