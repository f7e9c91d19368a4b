"""Image-quality metrics (PSNR, SSIM), optionally per channel and inside a mask.

One implementation in torch: ``ssim_map`` is the differentiable core that a loss
reuses, and the numpy-facing metrics call it in float64, so a metric and its loss
cannot drift apart. SSIM follows ``skimage.metrics.structural_similarity`` with
``use_sample_covariance=False``: Gaussian window (sigma 1.5, truncated at 3.5
sigma, 11×11) or uniform 7×7, constants K1=0.01 and K2=0.03, and the map's border
of (win_size-1)//2 pixels left out of the mean.

Images are floats on [0, ``data_range``], H×W (grey) or 3-D with their channels on
``channel_axis`` (last by default; 0 for torch's C×H×W), as in scikit-image.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import fft

from fundus_restore.io import channels_last, checked_bool_mask, checked_float_image

_K1 = 0.01
_K2 = 0.03
_GAUSSIAN_TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's cut-off, in sigmas, as skimage uses it
_UNIFORM_WIN_SIZE = 7
_CHANNEL_NAMES = ("r", "g", "b")


def ssim_window_size(*, gaussian_weights: bool = True, sigma: float = 1.5) -> int:
    """skimage's default window: 2·round(3.5·sigma)+1 for Gaussian weights (11 for sigma 1.5), else 7."""
    if gaussian_weights:
        return 2 * int(_GAUSSIAN_TRUNCATE * sigma + 0.5) + 1
    return _UNIFORM_WIN_SIZE


def _window_1d(win_size: int, gaussian_weights: bool, sigma: float) -> list[float]:
    """Normalised 1-D window weights, as Python floats (no device round trips when applied)."""
    offsets = np.arange(win_size) - (win_size - 1) / 2
    weights = np.exp(-0.5 * (offsets / sigma) ** 2) if gaussian_weights else np.ones(win_size)
    return (weights / weights.sum()).tolist()


def _filter_valid_axis(images: torch.Tensor, window: list[float], dim: int) -> torch.Tensor:
    """Correlate along ``dim`` with ``window``, keeping only positions where it lies inside the image.

    A sum of shifted slices: on CPU several times faster than a depthwise
    ``conv2d`` (which has no fast float64 path) and differentiable all the same.
    """
    length = images.shape[dim] - len(window) + 1
    filtered = images.narrow(dim, 0, length) * window[0]
    for offset, weight in enumerate(window[1:], start=1):
        filtered.add_(images.narrow(dim, offset, length), alpha=weight)
    return filtered


def _filter_valid(images: torch.Tensor, window: list[float]) -> torch.Tensor:
    """Separable filtering of every channel of N×C×H×W over H and W, without padding."""
    return _filter_valid_axis(_filter_valid_axis(images, window, -2), window, -1)


def _ssim_valid(x: torch.Tensor, y: torch.Tensor, window: list[float], data_range: float) -> torch.Tensor:
    """The SSIM formula on the five windowed moments, at positions where the window fits."""
    # One stacked tensor: 5× fewer operations than filtering each moment alone (fewer
    # kernel launches on GPU, fewer thread barriers on a busy CPU), at ~0.7 GB more peak
    # memory for a full-size photo in float64.
    moments = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.split(x.shape[1], dim=1)
    var_x = mean_xx - mean_x**2
    var_y = mean_yy - mean_y**2
    cov_xy = mean_xy - mean_x * mean_y
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return numerator / denominator


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: float = 1.0,
    gaussian_weights: bool = True,
    sigma: float = 1.5,
    win_size: int | None = None,
) -> torch.Tensor:
    """Per-pixel SSIM of two N×C×H×W tensors, per channel: N×C×(H-2p)×(W-2p), p = (win_size-1)//2.

    Only positions whose window lies wholly inside the image are returned, which are
    exactly those skimage averages (it crops p pixels off its padded map). Computed in
    the inputs' dtype and differentiable, for use as a loss.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two N×C×H×W tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if gaussian_weights and not sigma > 0:
        raise ValueError(f"the Gaussian window's sigma must be positive, got {sigma:g}")
    win_size = win_size or ssim_window_size(gaussian_weights=gaussian_weights, sigma=sigma)
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and at least 3, not {win_size}")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"images of {x.shape[-2]}×{x.shape[-1]} are smaller than the {win_size}×{win_size} SSIM window")
    return _ssim_valid(x, y, _window_1d(win_size, gaussian_weights, sigma), data_range)


def _as_tensors(
    reference: np.ndarray, restored: np.ndarray, data_range: float = 1.0, channel_axis: int | None = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of one shape as float64 1×C×H×W tensors, refused where they do not lie
    on about [0, ``data_range``] (``checked_float_image``). An H×W image is grey, whatever
    ``channel_axis`` says; a 3-D one has its channels on ``channel_axis``."""
    reference = np.asarray(reference)
    restored = np.asarray(restored)
    if reference.shape != restored.shape:
        raise ValueError(f"reference {reference.shape} and restored {restored.shape} differ in shape")
    if reference.ndim not in (2, 3):
        raise ValueError(f"expected H×W or H×W×C images, got shape {reference.shape}")
    # An image 255 times too large for data_range gives a PSNR off by 48 dB, silently.
    checked_float_image(reference, "reference", data_range)
    checked_float_image(restored, "restored", data_range)

    def to_tensor(image: np.ndarray) -> torch.Tensor:
        pixels = channels_last(image, None if image.ndim == 2 else channel_axis)
        return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float64)).permute(2, 0, 1).contiguous()[None]

    return to_tensor(reference), to_tensor(restored)


