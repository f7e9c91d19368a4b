"""Compare restoration methods on clean photographs, like the paper's Table 1.

Every clean image is degraded with seeded noise under one or both protocols —
``paper`` (noise added to the float image, not clipped) and ``camera`` (clipped to
[0, 1] and quantised to 8 bits, as every real noisy file is) — then restored by each
method and scored overall, per channel and inside the field of view.

With ``scale`` > 1 the task is super-resolution: the clean image (cropped to a
multiple of the scale) is first shrunk by antialiased bicubic, then noised (sigma 0:
plain low resolution), and the methods are upscalers: ``bicubic`` and SR models.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fundus_restore.degrade import (
    KERNELS, NOISE_ESTIMATE_VERSION, PROTOCOLS, bicubic_upsample, degrade_for_protocol, downsample,
)
from fundus_restore.fov import crop_to_fov, fov_mask
from fundus_restore.io import ImageFileError, read_image, read_mask
from fundus_restore.metrics import image_quality, ssim_window_size
from fundus_restore.models.cbm3d import cbm3d
from fundus_restore.pretrained import DEFAULT_SMALL_PHOTO_MODEL
from fundus_restore.vessel_metrics import hallucinated_vessels, vessel_preservation
from fundus_restore.vessels import SEGMENTERS, image_scale, segment_vessels

# A method name "DENOISER>UPSCALER" (with a scale) denoises the noisy small image, then upscales it.
PIPELINE_SEPARATOR = ">"
DEFAULT_METHODS = ("noisy", "autoencoder-retina", "cdncnn-b", "dncnn-retina", "dncnn-retina-green", "dncnn-retina-green-range",
                   "resunet-retina-green", "resunet-retina-green-blind", "cbm3d")
DEFAULT_UPSCALE_METHODS = ("bicubic", "srresnet-x4-retina", "srgan-x4-retina")
# Noisy small photos (a scale and a sigma): the upscalers alone, and denoised first as
# ``restore`` does by default and with CBM3D.
DEFAULT_NOISY_UPSCALE_METHODS = (*DEFAULT_UPSCALE_METHODS, f"cbm3d{PIPELINE_SEPARATOR}srresnet-x4-retina",
                                 f"{DEFAULT_SMALL_PHOTO_MODEL}{PIPELINE_SEPARATOR}srresnet-x4-retina")
# Denoising with --grey: BM3D (as cbm3d), the colour default through grey, and the grey default.
DEFAULT_GREY_METHODS = ("noisy", "cbm3d", "resunet-retina-green-blind", "resunet-retina-grey-blind")
# A method name ending in this runs the network with the flip-and-turn ensemble (inference.dihedral_ensemble).
ENSEMBLE_SUFFIX = "+x8"
# Columns of the summary table, in order: overall, inside the field of view, per channel there.
SUMMARY_COLUMNS = ("psnr", "ssim", "psnr_fov", "ssim_fov", "psnr_fov_r", "psnr_fov_g", "psnr_fov_b",
                   "ssim_fov_r", "ssim_fov_g", "ssim_fov_b")
# The hallucination guard of super-resolution (``upscale --check``): the share of an upscaler's
# vessel centreline absent from the bicubic upscale of the same input (bicubic itself scores 0).
INVENTED_VS_BICUBIC = "invented_vs_bicubic"
# The summary of a folder mixing colour and grey photos: how many are colour, the photos its R, G, B means are over.
COLOUR_IMAGES = "colour_images"
# Vessel-preservation columns, shown when measured.
VESSEL_COLUMNS = ("thin_recall", "thick_recall", "spurious_rate", INVENTED_VS_BICUBIC, "cldice",
                  "thin_contrast_retention", "psnr_thin_band")


# Bump when a measure's definition changes: cached scores of older definitions are then ignored.
SCORES_VERSION = 1


@dataclass(frozen=True)
class Method:
    """A named restoration: noisy image and sigma (0–255 scale) in, restored image out.

    ``fingerprint`` identifies what the method computes (for a model, a hash of its
    weights), so cached scores are reused only for the very same restoration.
    ``guard_input`` gives, for an upscaler, the small image whose bicubic upscale the
    hallucination guard compares with, when it is not the noisy input itself: a
    pipeline's denoised photo, as ``restore --check`` does.
    """

    name: str
    restore: Callable[[np.ndarray, float], np.ndarray]
    fingerprint: str = ""
    guard_input: Callable[[np.ndarray, float], np.ndarray] | None = None


def weights_fingerprint(model) -> str:
    """A short hash of a model's architecture and weights."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class ScoreCache:
    """Scores already measured, in a JSON-lines file, so that rerunning an evaluation with
    one more method (or more images) computes only what is new.

    A score is keyed by the image's content, the noise setting, the crop, whether
    vessel measures were asked for and against what, the method's fingerprint and ``SCORES_VERSION``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.scores: dict[str, dict[str, float]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.scores[entry["key"]] = entry["scores"]

    @staticmethod
    def key(image_digest: str, sigma: float, protocol: str, noise_seed: int, crop_size: int | None,
            vessels: str | None, scale: int, method: Method, lr_kernel: str = "bicubic", grey: bool = False,
            expert: bool = False) -> str:
        """``vessels``: the segmenter of the vessel measures, None without them; ``grey``: the
        photo scored in one channel (``load_clean``); ``expert``: the vessel measures were taken
        against an expert map (the same photo outside DRIVE's layout has none)."""
        # The defaults add nothing, so that scores cached before kernels and grey were selectable stay valid.
        # A crop's vessel measures (and a super-resolution photo's, cut to a multiple of the
        # scale) were taken at the cut image's scale before they took the photo's.
        extra = ([] if lr_kernel == "bicubic" else [lr_kernel]) + (["grey"] if grey else [])
        if vessels is not None:
            extra += (["photo-scale"] if crop_size is not None or scale > 1 else []) + (["expert"] if expert else [])
        return json.dumps([SCORES_VERSION, image_digest, sigma, protocol, noise_seed, crop_size, vessels, scale,
                           method.name, method.fingerprint, *extra])

    def get(self, key: str, required: Iterable[str] = ()) -> dict[str, float] | None:
        """The scores under ``key``; None when absent or lacking a ``required`` measure (one added
        since they were cached: measuring it anew beats bumping ``SCORES_VERSION`` for every entry)."""
        scores = self.scores.get(key)
        return scores if scores is not None and all(name in scores for name in required) else None

    def put(self, key: str, scores: dict[str, float]) -> None:
        self.scores[key] = scores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:  # one line per score: a killed run keeps what it measured
            handle.write(json.dumps({"key": key, "scores": scores}) + "\n")


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _nlmeans(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    # Settings recommended by scikit-image for a known noise level.
    restored = denoise_nl_means(
        noisy, h=0.8 * sigma / 255.0, sigma=sigma / 255.0, patch_size=5, patch_distance=6, fast_mode=True, channel_axis=-1
    )
    return restored.reshape(noisy.shape).astype(np.float32)  # a grey image comes back H×W


CLASSICAL_METHODS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "noisy": lambda noisy, sigma: noisy,
    # Told the true noise level, as in the paper's table (``denoise --model cbm3d`` is told the estimate).
    "cbm3d": lambda noisy, sigma: cbm3d(noisy, sigma / 255.0),
    "nlmeans": _nlmeans,
}


def build_methods(
    names: Sequence[str],
    *,
    official_weights: Path | None = None,
    tile: int | None = None,
    device: str = "auto",
    skip_missing: bool = True,
    scale: int = 1,
) -> list[Method]:
    """Methods by name: classical ones, bundled model names, ``.safetensors`` paths, and
    ``cdncnn-b`` for the official CDnCNN-B when ``official_weights`` (.mat or .safetensors) is given.
    With ``scale`` > 1 they are upscalers: ``bicubic`` and super-resolution models of that scale,
    or ``DENOISER>UPSCALER`` pipelines (``PIPELINE_SEPARATOR``), which denoise the noisy small
    image and upscale the result, as ``fundus-restore restore`` does.
    A network's name followed by ``+x8`` runs it with the 8-fold flip-and-turn ensemble.

    With ``skip_missing`` a default method whose weights are absent is left out with a
    note rather than failing the whole evaluation. A file is labelled by its stem, or by
    its path without the suffix where two files share a stem (``runs/a/model``).
    """
    if len(set(names)) < len(names):
        raise ValueError(f"a method is asked for twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    stages = {name: name.split(PIPELINE_SEPARATOR) for name in names}
    # Stems of the distinct models asked for: a file whose stem is shared is labelled by its path.
    models = {stage.removesuffix(ENSEMBLE_SUFFIX) for parts in stages.values() for stage in parts}
    stems = Counter(Path(name).stem for name in models)
    shared_stems = frozenset(stem for stem, count in stems.items() if count > 1)
    # Each model is loaded once, and a pipeline's denoiser runs once per noisy image,
    # however many pipelines share them.
    build = functools.cache(partial(_build_method, official_weights=official_weights, tile=tile, device=device,
                                    skip_missing=skip_missing, shared_stems=shared_stems))
    first_stage = functools.cache(lambda name: _reusing_last_output(build(name, scale=1)))
    methods = []
    for requested, parts in stages.items():
        if len(parts) == 1:
            method = build(requested, scale=scale)
        elif len(parts) == 2 and scale > 1:
            denoiser, upscaler = first_stage(parts[0]), build(parts[1], scale=scale)
            method = None if denoiser is None or upscaler is None else _pipeline(denoiser, upscaler)
        else:
            raise ValueError(f"{requested}: a pipeline is DENOISER{PIPELINE_SEPARATOR}UPSCALER, with a scale above 1")
        if method is not None:
            methods.append(method)
    return methods


def _pipeline(denoiser: Method, upscaler: Method) -> Method:
    """``denoiser`` then ``upscaler``: the noisy small image denoised, then enlarged."""
    return Method(
        f"{denoiser.name}{PIPELINE_SEPARATOR}{upscaler.name}",
        lambda noisy, sigma: upscaler.restore(denoiser.restore(noisy, sigma), 0.0),
        # "guard v2": its guard compares with the denoised photo's upscale since, not the noisy one's.
        fingerprint=f"{denoiser.fingerprint}{PIPELINE_SEPARATOR}{upscaler.fingerprint} guard v2",
        guard_input=denoiser.restore,
    )


def _reusing_last_output(method: Method | None) -> Method | None:
    """``method``, giving back its last output when called again on the same array object
    and sigma: ``evaluate_images`` hands every method the very same noisy array, so pipelines
    sharing a denoiser denoise it once. (The input is held, so its identity cannot pass
    to another array.)"""
    if method is None:
        return None
    last: list = []

    def restore(noisy: np.ndarray, sigma: float) -> np.ndarray:
        if not (last and last[0] is noisy and last[1] == sigma):
            last[:] = [noisy, sigma, method.restore(noisy, sigma)]
        return last[2]

    return replace(method, restore=restore)


def _build_method(
    requested: str,
    *,
    scale: int,
    official_weights: Path | None,
    tile: int | None,
    device: str,
    skip_missing: bool,
    shared_stems: frozenset[str],
) -> Method | None:
    """One method of ``build_methods`` (a denoiser at ``scale`` 1, else an upscaler), or
    None for a missing model left out under ``skip_missing``."""
    from fundus_restore.inference import check_denoiser, check_run_settings, denoise, upscale, upscale_factor
    from fundus_restore.pretrained import WeightsError, list_models, load_model

    ensemble = requested.endswith(ENSEMBLE_SUFFIX)
    name = requested.removesuffix(ENSEMBLE_SUFFIX)
    if ensemble and (name in CLASSICAL_METHODS or name == "bicubic"):
        raise ValueError(f"{requested}: {ENSEMBLE_SUFFIX} (the flip-and-turn ensemble) is for networks")
    if name == "bicubic":
        if scale == 1:
            raise ValueError("bicubic is an upscaler: it needs --scale 2 or more")
        return Method(name, lambda low, sigma: bicubic_upsample(low, scale), fingerprint=f"bicubic x{scale}")
    if name in CLASSICAL_METHODS:
        if scale > 1:
            raise ValueError(f"{name} does not upscale: with --scale, use it as a pipeline's first stage "
                             f"({name}{PIPELINE_SEPARATOR}bicubic)")
        version = _package_version(name)
        return Method(name, CLASSICAL_METHODS[name], fingerprint=f"{name} {version}")
    try:
        if name == "cdncnn-b":
            if official_weights is None:
                raise WeightsError("cdncnn-b: pass --official-weights GD_Color_Blind.mat (never bundled)")
            model = _load_official(official_weights)
        elif not Path(name).suffix and name not in list_models():
            known = [*CLASSICAL_METHODS, "bicubic (with a scale)", "cdncnn-b", *list_models()]
            raise WeightsError(f"unknown method {name!r}: known are {', '.join(known)}, or a .safetensors file")
        else:
            model = load_model(name)
    except WeightsError as error:
        if not skip_missing:
            raise
        print(f"skipping {name}: {error}")
        return None
    label = getattr(model, "name", name) if name != "cdncnn-b" else name  # a file's stem (RUN/model), not its path
    if label != name and Path(name).stem in shared_stems:
        label = str(Path(name).with_suffix(""))  # runs/a/model.safetensors and runs/b/model.safetensors
    label += ENSEMBLE_SUFFIX if ensemble else ""
    check_run_settings(model, tile=tile, device=device)
    if scale > 1:
        if model.config.get("scale") != scale:
            raise ValueError(f"{label} does not upscale by {scale} (its config: {model.config})")
        upscale_factor(model)
        run = partial(upscale, model=model, tile=tile, device=device, ensemble=ensemble)
    else:
        run = partial(denoise, model=check_denoiser(model), tile=tile, device=device, ensemble=ensemble)
    fingerprint = weights_fingerprint(model) + (" x8" if ensemble else "")
    if getattr(model, "needs_noise_level", False):  # its output moves with the estimate it is told
        fingerprint += f" noise estimate v{NOISE_ESTIMATE_VERSION}"
    return Method(label, lambda noisy, sigma: run(noisy), fingerprint=fingerprint)


def _package_version(method_name: str) -> str:
    from importlib.metadata import version

    return version({"cbm3d": "bm3d", "nlmeans": "scikit-image"}.get(method_name, "fundus-restore"))


def _load_official(path: Path):
    """The official colour CDnCNN-B from its MatConvNet file or from what import-weights made of it;
    anything else is refused, as its row would be labelled cdncnn-b."""
    from fundus_restore.matconvnet import CONVERTED_BY, load_matconvnet_dncnn
    from fundus_restore.pretrained import WeightsError, load_model, read_metadata, resolve_weights

    if Path(path).suffix.lower() == ".mat":
        model = load_matconvnet_dncnn(path)
    else:
        weights = resolve_weights(path)
        if read_metadata(weights).get("converted_by") != CONVERTED_BY:
            raise WeightsError(f"{weights}: not official DnCNN weights imported by fundus-restore import-weights "
                               "(--official-weights takes GD_Color_Blind.mat or its import)")
        model = load_model(weights)
    if model.config.get("channels") != 3:
        raise WeightsError(f"{path}: official weights for {model.config.get('channels')}-channel (grey) images; "
                           "the colour CDnCNN-B is GD_Color_Blind.mat")
    return model


def centre_square(image: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The central ``size``² crop (the paper used 1696² crops; 1024² keeps CBM3D affordable)."""
    if size is None or min(image.shape[:2]) <= size:
        return image, mask
    top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[top : top + size, left : left + size], mask[top : top + size, left : left + size]


def expert_vessel_map(image_path: Path) -> Path | None:
    """The expert vessel map of a photo in DRIVE's layout (``images/01_test.tif`` →
    ``1st_manual/01_manual1.gif``, the first grader), or None where there is none."""
    number = image_path.name.split("_")[0]
    candidate = image_path.parent.parent / "1st_manual" / f"{number}_manual1.gif"
    return candidate if candidate.is_file() else None


# The smallest field-of-view crop that can be scored: SSIM's window must fit inside it.
MIN_SCORED_SIZE = ssim_window_size()


def check_fov_size(path: Path, image: np.ndarray, min_size: int) -> None:
    """Refuse, naming the file, a field-of-view crop ``image`` smaller than ``min_size``²."""
    if min(image.shape[:2]) < min_size:
        raise ImageFileError(
            f"{path}: its field of view crop is {image.shape[1]}×{image.shape[0]}, smaller than {min_size}²"
        )


class CleanPhoto(NamedTuple):
    """A clean photo as ``load_clean`` gives it."""

    photo: np.ndarray  # H×W×3, or H×W×1 grey
    mask: np.ndarray  # its field of view
    expert: np.ndarray | None  # the expert vessel map, where the photo has one
    vessel_scale: float  # the whole photo's size relative to DRIVE's (vessels.image_scale), for a crop too


def load_clean(path: Path, crop_size: int | None = None, grey: bool | None = False) -> CleanPhoto:
    """A clean photo cropped to its field of view (and to the central ``crop_size``²),
    with its FOV mask and, where one exists, its expert vessel map cropped alike.

    The photo is H×W×3, or with ``grey`` H×W×1: the green channel of a colour photo
    (red-free photographs are taken through a green filter) or a grey photo's one
    channel. ``grey=None`` keeps each file's own: a grey file stays grey. Its
    ``vessel_scale`` is the field-of-view crop's before the central crop: a crop keeps
    the photo's vessel widths, so the vessel measures must keep its scale.
    """
    image = read_image(path, rgb=False)
    if grey is None:
        grey = image.shape[2] == 1
    expert_path = expert_vessel_map(path)
    layers = image if expert_path is None else np.dstack([image, read_mask(expert_path).astype(np.float32)])
    layers, mask = crop_to_fov(layers, fov_mask(image))
    vessel_scale = image_scale(layers)
    layers, mask = centre_square(layers, mask, crop_size)
    photo = layers[..., : image.shape[2]]
    if grey:
        photo = photo[..., 1:2] if photo.shape[2] == 3 else photo
    elif photo.shape[2] == 1:
        photo = np.repeat(photo, 3, axis=2)
    check_fov_size(path, photo, MIN_SCORED_SIZE)
    return CleanPhoto(photo, mask, None if expert_path is None else layers[..., -1] > 0.5, vessel_scale)


@dataclass(frozen=True)
class Example:
    """One image's arrays at one noise setting, kept for the report's figures."""

    image: str
    sigma: float
    protocol: str
    clean: np.ndarray
    noisy: np.ndarray
    restored: dict[str, np.ndarray]  # method name → its output
    mask: np.ndarray
    expert: np.ndarray | None
    vessel_scale: float  # the photo's, for a crop too (``CleanPhoto``)
    segmenter: str = "hessian"  # the vessel segmenter of the evaluation


def example_setting(sigmas: Sequence[float], protocols: Sequence[str]) -> tuple[float, str]:
    """The (sigma, protocol) shown in figures: the first sigma, camera noise when evaluated
    (what real noisy files look like), else the first protocol."""
    return sigmas[0], "camera" if "camera" in protocols else protocols[0]


def check_settings(
    protocols: Iterable[str],
    segmenter: str,
    lr_kernel: str = "bicubic",
    *,
    sigmas: Iterable[float] = (),
    crop_size: int | None = None,
    scale: int = 1,
    grey: bool = False,
) -> None:
    """Refuse an unknown noise protocol, vessel segmenter or shrinking kernel, a negative
    noise level, a crop too small to score, a scale below 1, a kernel without a scale and
    the learned segmenter on grey scoring, before anything is run."""
    checks = [("noise protocol", protocol, PROTOCOLS) for protocol in protocols]
    checks += [("vessel segmenter", segmenter, SEGMENTERS), ("kernel", lr_kernel, tuple(KERNELS))]
    for kind, value, known in checks:
        if value not in known:
            raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(known)}")
    if any(sigma < 0 for sigma in sigmas):
        raise ValueError(f"a noise sigma must be at least 0, got {', '.join(f'{s:g}' for s in sigmas)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"the scale must be a positive integer, got {scale!r}")
    # With a scale the crop is cut to a multiple of it first.
    if crop_size is not None and crop_size // scale * scale < MIN_SCORED_SIZE:
        cut = crop_size // scale * scale
        note = f" (cut to a multiple of the scale, {cut})" if cut != crop_size else ""
        raise ValueError(f"crop {crop_size}{note} is smaller than the {MIN_SCORED_SIZE}² SSIM's window needs")
    if lr_kernel != "bicubic" and scale == 1:
        raise ValueError(f"the kernel {lr_kernel!r} shrinks photos for super-resolution: it needs a scale above 1")
    if grey and segmenter == "unet":
        raise ValueError("the learned segmenter (unet) takes colour photos: use the hessian segmenter to score grey")


def image_labels(paths: Sequence[Path]) -> list[str]:
    """Each photo's name in the tables: its file name, or, where two photos share it (two
    folders may both hold ``01.png``), as many of its last path parts as tell them apart."""
    labels = [path.name for path in paths]
    depth = 1
    while True:
        files_named: dict[str, set[Path]] = defaultdict(set)
        for label, path in zip(labels, paths):
            files_named[label].add(path)
        clashing = [i for i, label in enumerate(labels) if len(files_named[label]) > 1]  # one file given twice is one
        depth += 1
        if not clashing or all(depth > len(paths[i].parts) for i in clashing):
            return labels
        for i in clashing:
            labels[i] = "/".join(paths[i].parts[-depth:])


def evaluate_images(
    paths: Iterable[Path],
    methods: Sequence[Method],
    *,
    sigmas: Sequence[float] = (25.0,),
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
    crop_size: int | None = None,
    vessels: bool = True,
    on_step: Callable[[str], None] | None = None,
    on_example: Callable[[Example], None] | None = None,
    cache: ScoreCache | None = None,
    scale: int = 1,
    segmenter: str = "hessian",
    lr_kernel: str = "bicubic",
    grey: bool | None = False,
) -> list[dict[str, float | str]]:
    """One row per (image, sigma, protocol, method) with every quality measure and,
    with ``vessels``, the vessel-preservation measures (against the expert map where
    the photo has one in DRIVE's layout, else against the clean photo's segmentation).

    Image i (in the given order) gets noise seed ``seed + i`` for every sigma and
    protocol, so all methods see exactly the same noisy input.
    ``on_example`` receives the first image's ``Example`` at ``example_setting``; only
    that one image's outputs are kept, so memory stays bounded on any number of images.
    With a ``cache``, scores measured before are reused and new ones are added to it.
    ``segmenter`` is the ``segment_vessels`` method behind the vessel measures.
    With ``scale`` > 1 the methods upscale the image shrunk by ``lr_kernel`` (one of
    ``degrade.KERNELS``; antialiased bicubic by default), then noised (the example's
    ``noisy`` is then that input enlarged by bicubic, for display), and the vessel
    measures add ``INVENTED_VS_BICUBIC``, the ``upscale --check`` guard's rate (its own,
    classical segmenter; a pipeline's compares with its denoised photo's bicubic upscale,
    as ``restore --check`` does). ``grey`` scores the photos in one channel (``load_clean``: True
    for the green channel of colour photos, None for grey files only).
    """
    check_settings(protocols, segmenter, lr_kernel, sigmas=sigmas, crop_size=crop_size, scale=scale)
    guard = vessels and scale > 1
    rows: list[dict[str, float | str]] = []
    shown_setting = example_setting(sigmas, protocols)
    paths = list(paths)
    for index, (path, label) in enumerate(zip(paths, image_labels(paths))):
        digest = file_digest(path) if cache is not None else ""
        clean, mask, expert, vessel_scale = load_clean(path, crop_size, grey)
        low = clean
        if scale > 1:
            low = downsample(clean, scale, lr_kernel)
            height, width = low.shape[0] * scale, low.shape[1] * scale
            clean, mask = clean[:height, :width], mask[:height, :width]
            expert = None if expert is None else expert[:height, :width]
        # Segmented once per image, when a vessel measure is first needed.
        clean_vessels = functools.cache(partial(segment_vessels, clean, mask, scale=vessel_scale, method=segmenter))
        for sigma in sigmas:
            for protocol in protocols:
                noisy = degrade_for_protocol(low, sigma, protocol, seed + index)
                # The input at the clean image's size: for super-resolution its bicubic upscale, the
                # guard's reference, segmented once for all the upscalers (as hallucinated_vessels would).
                enlarged = noisy if scale == 1 else bicubic_upsample(noisy, scale)
                enlarged_vessels = functools.cache(partial(segment_vessels, enlarged, mask, scale=vessel_scale))
                keep = on_example is not None and index == 0 and (sigma, protocol) == shown_setting
                outputs: dict[str, np.ndarray] = {}
                for method in methods:
                    key = ScoreCache.key(digest, sigma, protocol, seed + index, crop_size,
                                         segmenter if vessels else None, scale, method, lr_kernel, clean.shape[2] == 1,
                                         expert is not None)
                    quality = cache.get(key, (INVENTED_VS_BICUBIC,) if guard else ()) if cache is not None else None
                    if quality is None or keep:  # the figures' image is always restored
                        restored = method.restore(noisy, sigma)
                        if not np.isfinite(restored).all():  # a mean over the other photos would hide it
                            raise ValueError(f"{path}: {method.name} returned NaN or infinite values")
                        if keep:
                            outputs[method.name] = restored
                        if quality is None:
                            quality = image_quality(clean, restored, mask=mask)
                            if vessels:
                                quality |= vessel_preservation(clean, restored, expert=expert, fov=mask,
                                                               scale=vessel_scale, segmenter=segmenter,
                                                               clean_vessels=clean_vessels())
                            if guard and method.guard_input is None:
                                quality[INVENTED_VS_BICUBIC] = hallucinated_vessels(
                                    restored, enlarged, fov=mask, scale=vessel_scale,
                                    reference_vessels=enlarged_vessels(),
                                )[1]
                            elif guard:
                                reference = bicubic_upsample(method.guard_input(noisy, sigma), scale)
                                quality[INVENTED_VS_BICUBIC] = hallucinated_vessels(
                                    restored, reference, fov=mask, scale=vessel_scale
                                )[1]
                            if cache is not None:
                                cache.put(key, {k: float(v) for k, v in quality.items()})
                    rows.append({"image": label, "sigma": sigma, "protocol": protocol, "method": method.name, **quality})
                    if on_step:
                        on_step(f"{label} σ{sigma:g} {protocol} {method.name}")
                if keep:
                    on_example(Example(label, sigma, protocol, clean, enlarged, outputs, mask, expert,
                                       vessel_scale, segmenter))
    return rows


def summarise(rows: Sequence[dict[str, float | str]]) -> list[dict[str, float | str]]:
    """Mean of every measure per (sigma, protocol, method), in first-seen order."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["sigma"], row["protocol"], row["method"])].append(row)
    summary = []
    for (sigma, protocol, method), members in groups.items():
        # Over the measures of any member: a folder of colour and grey photos gives R, G, B for some,
        # and then says over how many (COLOUR_IMAGES), so that those means are not read as the row's.
        measures = dict.fromkeys(k for m in members for k, v in m.items() if isinstance(v, float) and k != "sigma")
        means = {k: mean_of_finite([m[k] for m in members if k in m]) for k in measures}
        colour = sum("psnr_r" in m for m in members)
        counts = {"images": len(members)} | ({COLOUR_IMAGES: colour} if 0 < colour < len(members) else {})
        summary.append({"sigma": sigma, "protocol": protocol, "method": method, **counts, **means})
    return summary


