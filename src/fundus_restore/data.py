"""Training data: noisy/clean patch batches streamed from fundus photographs.

Design, and why:

* **Split by image.** ``split_images`` holds whole photographs out for validation
  (a seeded draw or an explicit list), so no validation pixel was ever trained on.
* **Every batch is a pure function of (seed, step).** A batch is built from a small
  group of photographs with a random generator seeded by its step, so resuming at
  step k regenerates exactly the batches an uninterrupted run would have seen,
  with no stream state to save beyond the step.
* **Bounded memory, few reads.** Photographs are read a group at a time
  (``images_per_group``) and each gives ``patches_per_image`` patches before the
  group is dropped: a 2196×1958 JPEG costs about 50 ms to decode, so it must feed
  many patches. Only the current group is held, whatever the number of images.
* **Lanes.** Steps are dealt round-robin to ``lanes`` (one per DataLoader worker,
  as DataLoader collects worker outputs round-robin) and, under
  ``torch.distributed``, to ranks. Each (rank, lane) reads its own share of the
  image sequence, so workers and ranks never read the same group twice. A batch
  therefore depends on the number of workers and ranks: resuming is exact with the
  same ones.
* **Noise on the fly**, fixed sigma or uniform in a range (blind models), and the
  ``camera`` protocol on a fraction of patches: clipped to [0, 1] and quantised to
  8 bits as every real noisy file is. A model trained without it leaves the black
  surround as biased noise (clipping turns zero-mean noise on black into a
  positive offset), which costs the official CDnCNN-B up to 4 dB on such input.
* **Super-resolution pairs** (``scale`` > 1): the input is the clean patch shrunk
  by antialiased bicubic (MATLAB's ``imresize``), cut from a window wider by the
  kernel's reach so the low-resolution patch equals that of the whole photograph,
  then noised like a denoiser's input (sigma 0: plain low resolution).
* **Vessel maps as targets** (``targets="vessels"``, to train a segmenter): the
  target is the expert vessel map beside each photograph (DRIVE's layout), cut and
  turned with the photo; the input is the photo, noised with ``sigma`` (0: as is)
  so that the segmenter also works on noisy and restored photographs.
* **Sampling by image or by area.** By default every photograph gives the same number
  of patches, so a pixel of a 565×584 DRIVE photograph is drawn about 13 times as often
  as one of a 2196×1958 HEI-MED photograph. ``sampling="area"`` draws photographs in
  proportion to their pixel count (from the file header), so that every pixel is
  equally likely, whatever the mix of cameras.
* **Chosen channels** (``channels``, e.g. ``(1,)``): only those channels of each
  photograph are kept, after its field of view is found on all of them. The green
  channel alone trains a grey denoiser for red-free photographs, which are taken
  through a green filter.
* Patch centres are drawn inside the field of view, except a ``border_fraction``
  drawn anywhere in the FOV-cropped photograph, so the model also learns the
  border and the black surround.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fundus_restore.degrade import KERNELS, PROTOCOLS, degrade_for_protocol, downsample, quantize
from fundus_restore.evaluate import MIN_SCORED_SIZE, centre_square, check_fov_size, load_clean
from fundus_restore.fov import crop_to_fov
from fundus_restore.io import ImageFileError, read_header_of_size, read_image
from fundus_restore.vessels import image_scale

# Tags that keep the generators of the image order, the batches and the split apart.
_ORDER, _BATCH, _SPLIT, _SHRINK = 0, 1, 2, 3
# Tries to draw a patch centre inside the field of view before taking any place:
# the FOV covers most of its crop, so this rarely runs out.
_CENTRE_TRIES = 20
TARGETS = ("clean", "vessels")
SAMPLINGS = ("image", "area")
# Reach of the antialiased bicubic kernel beyond a pixel when shrinking by s: 2 output pixels, 2·s input pixels.
_BICUBIC_REACH = 2


@dataclass(frozen=True)
class PatchSettings:
    """How training patches are cut and degraded (sigma on the 0–255 scale).

    With ``scale`` > 1 the input is the patch shrunk ``scale`` times (super-resolution)
    and ``patch_size`` is the size of the high-resolution target.
    """

    patch_size: int = 80
    sigma: float | tuple[float, float] = 25.0
    clip_probability: float = 0.5
    border_fraction: float = 0.2
    patches_per_image: int = 128
    images_per_group: int = 4
    scale: int = 1
    targets: str = "clean"  # or "vessels": expert vessel maps (1 channel) for a segmenter
    # (low, high): each clean patch's channels are multiplied by gains drawn from this
    # range and clipped to [0, 1], so that bright, saturated channels (a red channel
    # near 1) are seen under both noise protocols. None: photographs as they are.
    gain: tuple[float, float] | None = None
    # "image": every photograph gives as many patches | "area": photographs are drawn in
    # proportion to their pixel count, so every pixel is equally likely.
    sampling: str = "image"
    # With scale > 1, the kernels that shrink the patches (``degrade.KERNELS``), one drawn
    # per patch: real low-resolution cameras follow no single one.
    lr_kernels: tuple[str, ...] = ("bicubic",)
    # The photo channels kept, e.g. (1,): the green channel, for a grey (red-free) model. None: all.
    channels: tuple[int, ...] | None = None
    # Factors by which whole photographs are shrunk (antialiased bicubic) before patches are
    # cut, one drawn per photo read: a denoiser then also sees a small camera's photographs,
    # whose vessels are a pixel wide. (1,): photographs as they are.
    shrink: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        low, high = self.sigma_range
        if not 0 <= low <= high:
            raise ValueError(f"sigma must be a value or a range [low, high] with 0 <= low <= high, got {self.sigma}")
        for name in ("clip_probability", "border_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("patch_size", "patches_per_image", "images_per_group", "scale"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.patch_size % self.scale:
            raise ValueError(f"patch_size {self.patch_size} is not a multiple of the scale {self.scale}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        unknown = [k for k in self.lr_kernels if k not in KERNELS]
        if not self.lr_kernels or unknown:
            raise ValueError(f"lr_kernels must be a non-empty list of {', '.join(KERNELS)}, got {list(self.lr_kernels)}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {self.targets!r}")
        # Photographs are read as RGB (grey ones too), so only 0, 1 and 2 exist in every one.
        if self.channels is not None and (not self.channels or not set(self.channels) <= {0, 1, 2}):
            raise ValueError(f"channels must be null or a non-empty list of RGB channels 0-2, got {list(self.channels)}")
        if self.targets == "vessels" and self.scale != 1:
            raise ValueError("vessel-map targets are for segmentation: the scale must be 1")
        if self.gain is not None and not (len(self.gain) == 2 and 0 < self.gain[0] <= self.gain[1]):
            raise ValueError(f"gain must be null or a range [low, high] with 0 < low <= high, got {self.gain}")
        if self.gain is not None and self.targets == "vessels":
            raise ValueError("gain changes the photo, not its vessel map: not for vessel-map targets")
        if not self.shrink or any(not isinstance(f, int) or f < 1 for f in self.shrink):
            raise ValueError(f"shrink must be a non-empty list of whole factors >= 1, got {list(self.shrink)}")
        if self.shrink != (1,) and self.targets == "vessels":
            raise ValueError("shrink changes the photo, not its vessel map: not for vessel-map targets")

    @property
    def margin(self) -> int:
        """High-resolution pixels read beyond each side of a patch to shrink it exactly."""
        return _BICUBIC_REACH * self.scale if self.scale > 1 else 0

    @property
    def window(self) -> int:
        """The side of the square a patch is cut from: the patch and its margin on each side."""
        return self.patch_size + 2 * self.margin

    @property
    def sigma_range(self) -> tuple[float, float]:
        if isinstance(self.sigma, numbers.Real):  # numpy's numbers too
            return float(self.sigma), float(self.sigma)
        try:
            low, high = self.sigma
            return float(low), float(high)
        except (TypeError, ValueError):
            raise ValueError(f"sigma must be a value or a range [low, high], got {self.sigma!r}") from None


class PatchBatch(NamedTuple):
    """Input (``noisy``: N×C×P/s×P/s) and target (``clean``: N×C×P×P) float32 tensors,
    and each patch's noise sigma on the [0, 1] scale; s is the scale (1 for denoising).
    ``skipped`` holds (path, problem) for each photograph found unusable while the batch
    was drawn, so that the process training on it (not only the worker) knows."""

    noisy: torch.Tensor
    clean: torch.Tensor
    sigma: torch.Tensor
    skipped: tuple[tuple[str, str], ...] = ()


def split_images(
    images: Sequence[Path],
    *,
    holdout: int = 0,
    among: Sequence[Path] | None = None,
    names: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[list[Path], list[Path]]:
    """Split photographs into (train, validation), never sharing one between both.

    Either ``names`` (file names or paths) picks the validation images, or ``holdout``
    of them are drawn with ``seed`` from ``among`` (default: all), e.g. 10 HEI-MED
    photographs out of HEI-MED + DRIVE. The draw depends only on the seed and the
    set of files, not on the order they were listed in.
    """
    unique = sorted({Path(p).resolve(): Path(p) for p in images}.items())
    if names is not None and holdout:
        raise ValueError("give the validation images by name or a holdout count, not both")
    if names is not None:
        chosen = set()
        for name in map(str, names):
            matches = {key for key, path in unique if name in (path.name, str(path))}
            if not matches:
                raise ValueError(f"validation image {name!r} is not among the training images")
            chosen |= matches
    else:
        allowed = None if among is None else {Path(p).resolve() for p in among}
        candidates = [key for key, _ in unique if allowed is None or key in allowed]
        if holdout > len(candidates):
            raise ValueError(f"cannot hold out {holdout} validation images from {len(candidates)}")
        picks = np.random.default_rng((seed, _SPLIT)).choice(len(candidates), size=holdout, replace=False)
        chosen = {candidates[i] for i in picks}
    train = [path for key, path in unique if key not in chosen]
    validation = [path for key, path in unique if key in chosen]
    return train, validation


def load_fov_crop(
    path: Path, min_size: int = 1, vessels: bool = False, channels: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A photograph cropped to its field of view, with the FOV mask; only ``channels``
    (None: all) are kept, and with ``vessels`` its expert vessel map (0/1) is appended
    as one more channel."""
    if vessels:
        image, mask, expert, _ = load_clean(path)
        if expert is None:
            raise ImageFileError(f"{path}: no expert vessel map beside it (DRIVE layout: ../1st_manual/NN_manual1.gif)")
    else:
        image, mask = crop_to_fov(read_image(path))
    if channels is not None:
        if max(channels) >= image.shape[2]:
            raise ImageFileError(f"{path}: has {image.shape[2]} channel(s), no channel {max(channels)} to keep")
        image = image[..., list(channels)]
    if vessels:
        image = np.dstack([image, expert.astype(np.float32)])
    check_fov_size(path, image, min_size)
    return image, mask


