"""Vessel maps of colour fundus photographs: vesselness, segmentation, centrelines, widths.

Two segmenters: the classical one below (no training) and a learned one,
``learned_vesselness``, the bundled ``vessels-unet`` (a small U-Net trained on DRIVE
training's expert maps); ``segment_vessels(..., method="unet")`` picks it.

Vesselness is the multi-scale Hessian ridge measure at the heart of Frangi's filter,
on the green channel (where vessels contrast most) after CLAHE: at each scale sigma
the larger eigenvalue of the Hessian, scale-normalised by sigma², is positive across
a dark line; the maximum over scales is the vesselness. Frangi's full formula
(skimage.filters.frangi) adds a blob/line ratio and a structureness gate that zero
out most of the image; on DRIVE training that drops the AUC against the expert maps
from 0.93 to 0.85, because every weak thin vessel gets the same zero as background.

Every size is given at DRIVE's scale (565 px wide) and multiplied by ``scale``, by
default the image width over 565, so a 2196-px-wide photo is filtered at 3.9× the sigmas.
That default takes the image for a whole photograph: for a crop, give the whole
photograph's scale (a crop that is all field of view is warned about).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.feature import hessian_matrix, hessian_matrix_eigvals
from skimage.morphology import remove_small_objects, skeletonize

from .fov import fov_mask
from .io import checked_bool_mask, checked_float_image

DRIVE_WIDTH = 565
LEARNED_SEGMENTER = "vessels-unet"
# Hessian scales at DRIVE scale: thin capillaries (~1 px) up to the widest vessels near the disc (~8 px).
HESSIAN_SIGMAS = (1.0, 1.5, 2.0, 3.0, 4.0)
# CLAHE clip limit: enough to even out the illumination, not so much that noise is boosted.
_CLAHE_CLIP = 0.01
# A green channel spanning less than this inside the field of view (two 8-bit levels) holds no vessel.
_FLAT_RANGE = 2.0 / 255.0
# The FOV is eroded by this much before vesselness is kept: the disc rim is a dark edge, not a vessel.
_RIM_PX = 3.0
# Default segmentation threshold on vesselness, tuned on DRIVE training (scripts/check_vessels_drive.py).
DEFAULT_THRESHOLD = 0.025
# Components of at most this many pixels (at DRIVE scale) are noise, not vessels.
_MIN_COMPONENT_PX = 30
# Width of thin vessels at DRIVE scale, as vessel_width measures it: at most this many pixels,
# i.e. vessels up to 4 px wide (an even width reads one less, 2·d − 1).
THIN_MAX_PX = 3.0


def image_scale(image: np.ndarray) -> float:
    """The size of an image relative to DRIVE's: its width over 565 px."""
    return np.asarray(image).shape[1] / DRIVE_WIDTH


def vessel_scale(image: np.ndarray, fov: np.ndarray, *, stacklevel: int = 3) -> float:
    """The default ``scale`` of the vessel functions: ``image_scale``, which takes the image for a
    whole photograph. An image that is all field of view is a crop from inside the disc, whose
    width says nothing of the photograph's: warned, as its vessels would be sized wrongly
    (``stacklevel`` as ``warnings.warn``'s, from here: 3 names the line that called the caller)."""
    scale = image_scale(image)
    if fov.all():
        width = np.shape(image)[1]
        warnings.warn(f"the image is all field of view (a crop from inside the disc?): its vessels are sized as in "
                      f"a whole photograph {width} px wide (scale {scale:.2f}); for a crop give scale=, the whole "
                      f"photograph's width / {DRIVE_WIDTH}", stacklevel=stacklevel)
    return scale


def green_channel(image: np.ndarray) -> np.ndarray:
    """The green channel of a colour image, or the single channel of a grey one, as float32 H×W."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] in (1, 3):
        return image[..., 1] if image.shape[-1] == 3 else image[..., 0]
    if image.ndim == 2:
        return image
    raise ValueError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {image.shape}")


def checked_fov(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The field of view of ``image``: ``mask`` as bool after checking its shape, or detected when None."""
    if mask is None:
        return fov_mask(image)  # which checks the image
    checked_float_image(image)
    mask = checked_bool_mask(mask, "field-of-view mask")
    if mask.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {np.asarray(image).shape[:2]}")
    if not mask.any():
        raise ValueError("the field-of-view mask is empty")
    return mask


