"""Import the official DnCNN weights from MatConvNet ``simplenn`` MAT-files.

The DnCNN authors released their models as MATLAB v7.3 MAT-files, which are HDF5:
``net.layers`` is a cell array (a dataset of object references into ``#refs#``) of
layer structs (HDF5 groups, one dataset per field). Batch norm is already folded,
so the layers run conv, relu, conv, relu, ..., conv. Two MATLAB conventions matter:

* HDF5 shows MATLAB's column-major arrays with their axes reversed, and MATLAB drops
  trailing singleton axes (a 3×3×64×1 filter is saved as 3×3×64, read as 64×3×3).
* MatConvNet filters are H×W×in×out and, like PyTorch, convolutions are
  correlations, so a filter only needs its axes reordered to out×in×H×W.

Everything that does not fit this pattern is refused with a ``WeightsError`` naming
the file and the problem, rather than loaded into a network that computes nonsense.

The module also holds the published PSNRs of the four released files and the protocol
that reproduces them (``scripts/check_published_dncnn.py``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.io import read_image
from fundus_restore.metrics import psnr
from fundus_restore.models.dncnn import DnCNN
from fundus_restore.pretrained import WeightsError, save_model

# DnCNN's convolutions are all 3×3 with stride 1 and one pixel of zero padding.
KERNEL_SIZE = 3


class _FormatProblem(Exception):
    """A problem in the file's structure; re-raised as WeightsError with the path."""


@dataclass(frozen=True)
class ConvWeights:
    """One convolution in PyTorch layout: ``weight`` out×in×H×W, ``bias`` out."""

    weight: np.ndarray
    bias: np.ndarray


def _matlab_array(node: h5py.Dataset | h5py.Group, what: str) -> np.ndarray:
    """A numeric MATLAB array with MATLAB's axis order restored."""
    if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "fiu":
        raise _FormatProblem(f"{what} is not a numeric array")
    if node.attrs.get("MATLAB_empty", 0):
        # MATLAB stores an empty array as its dimensions instead of its data.
        shape = tuple(int(d) for d in node[()].ravel())
        _check_size(shape, what)
        return np.zeros(shape, dtype=np.float32)
    _check_size(node.shape, what)
    return np.asarray(node[()]).T


# The official DnCNNs hold 0.7 M weights; a dataset declaring far more is no DnCNN, and
# reading it could ask for terabytes (a few bytes of header can declare any size).
_MAX_ARRAY_SIZE = 10**8


def _check_size(shape: tuple[int, ...], what: str) -> None:
    if math.prod(shape) > _MAX_ARRAY_SIZE:
        raise _FormatProblem(f"{what} declares {'×'.join(map(str, shape))} values, far more than a DnCNN holds")


def _matlab_string(node: h5py.Dataset | h5py.Group, what: str) -> str:
    if not isinstance(node, h5py.Dataset) or node.attrs.get("MATLAB_class") != b"char":
        raise _FormatProblem(f"{what} is not a MATLAB string")
    if node.attrs.get("MATLAB_empty", 0):
        return ""
    return "".join(chr(code) for code in node[()].T.ravel())


def _cell_items(file: h5py.File, node: h5py.Dataset | h5py.Group, what: str) -> list[h5py.Dataset | h5py.Group]:
    """The elements of a MATLAB cell array, in MATLAB's (column-major) order."""
    if not isinstance(node, h5py.Dataset) or node.attrs.get("MATLAB_class") != b"cell":
        raise _FormatProblem(f"{what} is not a MATLAB cell array")
    if node.attrs.get("MATLAB_empty", 0):
        return []
    return [file[reference] for reference in node[()].T.ravel()]


def _field(layer: h5py.Group, name: str, where: str) -> h5py.Dataset | h5py.Group:
    if name not in layer:
        raise _FormatProblem(f"{where} has no field {name!r}")
    return layer[name]


def _require_option(layer: h5py.Group, name: str, expected: float, where: str) -> None:
    """Refuse a layer option (stride, pad, ...) that DnCNN's fixed layers cannot express."""
    if name not in layer:
        return
    values = _matlab_array(layer[name], f"{where} {name}").ravel()
    if not np.all(values == expected):
        raise _FormatProblem(f"{where} has {name} {values.tolist()}, only {expected:g} is supported")


