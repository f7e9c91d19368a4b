"""Fast, memory-bounded inference on whole photographs.

``apply_tiled`` runs any fully convolutional network over overlapping tiles and
keeps only the centre of each tile, so that with an overlap of at least the
network's receptive-field radius the result equals the whole-image result (up to
floating-point summation order) while memory stays bounded by the tile size. It
takes an output ``scale`` so that super-resolution networks reuse it.

``denoise`` wraps it for the package's denoisers and ``upscale`` for its
super-resolution networks; both share one runner. Measured on the 2-core AMD EPYC
(AVX-512, avx512_bf16) this project is developed on, with the official CDnCNN-B:

* channels-last inputs and ``inference_mode`` let oneDNN run every convolution
  without reordering the activations to and from NCHW: 1.4× less CPU time than the
  plain forward pass on one core, about 1.5× in wall time on two. The 64→64
  convolutions then run at about 95 GFLOP/s per core, the fp32 FMA peak, so no
  further float32 gain is left in direct convolution: fusing ReLU into the
  convolution gave 1–2%, ``torch.jit`` freezing nothing, NNPACK's Winograd fails
  on this CPU and a Winograd F(4×4, 3×3) written with PyTorch ops was slower;
* bfloat16 is about twice as fast again but costs 0.15–0.5 dB PSNR (DnCNN subtracts
  a predicted noise image, and rounding any single layer to bfloat16 costs 0.01–0.04
  dB; part of it is a colour shift, see ``scripts/output_bias.py``), so it is opt-in
  (``precision="bfloat16"``), never automatic; float16 costs
  under 0.003 dB, so CUDA runs it under autocast by default;
* tiles cost only the recomputed overlap, kept small by balancing them.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.progress import track
from torch import nn

from fundus_restore.io import channels_last, checked_float_image
from fundus_restore.pretrained import (
    WEIGHTLESS_MODELS, WeightsError, best_bundled_denoiser, default_model_name, list_models, load_model, model_card,
    model_name, resolve_device, resolve_weights, training_noise_range,
)

Precision = Literal["auto", "float32", "float16", "bfloat16"]

# The bundled super-resolution model ``upscale`` uses by default, once it is trained (issue 5).
DEFAULT_UPSCALE_MODEL = "srresnet-x4-retina"

# Input tile side: photographs up to about 2k pixels a side run as one or two tiles,
# so little overlap is recomputed (CDnCNN-B, overlap 20, on a 1696² image: tile 1024
# costs 5% more, tile 512 15%; the default U-Net's overlap of 112 makes tile 512 cost up
# to 3.5 times, see tiling_cost). A 64-channel DnCNN needs about 0.5 KiB per tile pixel
# (1.4 GiB measured for one 1696² tile, where the plain NCHW forward pass needs 2.1 GiB):
# at most ~2 GiB.
DEFAULT_TILE = 2048
# Overlap for networks whose receptive field cannot be read off their modules.
CONSERVATIVE_OVERLAP = 32
# Modules that act on each pixel alone (or are containers): they do not widen the receptive field.
_POINTWISE_MODULES = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.PReLU,
    nn.ParameterList, nn.ParameterDict, nn.ReLU6, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.BatchNorm2d, nn.PixelShuffle,
)  # fmt: skip


def _tile_spans(length: int, tile: int, overlap: int, alignment: int = 1) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis: ``(start, stop, keep_start, keep_stop)`` in input pixels.

    Each tile writes only ``[keep_start, keep_stop)``, which lies at least ``overlap``
    pixels inside the tile except at the image border, where the network's zero
    padding is the same as on the whole image. The keep intervals partition the axis.
    The tiles are balanced: the fewest tiles of at most ``tile`` pixels, each shrunk
    to the smallest equal size that covers the axis, so little work is repeated.

    With ``alignment`` a > 1 (a network with strided layers, whose grid has to be the
    whole image's) every tile starts on a multiple of a and stops at the image's end or
    a multiple of a before it, so a flipped or turned tile is aligned too; the tiles are
    then balanced within ``tile - 2 (a - 1)`` pixels and grown outwards to the grid.
    """
    if tile >= length:
        return [(0, length, 0, length)]
    growth = 2 * (alignment - 1)
    if tile - growth <= 2 * overlap:
        grid = f" plus {growth} for the network's grid of {alignment}" if growth else ""
        raise ValueError(f"tile {tile} must be larger than twice the overlap {overlap}{grid}")
    if alignment > 1:
        return [
            (start // alignment * alignment, length - (length - stop) // alignment * alignment, keep_start, keep_stop)
            for start, stop, keep_start, keep_stop in _tile_spans(length, tile - growth, overlap)
        ]
    inner = length - 2 * overlap
    count = math.ceil(inner / (tile - 2 * overlap))
    core = math.ceil(inner / count)
    size = core + 2 * overlap
    keeps = [0] + [overlap + index * core for index in range(1, count)] + [length]
    spans = []
    for index in range(count):
        start = 0 if index == 0 else min(keeps[index] - overlap, length - size)
        spans.append((start, start + size, keeps[index], keeps[index + 1]))
    return spans


@torch.inference_mode()
def apply_tiled(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale: int = 1,
    alignment: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Run ``forward`` over overlapping tiles of ``image`` (1×C×H×W) and assemble its output.

    ``forward`` maps a 1×C×h×w tile (float32, channels-last, on ``device``) to a
    1×C'×(scale·h)×(scale·w) tensor. ``tile`` and ``overlap`` are in input pixels;
    tiles are clipped to the image and start on multiples of ``alignment`` (see
    ``_tile_spans``). The result is a float32 CPU tensor
    1×C'×(scale·H)×(scale·W) in channels-last layout (so ``out[0].permute(1, 2, 0)``
    is a contiguous H×W×C' array), filled tile by tile: peak memory is the input, the
    output and one tile's activations. Runs under ``torch.inference_mode``.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a 1×C×H×W tensor, got shape {tuple(image.shape)}")
    if tile < 1 or overlap < 0 or scale < 1:
        raise ValueError(f"need tile ≥ 1, overlap ≥ 0 and scale ≥ 1, got {tile}, {overlap}, {scale}")
    height, width = image.shape[-2:]
    tiles = [
        (rows, columns)
        for rows in _tile_spans(height, tile, overlap, alignment)
        for columns in _tile_spans(width, tile, overlap, alignment)
    ]
    out: torch.Tensor | None = None
    for (top, bottom, keep_top, keep_bottom), (left, right, keep_left, keep_right) in track(
        tiles, description="tiles", disable=not progress
    ):
        # Always a copy, so a network that works in place cannot alter the caller's image.
        patch = image[:, :, top:bottom, left:right].to(
            device, torch.float32, memory_format=torch.channels_last, copy=True
        )
        result = forward(patch)
        expected = (1, scale * (bottom - top), scale * (right - left))
        if result.ndim != 4 or (result.shape[0], *result.shape[2:]) != expected:
            raise ValueError(
                f"the network turned a {tuple(patch.shape)} tile into {tuple(result.shape)}, "
                f"expected 1×C×{expected[1]}×{expected[2]} (scale {scale})"
            )
        if out is None:
            # Allocated as N×H×W×C and viewed as N×C×H×W: the caller gets an image array without a copy.
            out = torch.empty((1, scale * height, scale * width, result.shape[1])).permute(0, 3, 1, 2)
        out[:, :, scale * keep_top : scale * keep_bottom, scale * keep_left : scale * keep_right] = result[
            :,
            :,
            scale * (keep_top - top) : scale * (keep_bottom - top),
            scale * (keep_left - left) : scale * (keep_right - left),
        ]
    assert out is not None  # there is always at least one tile
    return out


def default_overlap(model: nn.Module) -> int:
    """An overlap at which tiling ``model`` is exact: its receptive-field radius in input pixels.

    A model may state it as a ``receptive_field_radius`` attribute. Otherwise, for a
    network made only of stride-1 convolutions and pointwise layers (DnCNN, the skip
    autoencoder, a conv + PixelShuffle upsampler), the sum of its convolutions' radii
    bounds the radius of the longest path through it; anything else gets
    ``CONSERVATIVE_OVERLAP``.
    """
    declared = getattr(model, "receptive_field_radius", None)
    if declared is not None:
        return int(declared)
    radius = 0
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.stride == (1, 1):
            radius += max(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size))
        elif module is not model and not isinstance(module, _POINTWISE_MODULES):
            return CONSERVATIVE_OVERLAP
    return radius


def tile_margin(model: nn.Module) -> int:
    """The pixels across a tile of ``model`` that are not its core (what it keeps): its default
    overlap on both sides, and what a strided network's tiles may grow to keep its grid."""
    return 2 * default_overlap(model) + 2 * (getattr(model, "tile_alignment", 1) - 1)


def smallest_tile(model: nn.Module) -> int:
    """The smallest ``tile`` (input pixels) ``model`` can run at with its default overlap."""
    return tile_margin(model) + 1


def tiling_cost(model: nn.Module, tile: int | None) -> float:
    """Compute of ``model`` tiled at ``tile`` (input pixels) relative to one whole-image pass,
    for an image larger than the tile: each tile is run whole and keeps only its core (at
    worst ``tile - tile_margin`` across; balanced tiles may keep a little more)."""
    if tile is None:
        return 1.0
    return (tile / (tile - tile_margin(model))) ** 2


def check_run_settings(model: nn.Module, *, tile: int | None, device: str | torch.device) -> nn.Module:
    """``model``, after refusing a ``device`` that is not here or a ``tile`` it cannot run
    at: a batch then stops before its first photo instead of failing on every one."""
    resolve_device(device)
    if tile is not None and tile < smallest_tile(model):
        raise ValueError(
            f"tile {tile} is too small for {model_name(model)}: at least {smallest_tile(model)} pixels "
            f"(its overlap of {default_overlap(model)} on both sides)"
        )
    return model


def input_channels(model: nn.Module) -> int | None:
    """Number of image channels ``model`` takes, from its config or its first convolution."""
    config = getattr(model, "config", {})
    if "channels" in config:
        return int(config["channels"])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first_conv is None else first_conv.in_channels


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The compute dtype: ``"auto"`` is float16 on CUDA and float32 elsewhere (see the module notes)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision must be one of auto, {', '.join(dtypes)}; got {precision!r}")
    if precision == "bfloat16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError("precision='bfloat16' needs a CPU with native bfloat16 (AVX512-BF16 or AMX)")
    return dtypes[precision]


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` ready for inference on ``device``: batch norm folded where the model
    can, eval mode. The caller's model is never changed; it is copied only when it is
    in training mode or elsewhere than ``device`` (a copy costs 0.01–0.3 s here).
    The weights need no channels-last copy: oneDNN follows the input's layout."""
    prepared = model.fold_batch_norm() if hasattr(model, "fold_batch_norm") else model
    tensors = itertools.chain(prepared.parameters(), prepared.buffers())
    needs_change = any(m.training for m in prepared.modules()) or any(t.device != device for t in tensors)
    if prepared is model and needs_change:
        prepared = copy.deepcopy(model)
    return prepared.eval().to(device)


@functools.lru_cache(maxsize=8)
def _prepare_file(weights: Path, modified_ns: int, device: torch.device) -> nn.Module:
    return prepare_model(load_model(weights), device)


def prepared_from_file(weights: Path, device: torch.device) -> nn.Module:
    """The prepared model of a weights file, loaded once per file version and device,
    so that a batch over thousands of photos reads the weights once."""
    return _prepare_file(weights.resolve(), weights.stat().st_mtime_ns, device)


def grey_through_colour(image: np.ndarray, channels: int | None) -> bool:
    """Whether H×W×C ``image`` is grey (one channel, e.g. a red-free photograph) and a
    model taking ``channels`` (``input_channels``) takes colour."""
    return channels == 3 and image.shape[2] == 1


def _channel_axis_back(output: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """The H×W×C ``output`` with its channels where the input had them (none for a grey H×W input)."""
    return output[..., 0] if channel_axis is None else np.moveaxis(output, -1, channel_axis)


def _checked_image(image: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is not None and image.shape[2] != channels and not grey_through_colour(image, channels):
        hint = " (channels first? pass channel_axis=0)" if image.shape[0] in (1, channels) else ""
        raise ValueError(f"the model takes {channels}-channel images, got {image.shape[2]} channels{hint}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    pixels = image.astype(np.float32, copy=False)
    # torch takes neither negative strides (a flipped view, e.g. BGR to RGB) nor, without a warning, read-only memory.
    return pixels.copy() if any(stride < 0 for stride in pixels.strides) or not pixels.flags.writeable else pixels


def _prepared(model: str | Path | nn.Module | None, default_name: Callable[[], str], device: torch.device) -> nn.Module:
    """``model`` prepared for ``device``; a name or file is loaded once and cached, None means ``default_name()``."""
    if isinstance(model, nn.Module):
        return prepare_model(model, device)
    if model in WEIGHTLESS_MODELS:
        return prepare_model(load_model(model), device)
    return prepared_from_file(resolve_weights(default_name() if model is None else model), device)


def upscale_factor(model: nn.Module) -> int:
    """The integer factor by which a super-resolution ``model`` enlarges images (its config's ``scale``)."""
    scale = getattr(model, "config", {}).get("scale")
    if not isinstance(scale, int) or scale < 2:
        raise ValueError(f"{model_name(model)} is not a super-resolution model: no integer 'scale' ≥ 2 in its config")
    return scale


def default_upscale_model_name(scale: int | None = None) -> str:
    """The bundled super-resolution model used when none is given (``DEFAULT_UPSCALE_MODEL``,
    or for another ``scale`` the first bundled model of that scale); refused where none is."""
    candidates = [DEFAULT_UPSCALE_MODEL] + [name for name in list_models() if name != DEFAULT_UPSCALE_MODEL]
    for name in candidates:
        card = model_card(name) if name in list_models() else {}
        if card.get("task") == "upscale" and scale in (None, card.get("config", {}).get("scale")):
            return name
    wanted = "super-resolution" if scale is None else f"x{scale} super-resolution"
    raise WeightsError(
        f"no {wanted} model is bundled: give a .safetensors file of one (upscale --model, restore --upscale-model)"
    )


def check_denoiser(network: nn.Module) -> nn.Module:
    """``network`` if it is a denoiser; a super-resolution model or a vessel segmenter
    (by its card's task, or for a model without one by its architecture's) is refused
    with a ``ValueError``, since its output is no denoised photograph. A module of no
    registered architecture is taken as a denoiser."""
    task = getattr(network, "task", "denoise")
    if task != "denoise":
        raise ValueError(f"{model_name(network)} is not a denoiser: its task is {task!r}")
    return network


def load_denoiser(model: str | Path | None = None, channels: int = 3, *, small_photos: bool = False) -> nn.Module:
    """A denoiser on the CPU: a bundled name, a safetensors file, or None for the bundled
    default of ``channels``-channel images (``default_model_name``, of small photographs
    with ``small_photos``); anything else is refused here, before any image is read
    (``check_denoiser``)."""
    if model is None:
        model = default_model_name(channels, small_photos=small_photos)
    return check_denoiser(load_model(model))


def load_upscaler(model: str | Path | None = None, scale: int | None = None) -> nn.Module:
    """A super-resolution model on the CPU: a bundled name, a safetensors file, or None for
    the bundled default (of ``scale``, when given); a file that is not a super-resolution
    model, or not of ``scale``, is refused here, before any image is read
    (``WeightsError`` / ``ValueError``)."""
    network = load_model(default_upscale_model_name(scale) if model is None else model)
    factor = upscale_factor(network)
    if scale is not None and factor != scale:
        raise ValueError(f"{getattr(network, 'name', model)} upscales by {factor}, not by the asked {scale}")
    return network


# How far an input's estimated noise sigma (0–255 scale) may lie outside the range a
# model was trained on before the check speaks: a factor and a margin. Measured on DRIVE
# test, the sigma-25 default falls 0.6 dB behind the official blind CDnCNN-B at sigma 15
# and is still ahead at 35; the margin covers a clean 8-bit photo's reading (about 1.5).
NOISE_RANGE_FACTOR = 1.25
NOISE_RANGE_MARGIN = 2.0


def suits_noise_level(noise_range: tuple[float, float], sigma: float) -> bool:
    """Whether a model trained on noise sigma in ``noise_range`` suits a photo at ``sigma``
    (0–255 scale), the range widened by ``NOISE_RANGE_FACTOR`` and ``NOISE_RANGE_MARGIN``."""
    low, high = noise_range
    return low / NOISE_RANGE_FACTOR - NOISE_RANGE_MARGIN <= sigma <= high * NOISE_RANGE_FACTOR + NOISE_RANGE_MARGIN


def noise_level_mismatch(
    image: np.ndarray,
    model: nn.Module,
    mask: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    sigma: float | None = None,
) -> str | None:
    """Why ``model`` may not suit ``image``'s noise level, or None when it does.

    Compares ``estimate_noise_sigma(image, mask)`` (use the field of view as ``mask``)
    with the noise range the model was trained on (``model.noise_range``, from its
    card; no card, no check; see ``suits_noise_level``). ``mask`` may be a function of
    the image (``fov_mask``): it is then computed only when there is a range to check
    against. ``sigma`` (0–255 scale) is that estimate where it is already made (for a
    denoiser told the level): it is then not made again. A denoiser trained at sigma 25
    smooths away detail at lower levels and leaves noise at higher ones (the message
    names the best bundled denoiser that suits the photo, if any); a super-resolution
    model trained on noise-free input sharpens noise.
    """
    from fundus_restore.degrade import estimate_noise_sigma

    trained = getattr(model, "noise_range", None)
    if trained is None:
        return None
    if sigma is None:
        sigma = estimate_noise_sigma(image, mask(image) if callable(mask) else mask)
    if suits_noise_level(trained, sigma):
        return None
    name = model_name(model)
    found = f"noise sigma about {sigma:.1f} (estimated)"
    if getattr(model, "config", {}).get("scale", 1) > 1:
        behind = getattr(model, "lr_denoiser", None)
        trained_on = f"{behind}'s outputs" if behind else "noise-free input"
        return (
            f"{found}, but {name} was trained on {trained_on}: it may sharpen the noise into false detail; "
            "denoise first (fundus-restore restore)"
        )
    low, high = trained
    seen = f"sigma {low:g}" if low == high else f"sigma {low:g}-{high:g}"
    effect = "it may smooth away fine detail" if sigma < low else "noise may remain"
    def fits(card: dict) -> bool:
        noise_range = training_noise_range(card)
        return noise_range is not None and suits_noise_level(noise_range, sigma)

    better = best_bundled_denoiser([other for other in list_models() if other != name], fits, channels=image.shape[-1])
    if better:
        suggestion = f"the bundled {better} suits it"
    elif low == high:
        suggestion = "a denoiser trained on a range of sigma suits it better"
    else:
        suggestion = "no bundled denoiser was trained at this level"
    return f"{found}, outside the {seen} {name} was trained on: {effect}; {suggestion}"


def estimated_noise_level(image: np.ndarray) -> float:
    """The noise sigma of an H×W×C ``image`` on the [0, 1] scale, for a denoiser told the
    level: ``estimate_noise_sigma`` inside the field of view, or over the whole image
    where none is found. It is within 1.1 (of 255) of the true sigma 5–50 on every DRIVE
    test and HEI-MED validation photo, noise clipped and quantised to 8 bits or not
    (``docs/results.md``, "Other noise levels")."""
    from fundus_restore.degrade import estimate_noise_sigma
    from fundus_restore.fov import fov_mask

    try:
        return estimate_noise_sigma(image, fov_mask(image)) / 255.0
    except ValueError:  # no whole 2×2 block inside a field of view
        return estimate_noise_sigma(image) / 255.0


def dihedral_ensemble(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` averaged over the 8 quarter turns and mirror images of its N×C×H×W input.

    Each output is turned back before the average (the "x8 self-ensemble" of EDSR,
    KAIR and BasicSR): 8 times the compute for a steadier estimate. A flip or turn
    keeps the receptive field's radius, so tiling stays exact.
    """

    def averaged(patch: torch.Tensor) -> torch.Tensor:
        total = None
        for turns, mirror in itertools.product(range(4), (False, True)):
            view = torch.rot90(patch, turns, dims=(2, 3))
            view = torch.flip(view, dims=(3,)) if mirror else view
            out = forward(view.contiguous(memory_format=torch.channels_last)).float()
            out = torch.flip(out, dims=(3,)) if mirror else out
            out = torch.rot90(out, -turns, dims=(2, 3))
            total = out if total is None else total + out
        return total / 8

    return averaged


def _run_network(
    image: np.ndarray,
    model: str | Path | nn.Module | None,
    *,
    default_name: Callable[[], str],
    super_resolution: bool,
    tile: int | None,
    overlap: int | None,
    device: str,
    precision: Precision,
    progress: bool,
    ensemble: bool,
    sigma: float | None = None,
) -> np.ndarray:
    """Shared by ``denoise`` and ``upscale``: prepare the model, check the image, run it tiled."""
    checked_float_image(image)  # first: a 0-255 image is the problem, whatever else is given
    if sigma is not None and not 0 <= sigma <= 1:  # e.g. 15 meant as 15/255: the output would be garbage
        raise ValueError(f"sigma is on the image's [0, 1] scale (sigma 15 of 255 is {15 / 255:.4f}), got {sigma:g}")
    for name, pixels in (("tile", tile), ("overlap", overlap)):
        if pixels is not None and (isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 0):
            raise ValueError(f"{name} is a whole number of pixels, got {pixels!r}")
    torch_device = resolve_device(device)
    network = _prepared(model, default_name, torch_device)
    if super_resolution:
        scale = upscale_factor(network)
    else:
        check_denoiser(network)
        scale = 1
    channels = input_channels(network)
    pixels = _checked_image(image, channels)
    grey = grey_through_colour(pixels, channels)
    if grey:  # the grey level in each colour channel; the three outputs are averaged back to one
        pixels = np.repeat(pixels, 3, axis=2)
    told_level = getattr(network, "needs_noise_level", False)
    # deepinv's contract lets a blind model take sigma and ignore it: for this package's own
    # architectures, which say whether they use it, that is worth a word (a user's module may use it).
    if sigma is not None and not told_level and getattr(network, "architecture", None) is not None:
        warnings.warn(f"{model_name(network)} is blind: the sigma given is ignored", stacklevel=3)
    if sigma is None and told_level:
        sigma = estimated_noise_level(pixels)
    dtype = resolve_precision(precision, torch_device)

    def forward(patch: torch.Tensor) -> torch.Tensor:
        with torch.autocast(torch_device.type, dtype=dtype, enabled=dtype != torch.float32):
            return network(patch) if sigma is None else network(patch, sigma)

    # H×W×C memory is a channels-last 1×C×H×W tensor: the view costs no copy.
    source = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    result = apply_tiled(
        dihedral_ensemble(forward) if ensemble else forward,
        source,
        # An upscaler's activations grow with the output: shrink its default input tile
        # so that a ×4 model's memory stays near a denoiser's (not 16× more).
        tile=DEFAULT_TILE // scale if tile is None else tile,
        overlap=default_overlap(network) if overlap is None else overlap,
        scale=scale,
        # A network with strided layers (the residual U-Net) states the grid its tiles must keep.
        alignment=getattr(network, "tile_alignment", 1),
        device=torch_device,
        progress=progress,
    )
    output = result[0].permute(1, 2, 0).numpy()
    return output.mean(axis=2, keepdims=True) if grey else output


def denoise(
    image: np.ndarray,
    model: str | Path | nn.Module | None = None,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    device: str = "auto",
    sigma: float | None = None,
    precision: Precision = "auto",
    ensemble: bool = False,
    progress: bool = False,
    channel_axis: int | None = -1,
) -> np.ndarray:
    """Denoise a float32 H×W×C image on the [0, 1] scale; returns float32 H×W×C.

    ``model`` is a bundled model name, a safetensors file, an ``nn.Module``, or None
    for the default bundled denoiser of the image's channels (``default_model_name``:
    a grey image, e.g. a red-free photograph, gets the grey one). A grey image through
    a colour model runs as the same level in all three channels, the three outputs
    averaged back to one, which removes far less noise than the grey model does
    (``python scripts/tables.py --grey``). Models loaded by name are prepared once per
    device and cached. ``tile`` (input pixels, default ``DEFAULT_TILE``) bounds the
    memory, at the cost of recomputing the overlap (``tiling_cost``); ``overlap``
    defaults to the model's receptive-field radius, which makes the tiled result equal
    the whole-image one. ``sigma`` (on the [0, 1] scale) is passed to models that take
    it; a model told the noise level (``needs_noise_level``) gets the photo's
    ``estimated_noise_level`` when it is None. ``precision`` is the compute dtype:
    ``"auto"`` is float32 on the CPU (bfloat16 costs CDnCNN-B 0.15–0.5 dB) and float16
    autocast on CUDA. Values a little outside [0, 1] (unclipped noise) are taken and not
    clipped, in the input or the output; an image on another scale (0-255, [-1, 1]) is
    refused. ``ensemble`` averages the outputs for the 8 flips and quarter turns of
    the input (``dihedral_ensemble``): 8 times slower, a little more accurate.
    ``progress`` shows a progress bar over the tiles. ``channel_axis`` is where the
    channels lie, as in scikit-image (0 for C×H×W); None takes an H×W grey image and
    returns H×W.
    """
    pixels = channels_last(image, channel_axis)
    output = _run_network(
        pixels,
        model,
        default_name=functools.partial(default_model_name, channels=pixels.shape[-1]),
        super_resolution=False,
        sigma=sigma,
        tile=tile,
        overlap=overlap,
        device=device,
        precision=precision,
        ensemble=ensemble,
        progress=progress,
    )
    return _channel_axis_back(output, channel_axis)


def upscale(
    image: np.ndarray,
    model: str | Path | nn.Module | None = None,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    device: str = "auto",
    precision: Precision = "auto",
    ensemble: bool = False,
    progress: bool = False,
    channel_axis: int | None = -1,
) -> np.ndarray:
    """Super-resolve a float32 H×W×C image on [0, 1]; returns float32 (s·H)×(s·W)×C.

    ``s`` is the model's ``scale`` (2 or 4 for SRResNet). ``model`` is a bundled
    name, a safetensors file or an ``nn.Module``; None means the bundled default
    super-resolution model, and is refused with a ``WeightsError`` while none is
    bundled. Tiling, overlap, device, precision, ensemble and progress work as in ``denoise``
    (``tile`` and ``overlap`` in input pixels; the default tile is
    ``DEFAULT_TILE // s``): the tiled result equals the whole-image one. The output
    is not clipped. A grey image through a colour model runs as in ``denoise``, and
    ``channel_axis`` works as there.
    """
    output = _run_network(
        channels_last(image, channel_axis),
        model,
        default_name=default_upscale_model_name,
        super_resolution=True,
        tile=tile,
        overlap=overlap,
        device=device,
        precision=precision,
        ensemble=ensemble,
        progress=progress,
    )
    return _channel_axis_back(output, channel_axis)
