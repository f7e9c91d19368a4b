"""Synthetic degradations of clean [0, 1] float32 images: white Gaussian noise,
quantisation to a file's bit depth, and bicubic down/up-sampling as MATLAB's
``imresize`` does it (the convention of the denoising and super-resolution papers;
its box, bilinear and Lanczos kernels shrink too, as other cameras might);
and the estimate of a photograph's noise level, to tell whether a model trained at
one level suits it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from fundus_restore.io import checked_bool_mask, checked_float_image


def add_gaussian_noise(
    image: np.ndarray,
    sigma: float = 25.0,
    *,
    seed: int | np.random.Generator | None = 0,
    clip: bool = False,
) -> np.ndarray:
    """``image`` plus white Gaussian noise of standard deviation ``sigma`` on the 0–255 scale.

    The noise is exactly
    ``np.random.default_rng(seed).standard_normal(image.shape, dtype=np.float32) * np.float32(sigma / 255)``
    (PCG64 in float32, C order), so a seed gives the same noise on every machine.
    A Generator is used, and advanced, as given; ``None`` draws fresh entropy.
    ``clip`` clips the result to [0, 1]. Returns float32.
    """
    if not sigma >= 0:  # NaN too
        raise ValueError(f"sigma is a standard deviation (0-255 scale), got {sigma:g}")
    image = checked_float_image(image).astype(np.float32, copy=False)
    noise = np.random.default_rng(seed).standard_normal(image.shape, dtype=np.float32)
    noisy = image + noise * np.float32(sigma / 255.0)
    return np.clip(noisy, 0.0, 1.0) if clip else noisy


def quantize(image: np.ndarray, bits: int = 8) -> np.ndarray:
    """Clip to [0, 1] and round to ``bits``-bit levels, as a camera writing a file does; float32."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be between 1 and 16, not {bits}")
    top = np.float32(2**bits - 1)
    return np.round(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * top) / top


# Bump when estimate_noise_sigma's readings change: scores cached for a model told the
# estimate are then measured anew. 3: a crop holding the optic disc is no longer masked to
# the disc alone (fov_mask), where the estimate was taken.
NOISE_ESTIMATE_VERSION = 3
# Median absolute value of a standard normal variable: MAD / 0.6745 estimates sigma.
_NORMAL_MAD = 0.6745
# Clipping at 0 and 1 narrows the noise wherever the signal lies within about two sigma
# of either bound (the dark blue channel of a fundus photo at high noise): such blocks
# are left out, in a few rounds, while enough blocks remain.
_CLIP_MARGIN = 2.0
_CLIP_ROUNDS = 3
_MIN_BLOCKS = 256


def _sigma_from_details(details: np.ndarray, step: float) -> float:
    """Median absolute detail over 0.6745. Details on a grid of ``step`` (half a grey level
    of an 8-bit file) tie in bins, and the plain median jumps a whole bin (0.4 of 255 at
    σ 10): the median of grouped data is taken instead, interpolated within its bin. (A
    median that falls between two levels, as in a tiny image, has no bin: it is kept.)"""
    magnitudes = np.abs(details).ravel()
    median = float(np.median(magnitudes))
    if step > 0:
        low, high = max(median - step / 2, 0.0), median + step / 2
        below = np.count_nonzero(magnitudes < low)
        tied = np.count_nonzero(magnitudes < high) - below
        if tied:
            median = low + (high - low) * (magnitudes.size / 2 - below) / tied
    return median / _NORMAL_MAD


