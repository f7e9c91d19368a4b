"""Vessel-preservation metrics: did restoration keep thin vessels, and did it invent any?

The reference vessel map is the expert's when there is one, else the segmentation of
the clean image; the restored image is segmented by the same segmenter
(``vessels.segment_vessels``: classical by default, ``segmenter="unet"`` the learned one). Everything is counted inside
the field of view. Pixel sizes are at DRIVE scale and multiplied by ``scale``
(default: image width / 565):

- a reference vessel is *thin* where its measured width (``vessels.vessel_width``) is
  at most ``THIN_MAX_PX`` = 3 px, which holds vessels up to 4 px wide (an even width
  reads one less); the rest is *thick*;
- a reference centreline pixel is *detected* when a restored vessel pixel lies within
  ``TOLERANCE_PX`` = 1.5 px of it (its 8-neighbourhood): a segmentation shifted by
  one pixel still found the vessel;
- ``spurious_rate`` is the fraction of the restored centreline (its pixel count is the
  denominator) farther than the tolerance from every vessel pixel of both the clean
  image's segmentation and the expert map;
- contrast is measured on the green channel against the mean of a background ring
  2–5 px outside the reference vessels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from .io import checked_bool_mask
from .metrics import psnr
from .vessels import centerline, checked_fov, classify_widths, disc, green_channel, segment_vessels, vessel_scale

TOLERANCE_PX = 1.5
# The background ring around vessels: from just outside the vessel edge (thin vessels'
# blurred edges stay out) to a few pixels further, before the next vessel is likely.
_RING_INNER_PX = 2.0
_RING_OUTER_PX = 5.0
# Local background mean over a window of this size around each centreline pixel.
_BACKGROUND_WINDOW_PX = 15
# Half-width of the band around thin vessels where PSNR is measured.
_THIN_BAND_PX = 3.0


def _same_shape(
    first: np.ndarray, second: np.ndarray, names: tuple[str, str], dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as ``dtype`` (bool: refused unless 0/1, ``checked_bool_mask``), refused when their shapes differ."""
    first, second = ((checked_bool_mask(a, name) if dtype is bool else np.asarray(a, dtype=dtype))
                     for a, name in zip((first, second), names, strict=True))
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} {first.shape} and {names[1]} {second.shape} differ in shape")
    return first, second


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap 2|P∩T| / (|P| + |T|) of two bool maps (1.0 when both are empty)."""
    predicted, truth = _same_shape(predicted, truth, ("predicted", "truth"), bool)
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else float(2 * (predicted & truth).sum() / total)


def segmentation_auc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for bool ``truth`` (Mann–Whitney, ties counted half)."""
    from scipy.stats import rankdata

    score, truth = _same_shape(score, truth, ("score", "truth"), np.float64)
    score, truth = score.ravel(), truth.ravel().astype(bool)
    positives = int(truth.sum())
    negatives = truth.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _within(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels at most ``tolerance`` px (Euclidean) from a True pixel of ``mask``."""
    if not mask.any():
        return np.zeros_like(mask)
    return ndimage.distance_transform_edt(~mask) <= tolerance


def _fraction(part: np.ndarray, whole: np.ndarray) -> float:
    """|part| / |whole|, NaN when ``whole`` is empty (no pixel to measure on)."""
    count = int(whole.sum())
    return float(part.sum() / count) if count else float("nan")


def recall(reference_centreline: np.ndarray, restored_vessels: np.ndarray, *, tolerance: float = TOLERANCE_PX) -> float:
    """Fraction of reference centreline pixels with a restored vessel pixel within ``tolerance`` px."""
    reference_centreline, restored_vessels = _same_shape(reference_centreline, restored_vessels,
                                                         ("reference centreline", "restored vessels"), bool)
    detected = reference_centreline & _within(restored_vessels, tolerance)
    return _fraction(detected, reference_centreline)


def _spurious_centreline(
    restored_vessels: np.ndarray, real_vessels: np.ndarray, tolerance: float
) -> tuple[np.ndarray, float]:
    """(The restored centreline pixels farther than ``tolerance`` px from every real vessel pixel,
    their fraction of the restored centreline); an empty restored centreline gives rate 0."""
    restored_vessels, real_vessels = _same_shape(
        restored_vessels, real_vessels, ("restored vessels", "real vessels"), bool
    )
    restored_centreline = centerline(restored_vessels)
    spurious = restored_centreline & ~_within(real_vessels, tolerance)
    return spurious, _fraction(spurious, restored_centreline) if restored_centreline.any() else 0.0


def spurious_rate(restored_vessels: np.ndarray, real_vessels: np.ndarray, *, tolerance: float = TOLERANCE_PX) -> float:
    """Fraction of the restored centreline farther than ``tolerance`` px from every real vessel pixel.

    ``real_vessels`` is whatever counts as really there (clean segmentation ∪ expert map);
    an empty restored centreline invents nothing and gives 0.
    """
    return _spurious_centreline(restored_vessels, real_vessels, tolerance)[1]


def cldice(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Centreline Dice (Shit et al., CVPR 2021) of two bool vessel maps.

    Topology precision = |skeleton(predicted) ∩ reference| / |skeleton(predicted)|,
    topology sensitivity = |skeleton(reference) ∩ predicted| / |skeleton(reference)|;
    clDice is their harmonic mean (1 for identical maps, two empty ones too, as ``dice``;
    0 when only one is empty).
    """
    predicted, reference = _same_shape(predicted, reference, ("predicted", "reference"), bool)
    predicted_skeleton = centerline(predicted)
    reference_skeleton = centerline(reference)
    if not predicted_skeleton.any() and not reference_skeleton.any():
        return 1.0
    if not predicted_skeleton.any() or not reference_skeleton.any():
        return 0.0
    precision = _fraction(predicted_skeleton & reference, predicted_skeleton)
    sensitivity = _fraction(reference_skeleton & predicted, reference_skeleton)
    if precision + sensitivity == 0:
        return 0.0
    return 2 * precision * sensitivity / (precision + sensitivity)


def _background_ring(vessels: np.ndarray, fov: np.ndarray, scale: float) -> np.ndarray:
    outer = ndimage.binary_dilation(vessels, structure=disc(_RING_OUTER_PX * scale))
    inner = ndimage.binary_dilation(vessels, structure=disc(_RING_INNER_PX * scale))
    return outer & ~inner & fov


def vessel_contrast(image: np.ndarray, centreline: np.ndarray, ring: np.ndarray, *, scale: float = 1.0) -> float:
    """Mean over ``centreline`` pixels of local background minus vessel intensity (green channel).

    The local background at a pixel is the mean of the ``ring`` pixels in a
    15 px (at DRIVE scale) window around it; vessels are dark, so contrast is positive.
    """
    green = green_channel(image).astype(np.float64)
    size = max(3, round(_BACKGROUND_WINDOW_PX * scale) | 1)
    ring_sum = ndimage.uniform_filter(np.where(ring, green, 0.0), size)
    ring_share = ndimage.uniform_filter(ring.astype(np.float64), size)
    measured = centreline & (ring_share > 0)
    background = ring_sum[measured] / ring_share[measured]
    return float(np.mean(background - green[measured])) if measured.any() else float("nan")


def contrast_retention(
    clean: np.ndarray, restored: np.ndarray, centreline: np.ndarray, vessels: np.ndarray, fov: np.ndarray, *, scale: float = 1.0
) -> float:
    """Vessel contrast of ``restored`` over that of ``clean`` on the same centreline and
    background ring (1.0 = kept, below = washed out), NaN where the clean image has none."""
    ring = _background_ring(vessels, fov, scale)
    clean_contrast = vessel_contrast(clean, centreline, ring, scale=scale)
    if not clean_contrast > 0:
        return float("nan")
    return vessel_contrast(restored, centreline, ring, scale=scale) / clean_contrast


class _SegmentedPair(NamedTuple):
    clean: np.ndarray
    restored: np.ndarray
    fov: np.ndarray
    scale: float
    reference: np.ndarray  # the expert map inside the FOV, else the clean image's segmentation
    real: np.ndarray  # everything that counts as really there: clean segmentation ∪ expert map
    restored_vessels: np.ndarray


def _segmented_pair(
    clean: np.ndarray,
    restored: np.ndarray,
    expert: np.ndarray | None,
    fov: np.ndarray | None,
    scale: float | None,
    segmenter: str,
    clean_vessels: np.ndarray | None = None,
) -> _SegmentedPair:
    """Checked float32 images, FOV, scale and the vessel maps both measures and drawings use."""
    clean, restored = _same_shape(clean, restored, ("clean", "restored"))
    fov = checked_fov(clean, fov)
    scale = vessel_scale(clean, fov, stacklevel=4) if scale is None else scale  # warned at the public caller's caller
    if clean_vessels is None:
        clean_vessels = segment_vessels(clean, fov, scale=scale, method=segmenter)
    reference = real = clean_vessels
    if expert is not None:
        expert = checked_bool_mask(expert, "expert vessel map")
        if expert.shape != fov.shape:
            raise ValueError(f"expert map shape {expert.shape} does not match image shape {fov.shape}")
        reference = expert & fov
        real = clean_vessels | reference
    restored_vessels = segment_vessels(restored, fov, scale=scale, method=segmenter)
    return _SegmentedPair(clean, restored, fov, scale, reference, real, restored_vessels)


def vessel_preservation(
    clean: np.ndarray,
    restored: np.ndarray,
    *,
    expert: np.ndarray | None = None,
    fov: np.ndarray | None = None,
    scale: float | None = None,
    segmenter: str = "hessian",
    clean_vessels: np.ndarray | None = None,
) -> dict[str, float]:
    """The vessel columns of an evaluation table, for one clean/restored pair of H×W×C [0, 1] images.

    ``expert`` is a bool H×W vessel map (else the clean image's segmentation is the
    reference); ``fov`` the field of view (else detected on the clean image); ``scale``
    the image size relative to DRIVE (else width / 565); ``segmenter`` the
    ``segment_vessels`` method that finds vessels in both images (``clean_vessels``, the
    clean image's segmentation with the same arguments, saves segmenting it again
    when one clean image is compared with many restorations). Keys: ``thin_recall``,
    ``thick_recall``, ``spurious_rate``, ``cldice``, ``thin_contrast_retention``,
    ``psnr_thin_band``; a metric with nothing to measure on (e.g. no thin vessel) is NaN.
    """
    clean, restored, fov, scale, reference, real, restored_vessels = _segmented_pair(
        clean, restored, expert, fov, scale, segmenter, clean_vessels
    )
    thin, thick = classify_widths(reference, scale=scale)
    tolerance = TOLERANCE_PX * scale
    thin_band = ndimage.binary_dilation(thin, structure=disc(_THIN_BAND_PX * scale)) & fov
    return {
        "thin_recall": recall(thin, restored_vessels, tolerance=tolerance),
        "thick_recall": recall(thick, restored_vessels, tolerance=tolerance),
        "spurious_rate": spurious_rate(restored_vessels, real, tolerance=tolerance),
        "cldice": cldice(restored_vessels, reference),
        "thin_contrast_retention": contrast_retention(clean, restored, thin, reference, fov, scale=scale),
        "psnr_thin_band": psnr(clean, restored, mask=thin_band) if thin_band.any() else float("nan"),
    }


@dataclass(frozen=True)
class VesselChanges:
    """Where restoration kept, lost or invented vessels: bool H×W centreline maps."""

    kept_thin: np.ndarray  # thin reference centreline with a restored vessel within tolerance
    lost_thin: np.ndarray  # thin reference centreline with none
    spurious: np.ndarray  # restored centreline far from every real vessel


def vessel_changes(
    clean: np.ndarray,
    restored: np.ndarray,
    *,
    expert: np.ndarray | None = None,
    fov: np.ndarray | None = None,
    scale: float | None = None,
    segmenter: str = "hessian",
) -> VesselChanges:
    """The maps behind ``thin_recall`` and ``spurious_rate`` of ``vessel_preservation``
    (same arguments, same reference and tolerance), for drawing where vessels changed."""
    pair = _segmented_pair(clean, restored, expert, fov, scale, segmenter)
    restored_vessels, scale = pair.restored_vessels, pair.scale
    thin, _ = classify_widths(pair.reference, scale=scale)
    tolerance = TOLERANCE_PX * scale
    detected = thin & _within(restored_vessels, tolerance)
    spurious, _ = _spurious_centreline(restored_vessels, pair.real, tolerance)
    return VesselChanges(kept_thin=detected, lost_thin=thin & ~detected, spurious=spurious)


def hallucinated_vessels(
    upscaled: np.ndarray,
    reference_upscaled: np.ndarray,
    fov: np.ndarray | None = None,
    *,
    scale: float | None = None,
    reference_vessels: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """The hallucination guard of super-resolution: (bool H×W map, rate) of invented vessels.

    ``upscaled`` is a super-resolved image and ``reference_upscaled`` the same input
    enlarged by plain bicubic interpolation, which cannot invent structure. Both are
    segmented alike (``fov`` detected on the reference when None; ``scale`` the size
    relative to DRIVE, default width / 565); the map holds the centreline pixels of
    the super-resolved vessels farther than ``TOLERANCE_PX``·``scale`` from every
    vessel pixel of the reference, and the rate is their share of the super-resolved
    centreline (0 when it has none). ``reference_vessels``, the reference's
    ``segment_vessels`` map with the same ``fov`` and ``scale``, saves segmenting it
    again when one input is compared with many upscalers.
    """
    upscaled, reference_upscaled = _same_shape(upscaled, reference_upscaled, ("upscaled", "reference"))
    fov = checked_fov(reference_upscaled, fov)
    scale = vessel_scale(upscaled, fov) if scale is None else scale
    if reference_vessels is None:
        reference_vessels = segment_vessels(reference_upscaled, fov, scale=scale)
    return _spurious_centreline(segment_vessels(upscaled, fov, scale=scale), reference_vessels, TOLERANCE_PX * scale)