def disc(radius: float) -> np.ndarray:
    """A Euclidean disc structuring element of the given radius (at least the centre pixel)."""
    extent = int(np.floor(radius))
    offsets = np.arange(-extent, extent + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _normalised_green(image: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Green channel with the outside of the FOV filled by the nearest FOV pixel, then CLAHE.

    The fill removes the disc edge, which the Hessian would otherwise see as a huge
    dark ridge, and keeps the black surround out of CLAHE's histograms.
    """
    green = np.clip(green_channel(image), 0.0, 1.0)
    if np.ptp(green[fov]) < _FLAT_RANGE:  # nothing to see: CLAHE would stretch rounding noise into "vessels"
        return np.zeros(green.shape, dtype=np.float32)
    nearest = ndimage.distance_transform_edt(~fov, return_distances=False, return_indices=True)
    return equalize_adapthist(green[tuple(nearest)], clip_limit=_CLAHE_CLIP).astype(np.float32)


def vesselness(image: np.ndarray, mask: np.ndarray | None = None, *, scale: float | None = None) -> np.ndarray:
    """Float32 H×W vessel likelihood (≥ 0, larger = more vessel-like) of a fundus photo on [0, 1].

    ``mask`` is the field of view (detected when not given); the result is zero
    outside it and on its rim. ``scale`` multiplies the Hessian sigmas (default:
    image width / 565).
    """
    fov = checked_fov(image, mask)
    scale = vessel_scale(image, fov) if scale is None else scale
    normalised = _normalised_green(image, fov)
    response = np.zeros(normalised.shape, dtype=np.float32)
    for sigma in HESSIAN_SIGMAS:
        sigma = sigma * scale
        hessian = hessian_matrix(normalised, sigma=sigma, order="rc", use_gaussian_derivatives=False)
        largest = hessian_matrix_eigvals(hessian)[0]
        np.maximum(response, sigma**2 * largest, out=response)
    inner = ndimage.binary_erosion(fov, structure=disc(_RIM_PX * scale))
    return np.where(inner, response, np.float32(0))


@lru_cache(maxsize=2)
def _segmenter(model: str) -> torch.nn.Module:
    from fundus_restore.pretrained import load_model

    return load_model(model).eval()


def learned_vesselness(
    image: np.ndarray, mask: np.ndarray | None = None, *, model: str = LEARNED_SEGMENTER, scale: float | None = None
) -> np.ndarray:
    """Float32 H×W vessel probability from a learned segmenter (a bundled name or a
    safetensors file), zero outside the field of view.

    The network learnt vessels at DRIVE's scale, so a photo of another size is resized
    to DRIVE's width (``scale`` = its size relative to DRIVE's) and the map resized back.
    """
    from skimage.transform import resize

    if np.ndim(image) != 3 or np.shape(image)[2] != 3:  # it learnt on colour photographs
        raise ValueError(f"the learned segmenter takes H×W×3 colour images, got shape {np.shape(image)} "
                         "(the Hessian segmenter takes grey ones)")
    fov = checked_fov(image, mask)
    scale = vessel_scale(image, fov) if scale is None else scale
    height, width = np.shape(image)[:2]
    shrunk = np.asarray(image, dtype=np.float32)
    if abs(scale - 1) > 0.05:
        size = (max(1, round(height / scale)), max(1, round(width / scale)))
        shrunk = resize(shrunk, size, order=3, anti_aliasing=scale > 1).astype(np.float32)
    with torch.inference_mode():
        logits = _segmenter(str(model))(torch.from_numpy(shrunk.transpose(2, 0, 1)[None].copy()))[0, 0].numpy()
    probability = 1 / (1 + np.exp(-logits))
    if probability.shape != (height, width):
        probability = resize(probability, (height, width), order=1)
    return np.where(fov, probability, 0).astype(np.float32)


# The methods of segment_vessels: classical vesselness, or the bundled learned segmenter.
SEGMENTERS = ("hessian", "unet")


def segment_vessels(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    scale: float | None = None,
    method: str = "hessian",
) -> np.ndarray:
    """Bool H×W vessel map, without components of at most 30 px at DRIVE scale.

    ``method="hessian"``: vesselness above ``threshold`` (default ``DEFAULT_THRESHOLD``,
    tuned on DRIVE training); ``"unet"``: the learned segmenter's probability above
    ``threshold`` (default 0.5).
    """
    if method not in SEGMENTERS:
        raise ValueError(f"unknown segmentation method {method!r}: {' or '.join(SEGMENTERS)}")
    fov = checked_fov(image, mask)
    scale = vessel_scale(image, fov) if scale is None else scale
    if method == "hessian":
        vessels = vesselness(image, fov, scale=scale) > (DEFAULT_THRESHOLD if threshold is None else threshold)
    else:
        vessels = learned_vesselness(image, fov, scale=scale) > (0.5 if threshold is None else threshold)
    return remove_small_objects(vessels, max_size=round(_MIN_COMPONENT_PX * scale**2))


def centerline(vessel_mask: np.ndarray) -> np.ndarray:
    """Bool H×W one-pixel-wide skeleton of a vessel map."""
    return skeletonize(np.asarray(vessel_mask, dtype=bool))


def vessel_width(vessel_mask: np.ndarray) -> np.ndarray:
    """Float32 H×W vessel width in pixels on the centreline, zero elsewhere.

    The width is 2·d − 1, d being the Euclidean distance from the centreline pixel to
    the nearest background pixel: a straight vessel of odd width w has its centre
    (w+1)/2 px from the background, so w is exact; an even width w reads as w − 1
    (the skeleton then lies on one of the two middle pixels).
    """
    vessel_mask = np.asarray(vessel_mask, dtype=bool)
    distance = ndimage.distance_transform_edt(vessel_mask)
    return np.where(centerline(vessel_mask), 2 * distance - 1, 0).astype(np.float32)


def classify_widths(
    vessel_mask: np.ndarray, *, thin_max: float = THIN_MAX_PX, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(thin, thick) bool H×W centrelines: a measured width (``vessel_width``) of at most
    ``thin_max``·``scale`` px is thin, wider is thick. At the default 3 px, vessels 4 px
    wide count as thin: their width reads 3."""
    width = vessel_width(vessel_mask)
    on_centreline = width > 0
    thin = on_centreline & (width <= thin_max * scale)
    return thin, on_centreline & ~thin
