"""One way to get weights: a bundled model name or a path to a safetensors file.

A weights file is self-describing: its safetensors metadata records the
``architecture`` (a registry name) and the ``config`` (constructor keyword
arguments, as JSON), so ``load_model`` needs nothing else. Bundled models live in
``fundus_restore/weights/NAME.safetensors`` with a model card ``NAME.json`` beside
them (architecture, parameters, training data, recipe, validation numbers).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as safetensors_bytes
from torch import nn

from fundus_restore.models import create_model

BUNDLED_DIR = Path(__file__).parent / "weights"
# Told the noise level (estimated per photo): above the sigma-25 specialist
# resunet-retina-green at 25, 1.4-7.3 dB above it at 10, 15 and 50 (docs/results.md).
DEFAULT_MODEL = "resunet-retina-green-blind"
# For grey (red-free) photographs: the default made grey and trained on green channels;
# 0.7-1.2 dB above grey BM3D where the colour default falls 2.1-3.4 below it (docs/results.md).
DEFAULT_GREY_MODEL = "resunet-retina-grey-blind"
# For the small photographs ``restore`` upscales: the default continued on photos shrunk
# ×2 and ×4 too; behind SRResNet 0.1-0.6 dB above the default on ×4-shrunk noisy photos
# and 0.1 dB below it on full-size ones (docs/results.md).
DEFAULT_SMALL_PHOTO_MODEL = "resunet-retina-green-blind-small"


# Classical denoisers, built by name: they have no weights to load.
WEIGHTLESS_MODELS = ("cbm3d",)


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""


def list_models() -> list[str]:
    """Names of the bundled pretrained models."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.safetensors"))


# The card measure that ranks bundled denoisers: validation PSNR on the held-out
# HEI-MED centre crops under the camera protocol (clipped, 8-bit), as real files are.
RANKING_MEASURE = "psnr_camera_centre"


def default_model_name(channels: int = 3, *, small_photos: bool = False) -> str:
    """The best bundled denoiser for images of ``channels`` channels: the default of
    ``denoise`` and the demo, or with ``small_photos`` of ``restore``.

    For colour, ``DEFAULT_MODEL`` once it is bundled (with ``small_photos``,
    ``DEFAULT_SMALL_PHOTO_MODEL`` before it); until then the colour denoiser whose card
    reports the highest ``RANKING_MEASURE`` (all bundled cards share one validation
    set). For grey (one channel), ``DEFAULT_GREY_MODEL`` when it is bundled, else the
    colour default, which takes a grey photo in all three channels.
    """
    names = list_models()
    if channels == 1 and DEFAULT_GREY_MODEL in names:
        return DEFAULT_GREY_MODEL
    if small_photos and DEFAULT_SMALL_PHOTO_MODEL in names:
        return DEFAULT_SMALL_PHOTO_MODEL
    if DEFAULT_MODEL in names:
        return DEFAULT_MODEL
    best = best_bundled_denoiser(names)
    if best is None:
        raise WeightsError("no bundled denoiser: pass --model FILE.safetensors")
    return best


def best_bundled_denoiser(
    names: list[str], accept: Callable[[dict[str, Any]], bool] = lambda card: True, channels: int = 3
) -> str | None:
    """The denoiser of ``channels``-channel images among bundled ``names`` whose card
    ``accept`` takes and reports the highest ``RANKING_MEASURE``; None if there is none.
    (A grey model's card scores grey crops: it ranks among grey models only.)"""
    cards = {n: model_card(n) for n in names}
    denoisers = [
        n for n, card in cards.items()
        if card.get("task", "denoise") == "denoise" and card.get("config", {}).get("channels", 3) == channels
        and accept(card)
    ]
    if not denoisers:
        return None
    return max(denoisers, key=lambda n: cards[n].get("validation", {}).get(RANKING_MEASURE, float("-inf")))


def model_card(name: str) -> dict[str, Any]:
    """The JSON card of a bundled model (empty if it has none)."""
    return card_beside(BUNDLED_DIR / f"{name}.safetensors")


def card_beside(weights: Path) -> dict[str, Any]:
    """The JSON card beside a weights file (``NAME.json``, as bundled and as training
    writes ``model.json``); empty if there is none."""
    card = Path(weights).with_suffix(".json")
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{card}: unreadable model card ({error})") from None


def training_noise_range(card: dict[str, Any]) -> tuple[float, float] | None:
    """(low, high) noise sigma, 0–255 scale, a card says its model was trained on; None if unsaid."""
    sigma = card.get("recipe", {}).get("noise", {}).get("sigma")
    if sigma is None:
        return None
    low, high = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    return float(low), float(high)