def _checked_mask(mask: np.ndarray | None, shape: tuple[int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = checked_bool_mask(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {shape}")
    return torch.from_numpy(mask)


def _channel_means(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over pixels of a 1×C×h×w map, per channel, inside the mask if given.

    A mask of the full image size is cropped centrally to the map (the SSIM map lacks a border).
    """
    values = values[0]
    if mask is None:
        return values.mean(dim=(1, 2))
    pad_h = (mask.shape[0] - values.shape[1]) // 2
    pad_w = (mask.shape[1] - values.shape[2]) // 2
    inside = mask[pad_h : pad_h + values.shape[1], pad_w : pad_w + values.shape[2]]
    if not inside.any():
        raise ValueError("the mask selects no pixel (SSIM also leaves out a border of (win_size-1)//2 pixels)")
    return values[:, inside].mean(dim=1)


def _psnr_from_mse(mse: torch.Tensor, data_range: float) -> torch.Tensor:
    # Identical images give mse 0 and an infinite PSNR.
    return 10.0 * torch.log10(data_range**2 / mse)


def psnr(
    reference: np.ndarray,
    restored: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
    per_channel: bool = False,
    channel_axis: int | None = -1,
) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB of H×W(×C) images: 10·log10(data_range² / MSE).

    The MSE is over all channels of the pixels inside ``mask`` (bool H×W), or of the
    whole image. With ``per_channel`` an array of one PSNR per channel. On 8-bit data
    scaled to [0, 1] this is the usual 255-peak PSNR of the 0–255 values.
    ``channel_axis`` is where a 3-D image keeps its channels (0 for C×H×W); an H×W
    image is grey.
    """
    x, y = _as_tensors(reference, restored, data_range, channel_axis)
    mse = _channel_means((x - y) ** 2, _checked_mask(mask, x.shape[-2:]))
    if per_channel:
        return _psnr_from_mse(mse, data_range).numpy()
    return float(_psnr_from_mse(mse.mean(), data_range))


def band_mse(
    reference: np.ndarray,
    restored: np.ndarray,
    edges: list[float],
    *,
    data_range: float = 1.0,
    channel_axis: int | None = -1,
) -> np.ndarray:
    """Mean squared error of each frequency band ``[edges[i], edges[i + 1])`` of the error,
    over the whole H×W(×C) image, as an array of ``len(edges) - 1`` values.

    A coefficient's frequency is the larger of its two axes' (cycles per pixel, 0 to 0.5),
    so the bands are square rings around zero frequency; ``edges`` must rise from 0 and
    end above the highest frequency (0.5 will do). The split uses the orthonormal DCT
    (mirror boundaries, so the image's edges add no spurious high frequencies), and the
    bands add up to the image's MSE. With ``restored`` all zeros they are the
    reference's own energy per band. ``channel_axis`` as in ``psnr``.
    """
    bands = np.asarray(edges, dtype=np.float64)
    if bands.ndim != 1 or len(bands) < 2 or bands[0] != 0 or np.any(np.diff(bands) <= 0) or bands[-1] < 0.5:
        raise ValueError(f"edges must rise from 0 to at least 0.5 cycles per pixel, got {list(edges)}")
    x, y = _as_tensors(reference, restored, data_range, channel_axis)
    coefficients = fft.dctn((y - x)[0].numpy(), axes=(1, 2), norm="ortho") ** 2
    # DCT coefficient k of an axis of length n is the frequency k / (2 n) cycles per pixel.
    rows, columns = (np.arange(n) / (2 * n) for n in coefficients.shape[1:])
    band = np.digitize(np.maximum(rows[:, None], columns[None, :]), bands) - 1
    energy = coefficients.sum(axis=0)
    return np.bincount(band.ravel(), energy.ravel(), minlength=len(bands) - 1)[: len(bands) - 1] / coefficients.size


def band_psnr(
    reference: np.ndarray,
    restored: np.ndarray,
    cutoff: float,
    *,
    data_range: float = 1.0,
    channel_axis: int | None = -1,
) -> tuple[float, float]:
    """PSNR in dB of the error's frequencies below and above ``cutoff`` (cycles per pixel,
    0 < cutoff < 0.5) on either axis, over the whole H×W(×C) image (``band_mse``).

    For ×s super-resolution, ``cutoff = 1 / (2 s)`` is the low-resolution grid's Nyquist
    frequency: the band below is what the small image carries, the band above what an
    upscaler has to synthesise. The two bands' squared errors add up to the image's:
    ``10**(-below/10) + 10**(-above/10) == 10**(-psnr/10)`` (data range 1). With
    ``restored`` all zeros the value above is the best PSNR any method reaches that
    recovers the band below exactly and invents nothing above it.
    """
    if not 0.0 < cutoff < 0.5:
        raise ValueError(f"cutoff must lie between 0 and 0.5 cycles per pixel, got {cutoff}")
    below, above = band_mse(reference, restored, [0.0, cutoff, 0.5], data_range=data_range, channel_axis=channel_axis)
    return (
        float(_psnr_from_mse(torch.tensor(below), data_range)),
        float(_psnr_from_mse(torch.tensor(above), data_range)),
    )


def ssim(
    reference: np.ndarray,
    restored: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    data_range: float = 1.0,
    per_channel: bool = False,
    gaussian_weights: bool = True,
    sigma: float = 1.5,
    win_size: int | None = None,
    channel_axis: int | None = -1,
) -> float | np.ndarray:
    """Mean SSIM of H×W(×C) images, as skimage's ``structural_similarity(..., channel_axis=-1,
    use_sample_covariance=False)`` with the same window settings (default: Gaussian, sigma 1.5).

    With ``mask`` (bool H×W) the mean of the SSIM map over the masked pixels that are
    not in the window border; with ``per_channel`` an array of one SSIM per channel.
    A given ``win_size`` truncates the Gaussian window to that size (skimage keeps 3.5 sigma).
    ``channel_axis`` as in ``psnr``.
    """
    x, y = _as_tensors(reference, restored, data_range, channel_axis)
    values = ssim_map(x, y, data_range=data_range, gaussian_weights=gaussian_weights, sigma=sigma, win_size=win_size)
    similarity = _channel_means(values, _checked_mask(mask, x.shape[-2:]))
    return similarity.numpy() if per_channel else float(similarity.mean())


def image_quality(
    reference: np.ndarray, restored: np.ndarray, *, mask: np.ndarray | None = None, channel_axis: int | None = -1
) -> dict[str, float]:
    """The numbers tables print: ``psnr`` and ``ssim`` (default settings) over the whole
    image and per channel (``psnr_r``, ``ssim_g``, ...; colour images only), and with a
    FOV mask the same inside it (``psnr_fov``, ``ssim_fov``, ``psnr_fov_r``, ...).
    ``channel_axis`` as in ``psnr``."""
    x, y = _as_tensors(reference, restored, channel_axis=channel_axis)
    squared_error = (x - y) ** 2
    structural = ssim_map(x, y)
    regions = {"": None}
    if mask is not None:
        regions["_fov"] = _checked_mask(mask, x.shape[-2:])
    quality: dict[str, float] = {}
    for suffix, region in regions.items():
        mse = _channel_means(squared_error, region)
        similarity = _channel_means(structural, region)
        quality[f"psnr{suffix}"] = float(_psnr_from_mse(mse.mean(), 1.0))
        quality[f"ssim{suffix}"] = float(similarity.mean())
        if x.shape[1] == len(_CHANNEL_NAMES):
            for name, channel_psnr, channel_ssim in zip(_CHANNEL_NAMES, _psnr_from_mse(mse, 1.0), similarity):
                quality[f"psnr{suffix}_{name}"] = float(channel_psnr)
                quality[f"ssim{suffix}_{name}"] = float(channel_ssim)
    return quality