def mean_of_finite(values: Sequence[float]) -> float:
    # A vessel measure is NaN on an image with nothing to measure (e.g. no thin vessels).
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def write_tables(rows: Sequence[dict[str, float | str]], report_dir: Path, title: str = "Denoising") -> tuple[Path, Path]:
    """Per-image CSV, summary CSV and a Markdown summary table; returns (markdown, summary csv)."""
    report_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, report_dir / "per_image.csv")
    summary = summarise(rows)
    summary_csv = _write_csv(summary, report_dir / "summary.csv")
    header, body = summary_table(summary)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(values) + " |" for values in body]
    markdown = report_dir / "results.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return markdown, summary_csv


def summary_table(summary: Sequence[dict[str, float | str]]) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows) of the summary table, vessel columns included when measured."""
    columns = tuple(c for c in SUMMARY_COLUMNS + VESSEL_COLUMNS if c in summary[0])  # a grey photo has no R, G, B
    counts = ("images", COLOUR_IMAGES) if COLOUR_IMAGES in summary[0] else ("images",)
    header = ["σ", "noise", "method", *counts, *columns]
    body = []
    for row in summary:
        values = [f"{row['sigma']:g}", str(row["protocol"]), str(row["method"]), *(str(row[c]) for c in counts)]
        values += [f"{row[c]:.2f}" if c.startswith("psnr") else f"{row[c]:.4f}" for c in columns]
        body.append(values)
    return header, body


def _write_csv(rows: Sequence[dict[str, float | str]], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
