"""The field of view (FOV): the bright disc of a fundus photograph on its dark surround.

Detection thresholds the per-pixel channel maximum (the red channel, brightest in
a fundus, for colour photos; works unchanged on grey images) after a 3×3 median
filter, so that noisy photos do not grow a speckled halo (a Gaussian blur works
against noise too, but spreads the disc edge past the low threshold: the mask
comes out 1–2 px too large). The threshold is Otsu's on the
logarithm of intensity: the surround is near black while a poorly lit disc edge
is merely dark, and in log scale those are two well separated modes even when
plain Otsu would cut a dark half of the disc away. The largest bright component
with its holes filled is the FOV.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from fundus_restore.io import checked_bool_mask, checked_float_image

# Median filter size before thresholding: removes pixel noise and keeps the disc edge in place.
_MEDIAN_SIZE = 3
# Offset inside the logarithm (one 8-bit level) so that exact zeros of the surround stay finite.
_LOG_OFFSET = 1.0 / 255.0
# A real surround is far darker than the disc: the median of the bright Otsu class is
# at least 16× that of the dark class on DRIVE, HEI-MED and skimage's retina (2.3×
# under noise of sigma 50), while a crop from inside the disc splits into classes at
# most 1.7× apart. Below this contrast there is no surround and all is field of view.
_MIN_SURROUND_CONTRAST = 2.0
# ...and near black: a crop from inside the disc that holds the bright optic disc splits
# 2–3× apart, but its dark class, the retina, has a median of 0.29 or more, where a real
# surround's stays below 0.23 even under noise of sigma 50 (max of the channels).
_MAX_SURROUND_LEVEL = 0.25


def _intensity(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] in (1, 3):
        image = image.max(axis=-1)
    if image.ndim != 2:
        hint = " (channels first? move them last)" if image.ndim == 3 and image.shape[0] in (1, 3) else ""
        raise ValueError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {image.shape}{hint}")
    # Clipped: unclipped float noise (the paper's protocol) dips below 0 on the surround,
    # where the logarithm of the threshold is undefined.
    return np.clip(ndimage.median_filter(image, _MEDIAN_SIZE), 0.0, 1.0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # label 0 is the background
    return labels == sizes.argmax()


def fov_mask(image: np.ndarray) -> np.ndarray:
    """Bool H×W mask of the circular field of view of a fundus photo (H×W×C or H×W, [0, 1]).

    An image without a dark surround (all of it inside the disc) is all field of view.
    """
    intensity = _intensity(checked_float_image(image))
    if np.ptp(intensity) < 1 / 65535:  # flat (within a 16-bit level): no surround, and too little range for Otsu
        return np.ones(intensity.shape, dtype=bool)
    threshold = float(np.exp(threshold_otsu(np.log(intensity + _LOG_OFFSET))) - _LOG_OFFSET)
    dark = intensity <= threshold
    surround_level = np.median(intensity[dark])
    if surround_level > _MAX_SURROUND_LEVEL or np.median(intensity[~dark]) < _MIN_SURROUND_CONTRAST * surround_level:
        return np.ones(intensity.shape, dtype=bool)
    return ndimage.binary_fill_holes(_largest_component(~dark))


def _square_span(start: int, stop: int, side: int, length: int) -> tuple[int, int]:
    """(begin, size) of a span of ``side`` centred on [start, stop), shifted to lie
    inside [0, length) and clipped to ``length`` when it cannot fit."""
    size = min(side, length)
    begin = (start + stop - size) // 2
    return min(max(begin, 0), length - size), size


def fov_bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the square bounding the field of view.

    The side is the larger extent of the mask, centred on it and shifted to stay
    inside the image. Where the disc is cut by the image border (HEI-MED's discs
    are taller than the photo) the square is clipped to the image rather than
    padded with invented black, so height and width may then differ.
    """
    mask = checked_bool_mask(mask, "field-of-view mask")
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("the field-of-view mask is empty")
    side = int(max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]))
    top, height = _square_span(int(rows[0]), int(rows[-1]) + 1, side, mask.shape[0])
    left, width = _square_span(int(cols[0]), int(cols[-1]) + 1, side, mask.shape[1])
    return top, left, height, width


def crop_to_fov(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Crop an image and its FOV mask (detected when not given) to the FOV's bounding
    square, removing the black background around the disc. Returns (image, mask)."""
    if mask is None:
        mask = fov_mask(image)
    mask = checked_bool_mask(mask, "field-of-view mask")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    top, left, height, width = fov_bounding_box(mask)
    window = (slice(top, top + height), slice(left, left + width))
    return image[window], mask[window]
