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

from fundus_restore.io import write_file_atomically
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


# Checkpoint files of torch.save: pickles, never loaded from a user's path.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# The sample types weights are stored in; integers or float8 would load into nonsense.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
        content = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{card}: unreadable model card ({error})") from None
    problem = _card_problem(content)
    if problem:
        raise WeightsError(f"{card}: not a model card: {problem}")
    return content


TASKS = ("denoise", "upscale", "segment-vessels", "discriminate")


def _card_problem(card: Any) -> str | None:
    """What is wrong with the fields of a model card this package reads, or None."""
    if not isinstance(card, dict):
        return f"a JSON {type(card).__name__}, not an object"
    if card.get("task", "denoise") not in TASKS:
        return f"task {card['task']!r} is none of {', '.join(TASKS)}"
    recipe = card.get("recipe", {})
    if not isinstance(recipe, dict) or not isinstance(recipe.get("noise", {}), dict):
        return "its recipe and the recipe's noise must be objects"
    sigma = recipe.get("noise", {}).get("sigma")
    pair = isinstance(sigma, list) and len(sigma) == 2 and all(map(is_number, sigma))
    if sigma is not None and not is_number(sigma) and not pair:
        return f"recipe.noise.sigma {sigma!r} is neither a number nor [low, high]"
    return None


def is_number(value: Any) -> bool:
    """An int or float read from JSON or YAML, not a boolean (True is an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_noise_range(card: dict[str, Any]) -> tuple[float, float] | None:
    """(low, high) noise sigma, 0–255 scale, a card says its model was trained on; None if unsaid."""
    sigma = card.get("recipe", {}).get("noise", {}).get("sigma")
    if sigma is None:
        return None
    low, high = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    return float(low), float(high)


def resolve_weights(name_or_path: str | Path) -> Path:
    """Path of the weights file for a bundled name or a user's file. A bundled name wins
    over a folder of that name (an output folder named after its model, say)."""
    text = str(name_or_path)
    if not text:
        raise WeightsError("an empty model name")
    if text in list_models():
        return BUNDLED_DIR / f"{text}.safetensors"
    path = Path(name_or_path)
    if path.suffix == ".safetensors" or path.exists():
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file")
        return path
    raise WeightsError(f"{name_or_path}: no such model or weights file; the models by task are {models_by_task()}")


def models_by_task() -> str:
    """The bundled and classical models grouped by task, for messages:
    'denoise: cbm3d (classical), A, B; upscale: ...'."""
    names: dict[str, list[str]] = {"denoise": [f"{name} (classical)" for name in WEIGHTLESS_MODELS]}
    for name in list_models():
        names.setdefault(model_card(name).get("task", "denoise"), []).append(name)
    return "; ".join(f"{task}: {', '.join(found)}" for task, found in names.items())


def save_model(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a self-describing safetensors file (atomically)."""
    path = Path(path)
    architecture = getattr(model, "architecture", None)
    if architecture is None:
        raise ValueError(f"{type(model).__name__} has no registered architecture name")
    metadata = {"architecture": architecture, "config": json.dumps(model.config), **(extra_metadata or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Written by Python, not safetensors' save_file, which creates the file owner-only (0600)
    # whatever the umask: a lab's shared weights must stay readable to the others.
    write_file_atomically(path, safetensors_bytes(state, metadata=metadata))
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
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(
                f"{path}: a PyTorch pickle, not safetensors weights: it is not loaded, as unpickling an untrusted "
                "file can run code; where you trust it, load its state dict into the model and save it with "
                "fundus_restore.save_model"
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
        if not isinstance(config, dict):
            raise ValueError(f"config {metadata['config']} is not a JSON object")
        # First without memory (the meta device): a config of a huge width is refused by the
        # weights' shapes, not by the allocation it asks for.
        with torch.device("meta"):
            expected = create_model(metadata["architecture"], **config).state_dict()
    except (ValueError, TypeError, RuntimeError) as error:
        raise WeightsError(f"{path}: cannot build the model ({error})") from None
    state = load_file(str(path))
    mismatches = {
        "missing": [key for key in expected if key not in state],
        "unexpected": [key for key in state if key not in expected],
        "of another shape": [key for key in state if key in expected and state[key].shape != expected[key].shape],
    }
    found = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in mismatches.items() if keys]
    if found:
        raise WeightsError(f"{path}: weights do not fit architecture {metadata['architecture']!r} "
                           f"({metadata.get('config', '{}')}): {'; '.join(found)}")
    for key, tensor in state.items():
        if expected[key].is_floating_point() and tensor.dtype not in WEIGHT_DTYPES:
            raise WeightsError(f"{path}: weight {key!r} holds {tensor.dtype} samples, not floating point weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():  # as float32: 1e300 is inf
            raise WeightsError(f"{path}: NaN or infinite values in weight {key!r} (as float32)")
    card = card_beside(path)
    if card.get("architecture", metadata["architecture"]) != metadata["architecture"]:
        raise WeightsError(f"{path.with_suffix('.json')}: the card beside {path.name} describes a "
                           f"{card['architecture']!r}, the weights are a {metadata['architecture']!r} (a stale card?)")
    model = create_model(metadata["architecture"], **config)
    model.load_state_dict(state)
    # Every training run writes model.safetensors: its folder is what tells one run's model from another's.
    name = f"{path.parent.name}/{path.stem}" if path.stem == "model" and path.parent.name else path.stem
    return _described(model, name, card, device)


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
    model.task = card.get("task", model.task)  # denoise, upscale or segment-vessels; without a card, the architecture's
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