def _shrunk(image: np.ndarray, mask: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """A photograph and its FOV mask ``factor`` times smaller: the image by antialiased
    bicubic, the mask keeping the pixels whose every source pixel lies inside the FOV."""
    if factor == 1:
        return image, mask
    # Cropped to a multiple of the factor first; clipped, as a small camera's file is.
    small = np.clip(downsample(image, factor), 0.0, 1.0)
    height, width = small.shape[:2]
    blocks = mask[: height * factor, : width * factor].reshape(height, factor, width, factor)
    return small, blocks.all(axis=(1, 3))


def _augment(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/quarter turns: fundus photographs have no preferred orientation."""
    patch = np.rot90(patch, int(rng.integers(4)))
    return patch[:, ::-1] if rng.random() < 0.5 else patch


def _channels_first(patches: np.ndarray) -> torch.Tensor:
    """N×P×P×C array -> N×C×P×P tensor, the layout of torch convolutions."""
    return torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2)))


class PatchStream(IterableDataset):
    """An endless stream of ``PatchBatch``es; batch ``step`` is the same on every run.

    Use it with ``DataLoader(stream, batch_size=None, num_workers=W)``: worker w of a
    stream starting at ``start_step`` yields steps ``start_step + w + j·W``, which is
    the order DataLoader hands them out.
    """

    def __init__(
        self,
        images: Sequence[Path],
        *,
        batch_size: int,
        settings: PatchSettings = PatchSettings(),
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not images:
            raise ValueError("no training images")
        self.images = list(images)
        self.batch_size = batch_size
        self.settings = settings
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size
        group_patches = settings.images_per_group * settings.patches_per_image
        self.batches_per_group = max(1, math.ceil(group_patches / batch_size))
        # Every header is read now (not the pixels): a missing, unreadable or too small
        # photograph stops the run before it starts, not hours into it (see _load for the pixels).
        headers = [read_header_of_size(path, settings.window, "a patch") for path in self.images]
        self._draw_weights: np.ndarray | None = None
        if settings.sampling == "area":
            areas = np.array([header.height * header.width for header in headers], dtype=float)
            self._draw_weights = areas / areas.sum()
        # Sequence position -> (FOV-cropped image, FOV mask); only the current group.
        self._group: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def cached_images(self) -> int:
        return len(self._group)

    def __iter__(self) -> Iterator[PatchBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step, lanes=workers)
            step += workers

    def batch(self, step: int, lanes: int = 1) -> PatchBatch:
        """The batch of ``step`` when the stream is read by ``lanes`` workers."""
        lane, lane_step = step % lanes, step // lanes
        stream_id, streams = self.rank * lanes + lane, self.world_size * lanes
        group = lane_step // self.batches_per_group
        per_group = self.settings.images_per_group
        # This stream's share of the image sequence: every `streams`-th position.
        positions = [(group * per_group + j) * streams + stream_id for j in range(per_group)]
        # Drop the previous group before reading the next, so that at most one group is held.
        self._group = {p: self._group[p] for p in positions if p in self._group}
        skipped: list[tuple[str, str]] = []
        for position in positions:
            if position not in self._group:
                self._group[position] = self._load(position, skipped)
        rng = np.random.default_rng((self.seed, _BATCH, stream_id, lane_step))
        batch = self._degrade([self._group[positions[i % per_group]] for i in range(self.batch_size)], rng)
        return batch._replace(skipped=tuple(skipped))

    def _load(self, position: int, skipped: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """The image at ``position`` of the endless sequence of seeded shuffles of all images
        (by area: seeded draws, with replacement, in proportion to pixel count); the photographs
        that could not be used in its place are added to ``skipped``."""
        epoch, offset = divmod(position, len(self.images))
        rng = np.random.default_rng((self.seed, _ORDER, epoch))
        if self._draw_weights is None:
            order = rng.permutation(len(self.images))
        else:
            order = rng.choice(len(self.images), size=len(self.images), p=self._draw_weights)
        settings = self.settings
        # The headers passed at the start, but the pixels can still fail (a corrupt file, a field of
        # view smaller than a patch): the next photo of the order stands in, so that one bad file
        # of an archive does not end a run hours in.
        problem = ""
        for tried in range(len(self.images)):
            path = self.images[order[(offset + tried) % len(self.images)]]
            try:
                image, mask = load_fov_crop(path, settings.window, vessels=settings.targets == "vessels",
                                            channels=settings.channels)
                break
            except ImageFileError as error:
                problem = str(error)
                skipped.append((str(path), problem))
                warnings.warn(f"training goes on without it: {problem}", stacklevel=2)
        else:
            raise ImageFileError(f"none of the {len(self.images)} training photographs can be used; the last: {problem}")
        factor = int(np.random.default_rng((self.seed, _SHRINK, position)).choice(settings.shrink))
        if min(image.shape[:2]) // factor < settings.window:  # too small to shrink that far: as it is
            return image, mask
        return _shrunk(image, mask, factor)

    def _corner(self, mask: np.ndarray, rng: np.random.Generator, size: int) -> tuple[int, int]:
        """Top-left corner of a ``size``² window whose centre lies in the FOV (but for a border fraction)."""
        anywhere = rng.random() < self.settings.border_fraction
        for _ in range(_CENTRE_TRIES):
            top = int(rng.integers(mask.shape[0] - size + 1))
            left = int(rng.integers(mask.shape[1] - size + 1))
            if anywhere or mask[top + size // 2, left + size // 2]:
                break
        return top, left

    def _degrade(self, sources: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator) -> PatchBatch:
        settings = self.settings
        size, margin, scale = settings.patch_size, settings.margin, settings.scale
        window, low = settings.window, size // scale
        channels = sources[0][0].shape[2]
        clean = np.empty((len(sources), size, size, channels), dtype=np.float32)
        inputs = clean if scale == 1 else np.empty((len(sources), low, low, channels), dtype=np.float32)
        for index, (image, mask) in enumerate(sources):
            top, left = self._corner(mask, rng, window)
            patch = _augment(image[top : top + window, left : left + window], rng)
            if settings.gain is not None:
                patch = np.clip(patch * rng.uniform(*settings.gain, size=channels).astype(np.float32), 0.0, 1.0)
            clean[index] = patch[margin : margin + size, margin : margin + size]
            if scale > 1:
                reach = margin // scale
                # One kernel draws nothing, so that the default stream stays what it always was.
                kernels = settings.lr_kernels
                kernel = kernels[0] if len(kernels) == 1 else kernels[rng.integers(len(kernels))]
                inputs[index] = downsample(patch, scale, kernel)[reach : reach + low, reach : reach + low]
        if settings.targets == "vessels":  # photo channels in, the vessel map channel out
            inputs, clean = clean[..., :-1], clean[..., -1:]
        sigma = rng.uniform(*settings.sigma_range, size=len(clean)).astype(np.float32) / 255.0
        noisy = inputs + rng.standard_normal(inputs.shape, dtype=np.float32) * sigma[:, None, None, None]
        camera = rng.random(len(clean)) < settings.clip_probability
        noisy[camera] = quantize(noisy[camera], bits=8)  # clips, then rounds to 8 bits
        return PatchBatch(_channels_first(noisy), _channels_first(clean), torch.from_numpy(sigma))


# Where validation crops are taken: the retina at the centre, and the FOV rim with
# the black surround (where a model trained without clipped input leaves biased noise).
REGIONS = ("centre", "rim")
# Candidate places for the rim crop, as fractions of the way from the top left corner to the centre.
_RIM_STEPS = np.linspace(0.0, 1.0, 17)


@dataclass(frozen=True)
class ValidationCrop:
    """A fixed noisy/clean crop (H×W×C) of a validation photograph under one protocol;
    ``sigma`` is the noise level on the [0, 1] scale. For super-resolution ``noisy``
    is the crop shrunk by the scale, then noised."""

    name: str
    region: str
    protocol: str
    sigma: float
    noisy: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    vessel_scale: float  # the photograph's, not the crop's (``evaluate.CleanPhoto``)


def _rim_square(image: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``size``² crop between the top left corner and the centre that is nearest
    to half field of view, half surround."""
    if size is None or min(image.shape[:2]) <= size:
        return image, mask
    corners = [(int(t * (image.shape[0] - size) / 2), int(t * (image.shape[1] - size) / 2)) for t in _RIM_STEPS]
    top, left = min(corners, key=lambda c: abs(mask[c[0] : c[0] + size, c[1] : c[1] + size].mean() - 0.5))
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def validation_crops(
    images: Sequence[Path],
    *,
    crop: int | None = 256,
    sigma: float = 25.0,
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
    scale: int = 1,
    targets: str = "clean",
    channels: Sequence[int] | None = None,
) -> list[ValidationCrop]:
    """A ``crop``² at the centre and on the FOV rim (``REGIONS``) of each FOV-cropped
    photograph, under each protocol, with fixed-seed noise (image i gets seed
    ``seed + i``, as in ``evaluate``): validation scores are comparable from one
    step, and one run, to the next. ``scale``, ``targets`` and ``channels`` make
    super-resolution, segmentation and grey crops, as ``PatchSettings`` does for
    training patches."""
    crops = []
    for index, path in enumerate(images):
        photograph = load_fov_crop(path, MIN_SCORED_SIZE, vessels=targets == "vessels", channels=channels)
        vessel_scale = image_scale(photograph[0])  # the photograph's, which its crops keep
        for region, cut in zip(REGIONS, (centre_square, _rim_square), strict=True):
            clean, mask = cut(*photograph, crop)
            low = clean
            if targets == "vessels":  # the photo is the input, its vessel map the target
                low, clean = clean[..., :-1], clean[..., -1:]
            elif scale > 1:
                low = downsample(clean, scale)  # cropped to a multiple of the scale first
                height, width = low.shape[0] * scale, low.shape[1] * scale
                clean, mask = clean[:height, :width], mask[:height, :width]
            for protocol in protocols:
                noisy = degrade_for_protocol(low, sigma, protocol, seed + index)
                crops.append(ValidationCrop(path.name, region, protocol, sigma / 255.0, noisy, clean, mask,
                                            vessel_scale))
    return crops