def resolve_weights(name_or_path: str | Path) -> Path:
    """Path of the weights file for a bundled name or a user's file."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file")
        return path
    bundled = BUNDLED_DIR / f"{name_or_path}.safetensors"
    if not bundled.is_file():
        raise WeightsError(f"{name_or_path}: not a bundled model ({', '.join(list_models()) or 'none'}) nor a file")
    return bundled


def save_model(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a self-describing safetensors file (atomically)."""
    path = Path(path)
    architecture = getattr(model, "architecture", None)
    if architecture is None:
        raise ValueError(f"{type(model).__name__} has no registered architecture name")
    metadata = {"architecture": architecture, "config": json.dumps(model.config), **(extra_metadata or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # Written by Python, not safetensors' save_file, which creates the file owner-only (0600)
    # whatever the umask: a lab's shared weights must stay readable to the others.
    partial.write_bytes(safetensors_bytes(state, metadata=metadata))
    partial.replace(path)
    return path


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        if path.suffix.lower() == ".mat":  # users try the official DnCNN file itself
            raise WeightsError(
                f"{path}: a MATLAB file, not safetensors weights: convert it with "
                f"fundus-restore import-weights {path.name} -o {path.stem}.safetensors"
            ) from None
        raise WeightsError(f"{path}: unreadable safetensors file ({error})") from None


def load_model(name_or_path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build a model and load its weights, ready for inference (eval mode).

    ``name_or_path`` is a bundled model name (see ``list_models``), a path to a
    safetensors file written by ``save_model`` / ``fundus-restore import-weights``,
    a classical denoiser (``WEIGHTLESS_MODELS``), or ``None`` for the default bundled
    denoiser. ``task``, ``noise_range`` and ``lr_denoiser`` are set from the card beside
    the file: its task, the (low, high) noise sigma of its inputs in training (0 for an
    upscaler trained behind a denoiser), and that denoiser; None where it has none.
    """
    if name_or_path in WEIGHTLESS_MODELS:
        return _described(create_model(str(name_or_path)), str(name_or_path), {"task": "denoise"}, device)
    path = resolve_weights(default_model_name() if name_or_path is None else name_or_path)
    metadata = read_metadata(path)
    if "architecture" not in metadata:
        raise WeightsError(f"{path}: no 'architecture' in its metadata; write it with fundus_restore.save_model")
    try:
        config = json.loads(metadata.get("config", "{}"))
        model = create_model(metadata["architecture"], **config)
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{path}: cannot build the model ({error})") from None
    state = load_file(str(path))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"{path}: NaN or infinite values in weight {key!r}")
    expected = model.state_dict()
    mismatches = {
        "missing": [key for key in expected if key not in state],
        "unexpected": [key for key in state if key not in expected],
        "of another shape": [key for key in state if key in expected and state[key].shape != expected[key].shape],
    }
    found = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in mismatches.items() if keys]
    if found:
        raise WeightsError(f"{path}: weights do not fit architecture {metadata['architecture']!r} "
                           f"({metadata.get('config', '{}')}): {'; '.join(found)}")
    model.load_state_dict(state)
    # Every training run writes model.safetensors: its folder is what tells one run's model from another's.
    name = f"{path.parent.name}/{path.stem}" if path.stem == "model" and path.parent.name else path.stem
    return _described(model, name, card_beside(path), device)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` is the current GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch lists its every device type: say what this toolkit runs on
        resolved = None
    # Other types torch knows (mps, xpu, meta, ...) are not run or tested here.
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {str(device)!r}: auto, cpu or cuda (cuda:N for one GPU)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available here")
        if resolved.index is None:
            # "cuda" means the current GPU; with its index it compares equal to the tensors' devices.
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _described(model: nn.Module, name: str, card: dict[str, Any], device: str | torch.device) -> nn.Module:
    """``model`` named ``name`` and described by its ``card``, in eval mode on ``device``."""
    model.name = name  # shown in reports and progress bars
    model.task = card.get("task")  # denoise, upscale or segment-vessels; None without a card
    # An upscaler trained on a denoiser's outputs (data.lr_denoiser) is best fed by that denoiser.
    model.lr_denoiser = card.get("recipe", {}).get("lr_denoiser")
    # What the model expects of its input, for the noise-level check of the command line.
    # Behind a denoiser an upscaler saw that denoiser's outputs, not the noise its card records.
    model.noise_range = (0.0, 0.0) if model.lr_denoiser else training_noise_range(card)
    return model.eval().to(resolve_device(device))


def model_name(model: nn.Module) -> str:
    """The name ``load_model`` gave ``model`` (the bundled name, or the file's stem; a training run's
    ``model.safetensors`` is named with its run folder, ``RUN/model``), else its class."""
    return getattr(model, "name", type(model).__name__)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