def estimate_noise_sigma(image: np.ndarray, mask: np.ndarray | None = None, *, channel_axis: int | None = -1) -> float:
    """Standard deviation of white Gaussian noise in ``image``, on the 0–255 scale.

    Donoho's estimate: the median absolute value of the finest diagonal Haar wavelet
    coefficients (``(a - b - c + d) / 2`` over each 2×2 block, which keep white
    noise's sigma and cancel smooth signal) over 0.6745, pooled over the channels.
    ``mask`` (H×W, e.g. the field of view) keeps only the blocks wholly inside it.
    Noise clipped to [0, 1], as in every real file, is narrower near either bound, so
    the estimate is then repeated (three rounds) without the blocks whose local mean
    (over 6×6 pixels) lies within two sigma of 0 or 1: the black surround of a fundus
    photo, its dark blue channel at high noise. On an 8-bit image the median is
    interpolated within its tie of half a grey level. ``channel_axis=None`` for a grey
    image. Vessel edges are rare enough that the median ignores them; a noise-free
    photo reads about 0.5–2 (its JPEG grain and fine texture).
    """
    pixels = np.asarray(checked_float_image(image), dtype=np.float32)  # a uint8 photo would read 255 times noisier
    if pixels.ndim != (2 if channel_axis is None else 3):
        wanted = "H×W (channel_axis=None)" if channel_axis is None else "H×W×C (an H×W image: channel_axis=None)"
        raise ValueError(f"expected an {wanted} image, got shape {pixels.shape}")
    pixels = pixels[..., None] if channel_axis is None else np.moveaxis(pixels, channel_axis, -1)
    if mask is not None and np.shape(mask) != pixels.shape[:2]:
        raise ValueError(f"mask of shape {np.shape(mask)} does not match the image's {pixels.shape[:2]}")
    height, width = pixels.shape[0] // 2 * 2, pixels.shape[1] // 2 * 2
    if height == 0 or width == 0:
        raise ValueError(f"an image of {pixels.shape[0]}×{pixels.shape[1]} pixels has no 2×2 block to estimate noise on")
    corners = [pixels[row:height:2, column:width:2] for row in (0, 1) for column in (0, 1)]
    detail = (corners[0] - corners[1] - corners[2] + corners[3]) / 2
    inside = np.ones(detail.shape[:2], dtype=bool)
    if mask is not None:
        blocks = checked_bool_mask(mask)
        inside = np.logical_and.reduce([blocks[row:height:2, column:width:2] for row in (0, 1) for column in (0, 1)])
        if not inside.any():
            raise ValueError("the mask holds no whole 2×2 block to estimate noise on")
    levels = pixels[:height, :width] * 255
    step = 0.5 / 255 if np.all(np.abs(levels - np.round(levels)) < 1e-3) else 0.0  # an 8-bit file's details
    sigma = _sigma_from_details(detail[inside], step)
    local_mean = ndimage.uniform_filter(sum(corners) / 4, size=(3, 3, 1), mode="nearest")
    for _ in range(_CLIP_ROUNDS):
        unclipped = inside[..., None] & (np.abs(local_mean - 0.5) < 0.5 - _CLIP_MARGIN * sigma)
        if unclipped.sum() < _MIN_BLOCKS:  # too little signal far from the bounds: keep what we have
            break
        sigma = _sigma_from_details(detail[unclipped], step)
    return sigma * 255.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's and Pillow's bicubic)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return ((-0.5 <= x) & (x < 0.5)).astype(np.float64)


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.sinc(x) * np.sinc(x / 3.0) * (np.abs(x) < 3.0)


# The interpolation kernels of MATLAB's imresize, with their half-widths: real low-resolution
# cameras follow no single one, so super-resolution can train on all (data.lr_kernels).
KERNELS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bicubic": (_cubic, 2.0),
    "bilinear": (_triangle, 1.0),
    "box": (_box, 0.5),
    "lanczos3": (_lanczos3, 3.0),
}