def _read_conv(file: h5py.File, layer: h5py.Group, where: str) -> ConvWeights:
    arrays = _cell_items(file, _field(layer, "weights", where), f"{where} weights")
    if len(arrays) != 2:
        raise _FormatProblem(f"{where} has {len(arrays)} weight arrays, expected filters and biases")
    filters = _matlab_array(arrays[0], f"{where} filters")
    bias = _matlab_array(arrays[1], f"{where} biases").ravel()
    if not 2 <= filters.ndim <= 4:
        raise _FormatProblem(f"{where} filters have shape {filters.shape}, expected H×W×in×out")
    # Restore the trailing singleton axes MATLAB drops (one input or one output channel).
    filters = filters.reshape(filters.shape + (1,) * (4 - filters.ndim))
    height, width, _, outputs = filters.shape
    if (height, width) != (KERNEL_SIZE, KERNEL_SIZE):
        raise _FormatProblem(f"{where} has {height}×{width} filters, DnCNN needs {KERNEL_SIZE}×{KERNEL_SIZE}")
    if bias.size != outputs:
        raise _FormatProblem(f"{where} has {bias.size} biases for {outputs} filters")
    _require_option(layer, "stride", 1, where)
    _require_option(layer, "pad", (KERNEL_SIZE - 1) // 2, where)
    _require_option(layer, "dilate", 1, where)
    # MATLAB H×W×in×out -> PyTorch out×in×H×W; both correlate, so no filter flip.
    with np.errstate(over="ignore"):  # a double beyond float32's range becomes inf, refused below
        weight = np.ascontiguousarray(filters.transpose(3, 2, 0, 1), dtype=np.float32)
        bias = bias.astype(np.float32)
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise _FormatProblem(f"{where} has NaN or infinite weights (as float32)")
    return ConvWeights(weight=weight, bias=bias)


def _read_layers(file: h5py.File) -> list[ConvWeights]:
    """The convolutions of a conv, relu, ..., conv simplenn layer list."""
    if "net" not in file:
        raise _FormatProblem("no variable 'net' (not a MatConvNet model file)")
    net = file["net"]
    if not isinstance(net, h5py.Group) or "layers" not in net:
        raise _FormatProblem("'net' has no 'layers' (not a MatConvNet simplenn network)")
    layers = _cell_items(file, net["layers"], "net.layers")
    if len(layers) % 2 == 0:
        raise _FormatProblem(f"{len(layers)} layers; DnCNN alternates conv and relu and ends with conv")
    convs: list[ConvWeights] = []
    for index, layer in enumerate(layers):
        where = f"layer {index + 1}"
        if not isinstance(layer, h5py.Group):
            raise _FormatProblem(f"{where} is not a struct")
        kind = _matlab_string(_field(layer, "type", where), f"{where} type")
        expected = "conv" if index % 2 == 0 else "relu"
        if kind != expected:
            raise _FormatProblem(
                f"{where} has type {kind!r} where {expected!r} was expected "
                "(DnCNN with batch norm folded runs conv, relu, ..., conv)"
            )
        if kind == "conv":
            convs.append(_read_conv(file, layer, where))
        else:
            _require_option(layer, "leak", 0, where)
    return convs


def read_simplenn_convs(path: str | Path) -> list[ConvWeights]:
    """Read the convolutions of a MatConvNet simplenn DnCNN file, checked for structure and finiteness."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise WeightsError(f"{path}: not a MATLAB v7.3 MAT-file (HDF5)")
    try:
        with h5py.File(path, "r") as file:
            return _read_layers(file)
    except _FormatProblem as problem:
        raise WeightsError(f"{path}: {problem}") from None
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as error:
        # h5py's own errors on a damaged file: truncation, dangling references, bad datasets, a broken heap.
        raise WeightsError(f"{path}: damaged or unreadable MAT-file ({type(error).__name__}: {error})") from None


def load_matconvnet_dncnn(path: str | Path) -> DnCNN:
    """Build a DnCNN (batch norm folded) from an official MatConvNet file, in eval mode.

    Depth, channels (1 grey, 3 colour) and width are taken from the file.
    """
    convs = read_simplenn_convs(path)
    if len(convs) < 3:
        raise WeightsError(f"{path}: {len(convs)} convolutions, DnCNN needs at least 3")
    channels = convs[0].weight.shape[1]
    width = convs[0].weight.shape[0]
    expected_inputs = [channels] + [width] * (len(convs) - 1)
    expected_outputs = [width] * (len(convs) - 1) + [channels]
    for index, (conv, inputs, outputs) in enumerate(zip(convs, expected_inputs, expected_outputs)):
        if conv.weight.shape[:2] != (outputs, inputs):
            raise WeightsError(
                f"{path}: convolution {index + 1} maps {conv.weight.shape[1]} to {conv.weight.shape[0]} channels, "
                f"expected {inputs} to {outputs}"
            )
    model = DnCNN(channels=channels, depth=len(convs), width=width, batch_norm=False)
    modules = [module for module in model.body if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        for module, conv in zip(modules, convs, strict=True):
            module.weight.copy_(torch.from_numpy(conv.weight))
            module.bias.copy_(torch.from_numpy(conv.bias))
    return model.eval()


# What an imported file's metadata says made it: how --official-weights knows an import.
CONVERTED_BY = "fundus_restore.matconvnet.import_weights"


def import_weights(mat_path: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Convert an official DnCNN MatConvNet file into a self-describing safetensors file.

    ``fundus_restore.load_model(out_path)`` then gives the same network. An existing
    ``out_path`` is replaced only with ``overwrite``.
    """
    mat_path, out_path = Path(mat_path), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise WeightsError(f"{out_path}: the output must be a .safetensors file")
    if out_path.is_dir():
        raise WeightsError(f"{out_path}: a folder, not a weights file")
    if out_path.exists() and not overwrite:
        raise WeightsError(f"{out_path}: exists; replace it with --overwrite")
    model = load_matconvnet_dncnn(mat_path)
    metadata = {
        "source": "MatConvNet simplenn DnCNN weights (Zhang et al., IEEE TIP 2017)",
        "source_file": mat_path.name,
        "source_sha256": hashlib.sha256(mat_path.read_bytes()).hexdigest(),
        "converted_by": CONVERTED_BY,
    }
    try:
        return save_model(model, out_path, extra_metadata=metadata)
    except OSError as error:  # a read-only disk, a file where a folder should be...
        raise WeightsError(f"{out_path}: cannot write the weights ({error.strerror or error})") from None


@dataclass(frozen=True)
class PublishedResult:
    """A mean PSNR the DnCNN authors published for one of their released weights files."""

    weights_file: str
    model: str
    dataset: str
    psnr: float


# White Gaussian noise of sigma 25 (on 0-255), not clipped; mean PSNR over all 68 images.
PUBLISHED_SIGMA = 25.0
BENCHMARK_IMAGE_COUNT = 68
PUBLISHED_DNCNN = (
    PublishedResult("GD_Gray_Blind.mat", "DnCNN-B", "BSD68", 29.16),
    PublishedResult("sigma=25.mat", "DnCNN-S", "BSD68", 29.23),
    PublishedResult("GD_Color_Blind.mat", "CDnCNN-B", "CBSD68", 31.24),
    PublishedResult("color_sigma=25.mat", "CDnCNN-S", "CBSD68", 31.31),
)
# Covers the published figures' rounding to 0.01 dB and the noise draw: two loaders with
# different noise seeds agree within 0.02 dB on the 68-image means.
PUBLISHED_TOLERANCE_DB = 0.05


def benchmark_images(dataset_dir: str | Path) -> list[Path]:
    """The benchmark's images in a fixed (sorted) order: image i gets noise seed i."""
    return sorted(Path(dataset_dir).glob("*.png"))


def noisy_benchmark_image(image_path: Path, *, rgb: bool, seed: int, sigma: float = PUBLISHED_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy) float32 H×W×C of one benchmark image: seeded noise, not clipped."""
    clean = read_image(image_path, rgb=rgb)
    return clean, add_gaussian_noise(clean, sigma, seed=seed, clip=False)


def denoising_psnr(model: DnCNN, image_path: Path, *, seed: int, sigma: float = PUBLISHED_SIGMA) -> tuple[float, float]:
    """(noisy, denoised) PSNR of one benchmark image under the paper's protocol.

    The image is read grey or colour to match the model and goes through the network
    whole, at once.
    """
    clean, noisy = noisy_benchmark_image(image_path, rgb=model.config["channels"] == 3, seed=seed, sigma=sigma)
    with torch.inference_mode():
        batch = torch.from_numpy(np.ascontiguousarray(noisy.transpose(2, 0, 1)))[None]
        denoised = model(batch)[0].numpy().transpose(1, 2, 0)
    return psnr(clean, noisy), psnr(clean, denoised)