def _resize_taps(in_length: int, scale: float, kernel: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights (both out_length × taps) of MATLAB's ``imresize`` along
    one axis: pixel centres aligned, the kernel widened by 1/scale when shrinking
    (antialiasing), weights normalised, borders mirrored (symmetric)."""
    function, half_width = KERNELS[kernel]
    out_length = round(in_length * scale)
    kernel_width = 2.0 * half_width / scale if scale < 1 else 2.0 * half_width
    # Centre of each output pixel in input coordinates (1-based, as MATLAB writes it).
    centres = np.arange(1, out_length + 1) / scale + 0.5 * (1.0 - 1.0 / scale)
    first = np.floor(centres - kernel_width / 2.0)
    indices = first[:, None] + np.arange(int(np.ceil(kernel_width)) + 2)
    distances = centres[:, None] - indices
    weights = scale * function(scale * distances) if scale < 1 else function(distances)
    weights /= weights.sum(axis=1, keepdims=True)
    # Mirror indices that fall outside the input: ..., 2, 1, | 1, 2, ..., n, | n, n-1, ...
    period = 2 * in_length
    wrapped = np.mod(indices - 1, period).astype(np.int64)
    indices = np.where(wrapped < in_length, wrapped, period - 1 - wrapped)
    return indices, weights.astype(np.float32)


def _resize_axis(image: np.ndarray, axis: int, scale: float, kernel: str) -> np.ndarray:
    moved = np.moveaxis(image, axis, 0)
    indices, weights = _resize_taps(moved.shape[0], scale, kernel)
    # One tap at a time keeps memory at one output-sized array (a 2196×1958 photo has 18 taps at ×1/4).
    extra_axes = (1,) * (moved.ndim - 1)
    resized = np.zeros((indices.shape[0], *moved.shape[1:]), dtype=np.float32)
    for tap in range(indices.shape[1]):
        resized += weights[:, tap].reshape(-1, *extra_axes) * moved[indices[:, tap]]
    return np.moveaxis(resized, 0, axis)


def _resize(image: np.ndarray, scale: float, kernel: str = "bicubic") -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an H×W or H×W×C image, got shape {image.shape}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown resampling kernel {kernel!r}; known: {', '.join(KERNELS)}")
    return _resize_axis(_resize_axis(image, 0, scale, kernel), 1, scale, kernel)


def _check_factor(factor: int) -> None:
    if not (isinstance(factor, (int, np.integer)) and factor >= 1):
        raise ValueError(f"the scale factor must be a positive integer, not {factor!r}")


def downsample(image: np.ndarray, factor: int = 4, kernel: str = "bicubic") -> np.ndarray:
    """Shrink by an integer ``factor`` with an antialiased kernel, as MATLAB's ``imresize(x, 1/factor)``:
    bicubic by default, or another of ``KERNELS`` (``box`` averages factor×factor blocks).

    Height and width are first cropped (bottom and right) to multiples of ``factor``,
    the usual "modcrop" of super-resolution benchmarks, so that down- and up-sampling
    give back the cropped size. Values are not clipped (bicubic overshoots slightly).
    """
    _check_factor(factor)
    height, width = np.shape(image)[:2]
    cropped = np.asarray(image)[: height - height % factor, : width - width % factor]
    if cropped.shape[0] == 0 or cropped.shape[1] == 0:
        raise ValueError(f"an image of {height}×{width} is smaller than the factor {factor}")
    return _resize(cropped, 1.0 / factor, kernel)


def bicubic_upsample(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """Enlarge by an integer ``factor`` with bicubic, as MATLAB's ``imresize(x, factor)``; not clipped."""
    _check_factor(factor)
    return _resize(image, float(factor))


# Noise protocols: the paper's (float noise, not clipped) and the camera's (clipped
# to [0, 1] and quantised to 8 bits, as every real noisy file is).
PROTOCOLS = ("paper", "camera")


def degrade_for_protocol(clean: np.ndarray, sigma: float, protocol: str, seed: int) -> np.ndarray:
    """``clean`` with seeded noise of ``sigma`` (0–255 scale) under one of ``PROTOCOLS``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown noise protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    noisy = add_gaussian_noise(clean, sigma, seed=seed, clip=protocol == "camera")
    return quantize(noisy, bits=8) if protocol == "camera" else noisy
