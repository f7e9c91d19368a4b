"""Train a restoration network from a YAML config (see ``configs/``).

``train_from_config`` reads the config, applies command-line overrides, streams
patch batches (``fundus_restore.data``), and writes into the ``output`` folder:

* ``checkpoint.pt`` every ``checkpoint_every`` steps and at the end, written
  atomically (temporary file, fsync, rename) and holding the model, optimizer,
  scheduler, the random states and the step. Since batch k is a pure function of
  (seed, k), ``resume=True`` continues bit for bit where the run stopped (given the
  same number of processes and data workers).
* TensorBoard event files (``events.out.tfevents.*``, for ``tensorboard --logdir``;
  written by ``fundus_restore.tfevents``, as TensorBoard is not a dependency) and,
  for scripts, ``scalars.csv`` (wall_time, step, tag, value) and ``scalars.jsonl``
  (one JSON object per logged step): training loss, learning rate, patches/s, and
  validation PSNR/SSIM per noise protocol on fixed crops of held-out photographs,
  from step 0.
* ``config.yaml``, the effective config; and at the end ``model.safetensors``
  (batch norm folded) with its model card ``model.json``. After bfloat16 training a
  restoration model is first re-centred for float32 inference on fresh training
  patches (``calibration_patches``, see ``calibrate_output_bias``).

Run it on several processes with ``torchrun --nproc_per_node N -m fundus_restore
train CONFIG``: each rank trains on its own share of the patches
(DistributedDataParallel; gloo on CPU, nccl on CUDA) and only rank 0 writes.
CUDA and bfloat16 mixed precision are used when present; `mixed_precision: bfloat16`
also trains in bfloat16 on a CPU that has it.

Super-resolution (SRResNet, SRGAN) trains the same way with ``data.scale`` > 1
(low-resolution inputs shrunk from the high-resolution patches, see ``data``; with
``data.lr_denoiser`` a frozen denoiser restores the noisy small inputs first, the
paper's pipeline, ``configs/srresnet-denoised.yaml``). Its
content loss may add a ``perceptual`` term (VGG19 features from a local weights file)
(or vessel-aware features, which need no ImageNet weights: Hessian ridges or the vessel U-Net's maps)
and an ``adversarial`` one: with ``adversarial.weight`` > 0 an SRGAN discriminator
is trained in alternation with the generator after ``adversarial.start_step``
content-only (pre-training) steps. The discriminator, its optimizer and schedule are
checkpointed and resumed with the rest.

Relative paths in a config are relative to the working directory, like the
command-line overrides that replace them (``base:``, the config a config extends,
is relative to the config file).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import math
import os
import pickle
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from fundus_restore.data import PatchBatch, PatchSettings, PatchStream, ValidationCrop, split_images, validation_crops
from fundus_restore.io import ImageFileError, list_images
from fundus_restore.losses import ChannelWeightedMSE, VesselSegmentationLoss
from fundus_restore.metrics import image_quality
from fundus_restore.evaluate import mean_of_finite
from fundus_restore.inference import input_channels
from fundus_restore.vessel_metrics import dice, segmentation_auc, vessel_preservation
from fundus_restore.perceptual import VESSEL_FEATURES, PerceptualLoss, discriminator_loss, generator_loss
from fundus_restore.models import create_model, is_whole_number
from fundus_restore.pretrained import (
    WeightsError, card_beside, count_parameters, is_number, load_model, resolve_weights, save_model,
)
from fundus_restore.tfevents import EventFileWriter

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

# Every key a config may have, with its default. Unknown keys are refused (a typo
# would otherwise silently train with the default). ``model.kwargs`` is free-form.
DEFAULT_CONFIG: dict[str, Any] = {
    "seed": 0,
    "output": "runs/experiment",
    "steps": 1000,
    "batch_size": 32,
    "log_every": 20,
    "validate_every": 500,
    "checkpoint_every": 500,
    "device": "auto",  # auto | cpu | cuda
    # Stop (checkpointed, model written) at the first log step after this many minutes of
    # this invocation; --resume goes on towards `steps`. For a borrowed machine's fixed slot.
    "time_limit_minutes": None,
    # auto: bfloat16 on CUDA, float32 on the CPU | bfloat16: also on the CPU (about 2x
    # faster where it has avx512_bf16; validation stays float32) | off
    "mixed_precision": "auto",
    # After bfloat16 training, shift the output of a restoration model so that its mean
    # float32 error is zero on this many fresh training patches (0: never).
    "calibration_patches": 1024,
    "model": {"architecture": None, "kwargs": {}, "init_weights": None},
    "data": {
        "train": [],
        "patch_size": 80,
        "sigma": 25.0,  # 0–255 scale; [low, high] for a blind model
        "clip_probability": 0.5,
        "border_fraction": 0.2,
        "patches_per_image": 128,
        "images_per_group": 4,
        "workers": 1,
        "scale": 1,  # > 1: super-resolution, inputs shrunk this many times from the patches
        "targets": "clean",  # or "vessels": train a segmenter on the expert maps beside the photos
        "gain": None,  # [low, high]: random per-channel brightness of the clean patches, clipped to [0, 1]
        "sampling": "image",  # or "area": photographs drawn in proportion to pixel count (every pixel equally likely)
        # Super-resolution as the paper's second stage: a denoiser (bundled name or file) restores the
        # noisy small patches first, and the upscaler learns from its outputs (null: from the noisy ones).
        "lr_denoiser": None,
        # With scale > 1: the kernels that shrink the patches, one drawn per patch (degrade.KERNELS:
        # bicubic, bilinear, box, lanczos3), for upscalers that suit more than one camera.
        "lr_kernels": ["bicubic"],
        # The photo channels to train on (null: all); [1], the green channel, for a grey
        # denoiser of red-free photographs (with loss.weights [1] and model.kwargs.channels 1).
        "channels": None,
        # Factors by which whole photographs are shrunk before patches are cut, one drawn per
        # photo read ([1, 2, 4]: also a small camera's photographs). [1]: as they are.
        "shrink": [1],
    },
    # vessels: also thin-vessel recall, contrast retention and spurious rate of restorations
    # (the clean crop's segmentation as reference), e.g. for the vessel-loss search.
    "validation": {"holdout": 0, "among": None, "files": None, "seed": 0, "crop": 256, "sigma": 25.0, "vessels": False},
    # channel_weighted_mse (restoration; vessel_weight > 0 weights vessel pixels 1 + vessel_weight)
    # | vessel_segmentation (BCE + dice_weight × soft Dice)
    "loss": {"name": "channel_weighted_mse", "weights": [1.0, 1.0, 1.0], "vessel_weight": 0.0, "dice_weight": 1.0},
    # Content loss term on features: features null | vgg19 (SRGAN's VGG54, needs vgg_weights)
    # | vessels (multi-scale Hessian ridges of the green channel) | vessels-unet (the bundled
    # vessel U-Net's encoder maps and logits): these two need no ImageNet weights.
    "perceptual": {"features": None, "vgg_weights": None, "layer": "relu5_4", "feature_scale": 1 / 12.75},
    # weight > 0 trains an SRGAN discriminator against the model from start_step on.
    "adversarial": {"weight": 0.0, "start_step": 0, "discriminator_width": 64, "lr": None},
    # clip_grad_norm: rescale the gradients whose total norm exceeds it (null: never).
    "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "clip_grad_norm": None},
    # decay: none | step | exponential | cosine; warmup: steps of linear ramp from lr / warmup to lr
    "schedule": {"decay": "none", "lr_min": 0.0, "intervals": 10, "warmup": 0},
}
FREE_FORM = {"model.kwargs"}
# What --resume may change (whole sections, or dotted keys): how the run is carried out and
# watched, and how long it goes on; anything else would make it another run than the one resumed.
RESUMABLE_CHANGES = {"steps", "time_limit_minutes", "log_every", "validate_every", "checkpoint_every", "validation",
                     "device", "mixed_precision", "calibration_patches", "output", "data.workers"}
DECAYS = ("none", "step", "exponential", "cosine")
PRECISIONS = ("auto", "bfloat16", "off")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT = "checkpoint.pt"
RUN_LOCK = ".lock"  # held by the run training in the folder
# The smallest validation crop: room for SSIM's window and the U-Nets' 8-pixel grid.
MIN_VALIDATION_CROP = 16


class TrainingError(RuntimeError):
    """Training cannot start or go on; the message says why and what to do."""


# ----------------------------------------------------------------------------- config


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            raise TrainingError(f"unknown config key {name!r}; known: {', '.join(prefix + k for k in defaults)}")
        if isinstance(defaults[key], dict) and name not in FREE_FORM:
            if not isinstance(value, Mapping):
                raise TrainingError(f"config key {name!r} must be a mapping, got {value!r}")
            value = _merge(defaults[key], value, f"{name}.")
        elif isinstance(defaults[key], float) and isinstance(value, str):
            value = _as_number(name, value)
        merged[key] = value
    return merged


def _as_number(name: str, value: str) -> float:
    # YAML 1.1 reads "1e-5" (no dot) as a string, though everyone means a number.
    try:
        return float(value)
    except ValueError:
        raise TrainingError(f"config key {name!r} must be a number, got {value!r}") from None


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config["a"]["b"] = value`` for ``key`` "a.b" (a free-form section takes sub-keys)."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TrainingError(f"cannot override {key!r}: {part!r} is not a section")
    node[leaf] = value


def dotted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as dotted keys one section deep (``{"optimizer.lr": 1e-3, "steps": 20}``)."""
    return {f"{key}.{leaf}" if isinstance(value, Mapping) else key: item
            for key, value in config.items()
            for leaf, item in (value.items() if isinstance(value, Mapping) else [(None, value)])}


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [str(v) for v in ([value] if isinstance(value, str) else value)]


def _plain(value: Any) -> Any:
    """``value`` with paths as strings and tuples as lists: the config is written as YAML
    and stored in checkpoints, which load without unpickling arbitrary classes."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _overlay(base: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the values of ``given`` in place of its own, section by section."""
    merged = dict(base)
    for key, value in given.items():
        both_sections = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _overlay(merged[key], value) if both_sections else value
    return merged


def read_config_file(path: str | Path, _bases: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config; one with ``base: OTHER.yaml`` (relative to it) overrides that file's values."""
    path = Path(path)
    if path.resolve() in _bases:
        raise TrainingError(f"{path}: its chain of base configs comes back to it")
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise TrainingError(f"{path}: cannot read the config ({error})") from None
    if not isinstance(given, dict):
        raise TrainingError(f"{path}: not a YAML mapping of config keys")
    base = given.pop("base", None)
    return given if base is None else _overlay(read_config_file(path.parent / base, (*_bases, path.resolve())), given)


def load_config(config: str | Path | Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective config: defaults, then the YAML file (or mapping), then ``overrides``
    given as dotted keys (``{"data.train": [...], "model.init_weights": "x.mat"}``)."""
    given = copy.deepcopy(dict(config)) if isinstance(config, Mapping) else read_config_file(config)
    for key, value in (overrides or {}).items():
        _set_dotted(given, key, value)
    given = _plain(given)
    merged = _merge(DEFAULT_CONFIG, given)
    merged["data"]["train"] = _as_list(merged["data"]["train"])
    for key in ("among", "files"):
        if merged["validation"][key] is not None:
            merged["validation"][key] = _as_list(merged["validation"][key])
    lr = merged["optimizer"]["lr"]
    if not is_number(lr) or not lr > 0:
        raise TrainingError(f"optimizer.lr must be a positive number, got {lr!r}")
    schedule = merged["schedule"]
    if schedule["decay"] not in DECAYS:
        raise TrainingError(f"schedule.decay must be one of {', '.join(DECAYS)}, got {schedule['decay']!r}")
    if schedule["decay"] in ("step", "exponential") and not 0 < schedule["lr_min"] <= merged["optimizer"]["lr"]:
        raise TrainingError(f"schedule.lr_min must lie in (0, optimizer.lr] for {schedule['decay']} decay")
    if merged["mixed_precision"] not in PRECISIONS:
        raise TrainingError(f"mixed_precision must be one of {PRECISIONS}, got {merged['mixed_precision']!r}")
    if merged["device"] not in DEVICES:
        raise TrainingError(f"device must be one of {DEVICES}, got {merged['device']!r}")
    validation = merged["validation"]
    # (key, value, least value): whole numbers, not booleans (True is an int to Python: steps=true ran one step).
    whole_numbers = (
        ("steps", merged["steps"], 1), ("batch_size", merged["batch_size"], 1), ("log_every", merged["log_every"], 1),
        ("validate_every", merged["validate_every"], 1), ("checkpoint_every", merged["checkpoint_every"], 1),
        ("calibration_patches", merged["calibration_patches"], 0), ("seed", merged["seed"], 0),
        ("schedule.warmup", schedule["warmup"], 0), ("schedule.intervals", schedule["intervals"], 1),
        ("validation.holdout", validation["holdout"], 0), ("validation.seed", validation["seed"], 0),
        ("validation.crop", validation["crop"], MIN_VALIDATION_CROP),
    )
    for key, value, least in whole_numbers:
        if not is_whole_number(value) or value < least:
            raise TrainingError(f"{key} must be a whole number of at least {least}, got {value!r}")
    if schedule["decay"] == "cosine" and not 0 <= schedule["lr_min"] <= lr:  # above lr, the "decay" raised the rate
        raise TrainingError(
            f"schedule.lr_min must lie in [0, optimizer.lr] for cosine decay, got {schedule['lr_min']!r}"
        )
    for key, value in (("optimizer.weight_decay", merged["optimizer"]["weight_decay"]),
                       ("loss.vessel_weight", merged["loss"]["vessel_weight"]),
                       ("validation.sigma", validation["sigma"])):
        if not is_number(value) or value < 0:
            raise TrainingError(f"{key} must be a number of at least 0, got {value!r}")
    if schedule["warmup"] >= merged["steps"]:  # the ramp would end past the decay: the rate never reaches lr
        raise TrainingError(f"schedule.warmup ({schedule['warmup']} steps) must be shorter than the run "
                            f"(steps: {merged['steps']}); lower it with --set schedule.warmup=N")
    for key, value, unit in (("optimizer.clip_grad_norm", merged["optimizer"]["clip_grad_norm"], "number"),
                             ("time_limit_minutes", merged["time_limit_minutes"], "number of minutes")):
        if value is not None and not (is_number(value) and value > 0):
            raise TrainingError(f"{key} must be a positive {unit} or null, got {value!r}")
    data = merged["data"]
    if not is_whole_number(data["workers"]) or data["workers"] < 0:
        raise TrainingError(
            f"data.workers must be a whole number (0: read in the training process), got {data['workers']!r}"
        )
    expected_loss = "vessel_segmentation" if data["targets"] == "vessels" else "channel_weighted_mse"
    if data["targets"] not in ("clean", "vessels") or merged["loss"]["name"] != expected_loss:
        raise TrainingError(
            f"data.targets {data['targets']!r} trains with loss.name {expected_loss!r} "
            f"(targets: clean | vessels), got loss.name {merged['loss']['name']!r}"
        )
    if not is_whole_number(data["patch_size"]) or data["patch_size"] < 1:
        raise TrainingError(f"data.patch_size must be a positive whole number of pixels, got {data['patch_size']!r}")
    weights = merged["loss"]["weights"]
    if not isinstance(weights, list) or not all(is_number(w) and w >= 0 for w in weights) or not any(weights):
        raise TrainingError(
            f"loss.weights must be a list of numbers of at least 0, one per channel (e.g. [1, 3, 2]), got {weights!r}"
        )
    kept = data["channels"]
    channels = 3 if kept is None else len(kept)  # photos are read as RGB, grey ones too
    if data["targets"] == "clean" and len(merged["loss"]["weights"]) != channels:
        kept_by = "RGB photos have" if kept is None else f"data.channels {list(kept)} keeps"
        weights = list(merged["loss"]["weights"])
        raise TrainingError(f"{kept_by} {channels} channel(s): loss.weights needs as many, got {weights}")
    perceptual = merged["perceptual"]
    if perceptual["vgg_weights"] is not None and perceptual["features"] != "vgg19":
        raise TrainingError(
            f"VGG19 weights were given (--vgg-weights, perceptual.vgg_weights) but perceptual.features is "
            f"{perceptual['features']!r}: set perceptual.features=vgg19 to train against them, or leave them out"
        )
    if data["targets"] == "vessels" and (merged["perceptual"]["features"] or merged["adversarial"]["weight"] > 0):
        raise TrainingError("a vessel segmenter trains on its segmentation loss alone: no perceptual or adversarial term")
    if not is_whole_number(data["scale"]) or data["scale"] < 1 or data["patch_size"] % data["scale"]:
        raise TrainingError(f"data.scale must be a positive integer dividing data.patch_size, got {data['scale']!r}")
    if data["lr_denoiser"] is not None and (data["scale"] == 1 or not np.any(data["sigma"])):
        raise TrainingError("data.lr_denoiser restores noisy small inputs: it needs data.scale > 1 and data.sigma > 0")
    try:
        _patch_settings(data)  # refuse bad patch settings before any output is written
    except (ValueError, TypeError) as error:
        raise TrainingError(f"data: {error}") from None
    return merged


def strict_json(value: Any, **options: Any) -> str:
    """``value`` as standard JSON: a NaN or infinite number (a measure with nothing to
    measure) becomes null, which every JSON parser reads, where Python's bare NaN is not JSON."""
    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(entry) for entry in item]
        return item

    return json.dumps(finite(value), allow_nan=False, **options)


# ----------------------------------------------------------------------------- pieces


def learning_rate_factor(
    step: int, *, steps: int, decay: str, lr: float, lr_min: float, intervals: int, warmup: int = 0
) -> float:
    """Multiplier of the initial ``lr`` at ``step``: from 1 down to ``lr_min / lr`` at the end.

    ``exponential`` decays smoothly and geometrically, ``step`` the same way in
    ``intervals`` constant pieces (DnCNN's recipe), ``cosine`` along a half cosine.
    The first ``warmup`` steps ramp it up linearly: Adam's first steps move every weight
    by about the full rate whatever its gradient, which one step at 3e-5 showed to cost
    a converged DnCNN 15 dB and a bicubic-initialised SRResNet 9 dB.
    """
    ramp = min((step + 1) / warmup, 1.0) if warmup else 1.0
    if decay == "none":
        return ramp
    progress, floor = min(step / steps, 1.0), lr_min / lr
    if decay == "exponential":
        decayed = floor**progress
    elif decay == "step":
        piece = min(int(progress * intervals), intervals - 1)
        decayed = floor ** (piece / max(intervals - 1, 1))
    else:
        decayed = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return ramp * decayed


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """A new model, or one initialised from ``init_weights``: a bundled name, a
    safetensors file or an official DnCNN MatConvNet ``.mat`` file."""
    architecture, kwargs, init = model_config["architecture"], model_config["kwargs"], model_config["init_weights"]
    if init is None:
        if architecture is None:
            raise TrainingError("the config needs model.architecture or model.init_weights")
        try:
            return create_model(architecture, **kwargs)
        except (ValueError, TypeError) as error:  # unknown architecture; a misspelt model.kwargs key
            raise TrainingError(f"model: {error}") from None
    if Path(init).suffix.lower() == ".mat":
        from fundus_restore.matconvnet import load_matconvnet_dncnn

        model = load_matconvnet_dncnn(init)
    else:
        model = load_model(init)
    if architecture not in (None, model.architecture):
        raise TrainingError(f"{init}: holds a {model.architecture!r} model, but model.architecture is {architecture!r}")
    mismatched = {k: v for k, v in kwargs.items() if model.config.get(k) != v}
    if mismatched:
        # A model may accept config changes that keep its function (DnCNN's range inputs):
        # training then begins from the very weights given.
        refused = TrainingError(f"{init}: model.kwargs {mismatched} differ from the weights' {model.config}")
        if not hasattr(model, "with_config"):
            raise refused
        try:
            model = model.with_config(mismatched)
        except ValueError:
            raise refused from None
    return model.train()


def _output_bias(model: nn.Module) -> torch.Tensor:
    """The bias of the model's last convolution, which its output is built from."""
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    if not convolutions:
        raise ValueError(f"{type(model).__name__} has no convolution with a bias to calibrate")
    return convolutions[-1].bias


@torch.no_grad()
def calibrate_output_bias(model: nn.Module, batches: Iterable[PatchBatch]) -> np.ndarray:
    """Shift ``model``'s output, through its last convolution's bias, so that its mean
    float32 error on ``batches`` is zero in every channel; returns the shift (0–1 scale).

    Why: a network trained under bfloat16 autocast learns to offset bfloat16's rounding,
    and in float32 (how it is evaluated and run) keeps that offset as a bias: +1/255 in
    green for the DnCNN fine-tunes here. Refuses a model whose last bias does not move
    its output one to one (a segmenter's logits, or a layer after it).
    """
    was_training = model.training
    model.eval()
    bias = _output_bias(model)
    error_sums, pixels, probe = torch.zeros_like(bias, dtype=torch.float64), 0, None
    for batch in batches:
        noisy, clean, sigma = (t.to(bias.device) for t in (batch.noisy, batch.clean, batch.sigma))
        restored = model(noisy, sigma).float()
        error_sums += (restored - clean).sum(dim=(0, 2, 3), dtype=torch.float64)
        pixels += clean.numel() // clean.shape[1]
        probe = (noisy, sigma, restored) if probe is None else probe
    if probe is None:
        raise ValueError("no batches to calibrate on")
    # Which way the bias moves the output: +1 (output = ... + conv), -1 (DnCNN's x - conv).
    noisy, sigma, restored = probe
    bias += 1e-2
    direction = ((model(noisy, sigma).float() - restored) / 1e-2).mean(dim=(0, 2, 3))
    bias -= 1e-2
    model.train(was_training)
    if not torch.allclose(direction.abs(), torch.ones_like(direction), atol=1e-2):
        raise ValueError(f"{type(model).__name__}: its last bias does not shift its output one to one")
    mean_error = (error_sums / pixels).to(bias.dtype)
    bias -= direction.sign() * mean_error
    return (-mean_error).cpu().numpy()


def calibrate_on_training_data(model: nn.Module, config: Mapping[str, Any], images: list[Path], start_step: int) -> dict[str, Any]:
    """Re-centre ``model`` on ``calibration_batches``; returns the card's record of it."""
    shift = calibrate_output_bias(model, calibration_batches(config, images, start_step))
    return {"patches": config["calibration_patches"], "output_shift_255": [round(float(v) * 255, 4) for v in shift]}


def calibration_batches(config: Mapping[str, Any], images: list[Path], start_step: int) -> Iterator[PatchBatch]:
    """``calibration_patches`` fresh patches of the run's training images (batches of its size,
    after step ``start_step``), each batch from new photographs to spread them widely; with
    ``data.lr_denoiser`` their inputs are that denoiser's outputs, as in training."""
    batch_size = config["batch_size"]
    settings = _patch_settings(config["data"])
    settings = replace(settings, patches_per_image=max(1, batch_size // settings.images_per_group))
    stream = PatchStream(images, batch_size=batch_size, settings=settings, seed=config["seed"], start_step=start_step)
    batches = (stream.batch(start_step + k) for k in range(math.ceil(config["calibration_patches"] / batch_size)))
    denoiser = _input_denoiser(config["data"]["lr_denoiser"], torch.device("cpu"))
    if denoiser is None:
        return batches
    # Frozen weights and inputs that need no gradient: no graph is built.
    return (batch._replace(noisy=denoiser(batch.noisy, batch.sigma)) for batch in batches)


def _random_states() -> dict[str, Any]:
    """Python, NumPy and torch random states as tensors and lists (loadable with weights_only)."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(python_state), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _restore_random_states(states: Mapping[str, Any]) -> None:
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomically(payload: Any, path: Path) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``, even on a crash."""
    partial_path = path.with_name(path.name + ".partial")
    with open(partial_path, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial_path, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by the trainer, loaded without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise TrainingError(f"{path}: not a readable training checkpoint ({type(error).__name__})") from None


def _lines_up_to(path: Path, step: int | None, step_of: Callable[[str], int]) -> list[str]:
    """The lines of a log logged at ``step`` or before (none for a fresh run). Lines that
    do not parse (a header, or a last line cut short by the interruption) are dropped."""
    if step is None or not path.exists():
        return []
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if step_of(line) <= step:
                kept.append(line)
        except (ValueError, IndexError, KeyError):
            continue
    return kept


class ScalarLog:
    """Scalars by step in a TensorBoard event file, ``scalars.csv`` and ``scalars.jsonl``.
    On resume, CSV and JSONL entries after the checkpoint's step (logged by the interrupted
    run) are dropped; the old event files are left as they are and a new one starts after
    that step, from which TensorBoard then drops what they logged beyond it."""

    CSV_HEADER = "wall_time,step,tag,value"

    def __init__(self, directory: Path, *, resume_step: int | None = None) -> None:
        self.csv_path, self.jsonl_path = directory / "scalars.csv", directory / "scalars.jsonl"
        csv_lines = _lines_up_to(self.csv_path, resume_step, lambda line: int(line.split(",")[1]))
        json_lines = _lines_up_to(self.jsonl_path, resume_step, lambda line: int(json.loads(line)["step"]))
        self.csv_path.write_text("".join(line + "\n" for line in [self.CSV_HEADER, *csv_lines]), encoding="utf-8")
        self.jsonl_path.write_text("".join(line + "\n" for line in json_lines), encoding="utf-8")
        self.events = EventFileWriter(directory, start_step=0 if resume_step is None else resume_step + 1)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        now = time.time()
        with open(self.csv_path, "a", encoding="utf-8") as handle:
            handle.writelines(f"{now:.3f},{step},{tag},{value:.7g}\n" for tag, value in scalars.items())
        with open(self.jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, "wall_time": round(now, 3), **scalars}) + "\n")
        self.events.add_scalars(step, scalars, now)


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among ``world_size`` and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def _placement(device_name: str) -> Iterator[Placement]:
    """This process's rank and device; joins the process group when run by torchrun."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if device_name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device is 'cuda' but PyTorch sees no CUDA device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # patch shapes never change: let cuDNN time its kernels once
    if world_size == 1:
        yield Placement(0, 1, device)
        return
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield Placement(dist.get_rank(), world_size, device)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- trainer


def _input_denoiser(name_or_path: str | None, device: torch.device) -> nn.Module | None:
    """The frozen denoiser of ``data.lr_denoiser``, or None."""
    if name_or_path is None:
        return None
    from fundus_restore.inference import check_denoiser

    try:
        return check_denoiser(load_model(name_or_path)).requires_grad_(False).to(device)
    except ValueError as error:  # WeightsError is one
        raise TrainingError(f"data.lr_denoiser: {error}") from None


def _perceptual_loss(settings: Mapping[str, Any], device: torch.device) -> PerceptualLoss | None:
    """The configured feature loss, refusing before training where its weights are missing."""
    features = settings["features"]
    if features is None:
        return None
    if features in VESSEL_FEATURES:
        return PerceptualLoss(VESSEL_FEATURES[features](), settings["feature_scale"]).to(device)
    if features != "vgg19":
        choices = ", ".join(repr(choice) for choice in ("vgg19", *VESSEL_FEATURES))
        raise TrainingError(f"perceptual.features must be one of null, {choices}; got {features!r}")
    if settings["vgg_weights"] is None:
        raise TrainingError(
            "perceptual.features 'vgg19' needs ImageNet VGG19 weights: give a local file in torchvision's "
            "state-dict layout with --vgg-weights PATH (nothing is downloaded), or set perceptual.features to null"
        )
    from fundus_restore.models.vgg import VGG19Features

    extractor = VGG19Features.from_file(settings["vgg_weights"], layer=settings["layer"])
    return PerceptualLoss(extractor, settings["feature_scale"]).to(device)



class Trainer:
    """Model, loss, optimizer and schedule of one run, stepped one batch at a time."""

    def __init__(self, config: Mapping[str, Any], placement: Placement) -> None:
        self.config = config
        self.placement = placement
        torch.manual_seed(config["seed"])  # the same initial weights on every rank and run
        # Channels-last is the layout oneDNN and cuDNN convolve fastest (1.1x float32, 2x bfloat16 on the CPU).
        self.model = build_model(config["model"]).to(placement.device, memory_format=torch.channels_last)
        # Refused here, before the run folder exists, not as a shape error at the first step.
        channels, kept = input_channels(self.model), config["data"]["channels"]
        patch_channels = 3 if kept is None else len(kept)
        if channels is not None and channels != patch_channels:
            source = config["model"]["init_weights"] or config["model"]["architecture"]
            raise TrainingError(f"model {source}: takes {channels}-channel images, but the patches have {patch_channels} "
                                f"({'RGB' if kept is None else f'data.channels {list(kept)}'})")
        init = config["model"]["init_weights"]
        # A bundled name can come to hold other weights: the card keeps which file this run started from.
        self.init_weights_sha256 = None if init is None else hashlib.sha256(resolve_weights(init).read_bytes()).hexdigest()
        self.network: nn.Module = self.model
        if placement.world_size > 1:
            device_ids = [placement.device.index] if placement.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)
        loss = config["loss"]
        self.segmentation = config["data"]["targets"] == "vessels"
        self.criterion: nn.Module = (
            VesselSegmentationLoss(loss["dice_weight"]) if self.segmentation
            else ChannelWeightedMSE(loss["weights"], loss["vessel_weight"])
        ).to(placement.device)
        self.perceptual = _perceptual_loss(config["perceptual"], placement.device)
        self.input_denoiser = _input_denoiser(config["data"]["lr_denoiser"], placement.device)
        optimizer_config, schedule = config["optimizer"], config["schedule"]
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=optimizer_config["lr"], weight_decay=optimizer_config["weight_decay"]
        )
        self.factor = partial(learning_rate_factor, steps=config["steps"], lr=optimizer_config["lr"], **schedule)
        self.scheduler = LambdaLR(self.optimizer, self.factor)
        self.adversarial = config["adversarial"]
        self.discriminator: nn.Module | None = None
        if self.adversarial["weight"] > 0:
            self._build_discriminator()
        precision = config["mixed_precision"]
        self.autocast = precision == "bfloat16" or (precision == "auto" and placement.device.type == "cuda")
        self.step = 0
        self.train_seconds = 0.0  # time spent in training steps, over all resumed runs
        # Training photographs found unusable (path -> problem), by any rank: the card leaves them out.
        self.skipped_photos: dict[str, str] = {}

    def _build_discriminator(self) -> None:
        device, lr = self.placement.device, self.adversarial["lr"] or self.config["optimizer"]["lr"]
        self.discriminator = create_model(
            "srgan-discriminator", width=self.adversarial["discriminator_width"]
        ).to(device, memory_format=torch.channels_last)
        self.critic: nn.Module = self.discriminator
        if self.placement.world_size > 1:
            device_ids = [device.index] if device.type == "cuda" else None
            self.critic = DistributedDataParallel(self.discriminator, device_ids=device_ids)
        self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr)
        self.discriminator_scheduler = LambdaLR(self.discriminator_optimizer, self.factor)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _adversarial_now(self) -> bool:
        return self.discriminator is not None and self.step >= self.adversarial["start_step"]

    def train_step(self, noisy: torch.Tensor, clean: torch.Tensor, sigma: torch.Tensor) -> dict[str, float]:
        """One optimisation step (of the discriminator, then the model, when adversarial);
        returns the losses averaged over ranks: ``loss`` (the model's total) and its terms.

        A NaN or infinite loss raises ``TrainingError`` before the weights are touched,
        so the last checkpoint stays the last good state.
        """
        device = self.placement.device
        noisy, clean, sigma = (t.to(device, non_blocking=True) for t in (noisy, clean, sigma))
        # The input denoiser runs in float32, as `restore` runs it, not under the model's autocast.
        noisy = self.model_input(noisy, sigma).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
            restored = self.network(noisy, sigma)
        terms: dict[str, torch.Tensor] = {}
        reported: dict[str, float] = {}  # averaged over ranks once each
        fake_logits = None
        if self._adversarial_now():
            # One forward over real and generated images: DistributedDataParallel expects one per backward.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.critic(torch.cat([clean, restored.detach()]).contiguous(memory_format=torch.channels_last))
            real_logits, detached_logits = logits.float().chunk(2)
            critic_loss = discriminator_loss(real_logits, detached_logits)
            reported["discriminator"] = self._check_finite(self._averaged(critic_loss), "discriminator loss")
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            critic_loss.backward()
            self.discriminator_optimizer.step()
            self.discriminator_scheduler.step()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast):
                fake_logits = self.critic(restored).float()
        if self.perceptual is None and fake_logits is None:
            loss = self.criterion(restored.float(), clean)
        else:
            parts = generator_loss(
                restored.float(), clean, fake_logits, pixel_loss=self.criterion,
                perceptual=self.perceptual, adversarial_weight=self.adversarial["weight"],
            )
            loss = parts.total
            terms |= {"pixel": parts.pixel, "perceptual": parts.perceptual, "adversarial": parts.adversarial}
        value = self._check_finite(self._averaged(loss), "loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # A finite loss can still have infinite gradients, and one step with them leaves NaN weights.
        # DistributedDataParallel's backward left the same averaged gradients on every rank: no all-reduce.
        trained = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in trained])
        reported["grad_norm"] = self._check_finite(norm.item(), "gradient norm")
        clip = self.config["optimizer"]["clip_grad_norm"]
        if clip is not None:
            # One outlier batch can throw a normalisation-free network off for thousands of steps.
            torch.nn.utils.clip_grads_with_norm_(trained, clip, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": value} | reported | {name: self._averaged(term) for name, term in terms.items()}

    @torch.no_grad()
    def model_input(self, noisy: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """What the model restores: ``noisy``, or with ``data.lr_denoiser`` that denoiser's output."""
        return noisy if self.input_denoiser is None else self.input_denoiser(noisy, sigma)

    def _averaged(self, value: torch.Tensor) -> float:
        reported = value.detach().float().clone()
        if self.placement.world_size > 1:
            dist.all_reduce(reported)  # every rank sees a NaN anywhere and stops together
            reported /= self.placement.world_size
        return reported.item()

    def _check_finite(self, number: float, what: str) -> float:
        """``number``, the same on every rank; a NaN or infinity stops training."""
        if not math.isfinite(number):
            raise self.stopped(f"step {self.step + 1}: the {what} is {number}")
        return number

    def stopped(self, why: str) -> TrainingError:
        """The error that stops a run gone wrong: ``why``, what is kept, and what to do."""
        checkpoint = Path(self.config["output"]) / CHECKPOINT
        kept = (f"the last good checkpoint, {checkpoint}, is kept" if checkpoint.exists()
                else f"no checkpoint had been written yet (checkpoint_every: {self.config['checkpoint_every']})")
        # --resume continues as configured, so it would diverge again: a lower rate is a new run.
        return TrainingError(f"{why}; training stopped and {kept} (start a new run with a lower optimizer.lr, "
                             "or check the training images)")

    def scored(self, crops: list[ValidationCrop], model: nn.Module | None = None) -> dict[str, float]:
        """``validate``, stopping the run with ``stopped`` where the output cannot be scored:
        a model that diverged to large finite values returns far off the image scale."""
        try:
            return self.validate(crops, model)
        except ValueError as error:
            raise self.stopped(f"step {self.step}: validation cannot score the model's output, which has "
                               f"likely diverged ({error})") from None

    @torch.no_grad()
    def validate(self, crops: list[ValidationCrop], model: nn.Module | None = None) -> dict[str, float]:
        """Mean PSNR and SSIM over the validation crops, per noise protocol and region,
        of the model being trained or of ``model`` (e.g. the final one)."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        scores: dict[str, list[float]] = {}
        for crop in crops:
            noisy = torch.from_numpy(crop.noisy.transpose(2, 0, 1)[None].copy()).to(self.placement.device)
            # In float32 (bfloat16 would cap PSNR near the values being measured) and not
            # clipped, like the restorations `evaluate` scores, so that the numbers agree.
            restored_image = model(self.model_input(noisy, crop.sigma), crop.sigma)[0].permute(1, 2, 0).cpu().numpy()
            if self.segmentation:  # logits of the vessel map against the expert's
                probability, truth = 1 / (1 + np.exp(-restored_image[..., 0])), crop.clean[..., 0] > 0.5
                fov = crop.mask.astype(bool)
                quality = {"dice": dice((probability > 0.5) & fov, truth & fov),
                            "auc": segmentation_auc(probability[fov], truth[fov])}
            else:
                quality = image_quality(crop.clean, restored_image, mask=crop.mask)
                if self.config["validation"]["vessels"]:
                    quality |= vessel_preservation(crop.clean, restored_image, fov=crop.mask, scale=crop.vessel_scale)
            for measure in self._validation_measures():
                scores.setdefault(f"val/{measure}_{crop.protocol}_{crop.region}", []).append(float(quality[measure]))
        model.train(was_training)
        return {tag: mean_of_finite(values) for tag, values in scores.items()}

    def _validation_measures(self) -> tuple[str, ...]:
        if self.segmentation:
            return ("dice", "auc")
        vessels = ("thin_recall", "thin_contrast_retention", "spurious_rate")
        return ("psnr", "ssim") + (vessels if self.config["validation"]["vessels"] else ())

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "random": _random_states(),
            "data_stream": {
                "seed": self.config["seed"],
                "step": self.step,
                "world_size": self.placement.world_size,
                "workers": self.config["data"]["workers"],
            },
            "config": dict(self.config),
            "skipped_photos": self.skipped_photos,
        } | self._discriminator_state()

    def share_skipped_photos(self) -> None:
        """Every rank's skipped photographs, known to every rank (a collective call)."""
        if self.placement.world_size > 1:
            found: list[dict[str, str]] = [{} for _ in range(self.placement.world_size)]
            dist.all_gather_object(found, self.skipped_photos)
            self.skipped_photos = {path: problem for rank in found for path, problem in sorted(rank.items())}

    def _discriminator_state(self) -> dict[str, Any]:
        if self.discriminator is None:
            return {}
        return {
            "discriminator": self.discriminator.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "discriminator_scheduler": self.discriminator_scheduler.state_dict(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.discriminator is not None and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
            self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
            self.discriminator_scheduler.load_state_dict(state["discriminator_scheduler"])
        _restore_random_states(state["random"])
        self.step, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.skipped_photos = dict(state.get("skipped_photos", {}))

    def final_model(self) -> nn.Module:
        """The trained model for inference, batch norm folded where the model can."""
        model = self.model.eval()
        return model.fold_batch_norm() if hasattr(model, "fold_batch_norm") else model

    @property
    def calibrates(self) -> bool:
        """Whether the final model is re-centred for float32 (see ``calibrate_output_bias``)."""
        return self.autocast and not self.segmentation and self.config["calibration_patches"] > 0


# ----------------------------------------------------------------------------- run


def training_split(config: Mapping[str, Any]) -> tuple[list[Path], list[Path]]:
    """The run's training and validation photographs, as its config splits them."""
    data, validation = config["data"], config["validation"]
    for key, option, paths in (("data.train", "--data", data["train"]),
                               ("validation.among", "--validate-on", validation["among"] or [])):
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise TrainingError(f"{key} ({option}): no such file or folder: {', '.join(missing)}")
        # A folder without photos is a mistake to name, not to skip (e.g. a TIFF archive's .tiff mistyped).
        empty = [str(p) for p in paths if Path(p).is_dir() and not list_images([Path(p)])]
        if empty:
            raise TrainingError(f"{key} ({option}): no image files in {', '.join(empty)}")
    images = list_images([Path(p) for p in data["train"]])
    if not images:
        raise TrainingError("no training images: name their folders with --data (data.train)")
    among = None if validation["among"] is None else list_images([Path(p) for p in validation["among"]])
    try:
        return split_images(
            images, holdout=validation["holdout"], among=among, names=validation["files"], seed=validation["seed"]
        )
    except ValueError as error:
        raise TrainingError(
            f"validation split: {error} (validation.holdout photographs are held out of the --data photographs, "
            "from those among --validate-on when given)"
        ) from None


def run_validation_crops(config: Mapping[str, Any], images: list[Path]) -> list[ValidationCrop]:
    """The fixed validation crops of ``images`` for a run of ``config``: its crop size, noise
    level, scale, targets and channels."""
    validation, data = config["validation"], config["data"]
    return validation_crops(images, crop=validation["crop"], sigma=validation["sigma"], scale=data["scale"],
                            targets=data["targets"], channels=data["channels"])


def _patch_settings(data: Mapping[str, Any]) -> PatchSettings:
    """The patch stream's settings from the config's ``data`` section."""
    return PatchSettings(
        patch_size=data["patch_size"],
        sigma=data["sigma"] if isinstance(data["sigma"], (int, float)) else tuple(data["sigma"]),
        clip_probability=data["clip_probability"],
        border_fraction=data["border_fraction"],
        patches_per_image=data["patches_per_image"],
        images_per_group=data["images_per_group"],
        scale=data["scale"],
        targets=data["targets"],
        gain=None if data["gain"] is None else tuple(data["gain"]),
        sampling=data["sampling"],
        lr_kernels=tuple(data["lr_kernels"]),
        channels=None if data["channels"] is None else tuple(data["channels"]),
        shrink=tuple(data["shrink"]),
    )


def _patch_stream(config: Mapping[str, Any], images: list[Path], start_step: int, placement: Placement) -> PatchStream:
    settings = _patch_settings(config["data"])
    return PatchStream(
        images,
        batch_size=config["batch_size"],
        settings=settings,
        seed=config["seed"],
        start_step=start_step,
        rank=placement.rank,
        world_size=placement.world_size,
    )


def _progress(console: Console, disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3g}  {task.fields[rate]:.0f} patches/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )


def _resume_state(config: Mapping[str, Any], resume: bool, world_size: int, console: Console) -> dict[str, Any] | None:
    """The checkpoint to resume from (None for a fresh run), refusing to overwrite a run by mistake."""
    output = Path(config["output"])
    checkpoint = output / CHECKPOINT
    if not resume:
        _refuse_earlier_run(output)
        return None
    if not checkpoint.exists():
        raise TrainingError(f"{checkpoint}: no checkpoint to resume from")
    state = load_checkpoint(checkpoint)
    if config["steps"] < state["step"]:
        raise TrainingError(f"{output}: steps {config['steps']} is below the step the checkpoint has reached, "
                            f"{state['step']}; resume with steps of at least {state['step']}")
    before = dotted_config(state["config"])
    changed = sorted(key for key, value in dotted_config(config).items() if before.get(key) != value)
    refused = [key for key in changed if key not in RESUMABLE_CHANGES and key.split(".")[0] not in RESUMABLE_CHANGES]
    if refused:
        raise TrainingError(
            f"{output}: --resume continues the run as it was configured, but {', '.join(refused)} changed; "
            f"to train on with other settings, start a new run from its weights (--init-weights "
            f"{output / 'model.safetensors'}, written when it ends) in another folder"
        )
    if changed:
        console.print(f"[yellow]note:[/] resuming with changed settings: {', '.join(changed)}")
    if config["steps"] != state["config"]["steps"] and config["schedule"]["decay"] != "none":
        factor = partial(learning_rate_factor, lr=config["optimizer"]["lr"], **config["schedule"])
        at, lr = state["step"], config["optimizer"]["lr"]
        console.print(
            f"[yellow]note:[/] the {config['schedule']['decay']} decay is laid out anew over {config['steps']} steps: "
            f"at step {at} the learning rate moves from {lr * factor(at, steps=state['config']['steps']):.3g} "
            f"to {lr * factor(at, steps=config['steps']):.3g}"
        )
    stream = state["data_stream"]
    if (stream["world_size"], stream["workers"]) != (world_size, config["data"]["workers"]):
        console.print("[yellow]note:[/] process or worker count changed: batches from here on differ from the original run")
    return state


def _refuse_earlier_run(output: Path) -> None:
    """A new run does not write over an earlier run's checkpoint or model."""
    if (output / CHECKPOINT).exists():
        raise TrainingError(f"{output}: holds a checkpoint of an earlier run; resume it or choose another output")
    if (output / "model.safetensors").exists():  # a finished run whose checkpoint was removed
        raise TrainingError(f"{output}: holds the model of an earlier run; choose another output")


class _RunFolderLock:
    """The lock on a run folder's ``RUN_LOCK`` file, from ``take`` until the ``with`` block ends: a
    second run in the same folder is refused, not interleaved with this one's checkpoints and logs.
    The operating system's own lock (flock; msvcrt on Windows), so a killed run never leaves it held."""

    # What a lock held elsewhere raises; any other error means the filesystem cannot lock.
    _HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK)

    def __init__(self, output: Path) -> None:
        self.output = output
        self.handle: IO[str] | None = None
        self.unlockable = False  # a filesystem without locks (said once)

    def take(self) -> bool:
        """Lock the folder (which must exist) unless this run holds it already; True when it took it now."""
        if self.handle is not None or self.unlockable:
            return False
        handle = (self.output / RUN_LOCK).open("a", encoding="utf-8")
        try:
            self._lock(handle, unlock=False)
        except OSError as error:
            handle.close()
            if error.errno in self._HELD:
                raise TrainingError(f"{self.output}: another run is training in this folder; "
                                    "wait for it to end or choose another output") from None
            self.unlockable = True
            warnings.warn(f"{self.output}: the folder cannot be locked ({error.strerror or error}): "
                          "nothing stops a second run in it", stacklevel=2)
            return False
        self.handle = handle
        return True

    @staticmethod
    def _lock(handle: IO[str], *, unlock: bool) -> None:
        if sys.platform == "win32":
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK if unlock else msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(handle, fcntl.LOCK_UN if unlock else fcntl.LOCK_EX | fcntl.LOCK_NB)

    def __enter__(self) -> _RunFolderLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            # Unlocked, not only closed: forked DataLoader workers share the file and would keep it locked
            # while a failed run's traceback keeps them alive.
            self._lock(self.handle, unlock=True)
            self.handle.close()
            self.handle = None


def _model_card(
    trainer: Trainer,
    model: nn.Module,
    train_images: list[Path],
    validation_images: list[Path],
    scores: dict[str, float],
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the saved ``model`` is and how it was trained: the card beside its weights."""
    config = trainer.config
    data = config["data"]
    patches = trainer.step * config["batch_size"] * trainer.placement.world_size
    used = [p for p in train_images if str(p) not in trainer.skipped_photos]
    return {
        "task": "segment-vessels" if trainer.segmentation else "denoise" if data["scale"] == 1 else "upscale",
        "summary": f"{model.architecture} trained {trainer.step} steps on {len(used)} fundus photographs",
        "architecture": model.architecture,
        "config": model.config,
        "parameters": count_parameters(model),
        "training_data": {
            "sources": data["train"],
            "images": [p.name for p in used],
            "skipped_images": [{"image": Path(path).name, "problem": problem.removeprefix(f"{path}: ")}
                               for path, problem in trainer.skipped_photos.items()],  # no paths of this machine
            "validation_images": [p.name for p in validation_images],
        },
        "recipe": {
            "init_weights": config["model"]["init_weights"],
            "init_weights_sha256": trainer.init_weights_sha256,
            "optimizer": {"name": "Adam", **config["optimizer"]},
            "schedule": config["schedule"],
            "steps": trainer.step,
            "batch_size": config["batch_size"] * trainer.placement.world_size,
            "patch_size": data["patch_size"],
            "loss": {
                "name": config["loss"]["name"],
                **({"dice_weight": config["loss"]["dice_weight"]} if trainer.segmentation
                   else {"weights": list(trainer.criterion.weights), "vessel_weight": trainer.criterion.vessel_weight}),
                "perceptual": config["perceptual"] if config["perceptual"]["features"] else None,
                "adversarial": config["adversarial"] if trainer.discriminator is not None else None,
            },
            "scale": data["scale"],
            "lr_denoiser": data["lr_denoiser"],
            "lr_kernels": data["lr_kernels"],
            "channels": data["channels"],
            "shrink": data["shrink"],
            "noise": {
                "sigma": data["sigma"],
                "clip_probability": data["clip_probability"],
                "border_fraction": data["border_fraction"],
            },
            "seed": config["seed"],
        },
        "training": {
            "wall_time_s": round(trainer.train_seconds, 1),
            "device": trainer.placement.device.type,
            "device_name": torch.cuda.get_device_name(trainer.placement.device)
            if trainer.placement.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "processes": trainer.placement.world_size,
            "patches_per_s": round(patches / max(trainer.train_seconds, 1e-9), 1),
            "output_calibration": calibration,
            "earlier_stages": earlier_stages(config["model"]["init_weights"]),
        },
        "validation": card_validation(config, scores),
        "training_config": config,
    }


def earlier_stages(init_weights: str | None) -> list[dict[str, Any]]:
    """The training behind ``init_weights``, most recent stage first: its card's run and the
    stages that card lists, so that a model fine-tuned over several runs records its whole
    budget. Empty from scratch, and for weights without a card (the official DnCNN .mat)."""
    if init_weights is None:
        return []
    try:
        card = card_beside(resolve_weights(init_weights))
    except WeightsError:
        return []
    if "training" not in card:
        return []
    recipe, training = card["recipe"], card["training"]
    stage = {"init_weights": recipe["init_weights"], "init_weights_sha256": recipe.get("init_weights_sha256"),
             "steps": recipe["steps"], "batch_size": recipe["batch_size"],
             "patch_size": recipe["patch_size"], "wall_time_s": training["wall_time_s"],
             "device_name": training["device_name"]}
    return [stage, *training.get("earlier_stages", [])]


def card_validation(config: Mapping[str, Any], scores: Mapping[str, float]) -> dict[str, Any]:
    """A model card's validation block: the crop and noise, and the ``val/`` scores."""
    return {
        "crop": config["validation"]["crop"],
        "sigma": config["validation"]["sigma"],
        **{tag.removeprefix("val/"): round(value, 4) for tag, value in scores.items()},
    }


def _next_batch(batches: Iterator[PatchBatch]) -> PatchBatch:
    """The next batch. A bad photograph found by a DataLoader worker keeps its one-line
    message: torch re-raises it with the worker's traceback as the message."""
    try:
        return next(batches)
    except ImageFileError as error:
        original = str(error).strip().splitlines()[-1]
        raise ImageFileError(original.removeprefix(f"{ImageFileError.__module__}.ImageFileError: ")) from None


def train_from_config(
    config: str | Path | Mapping[str, Any], *, resume: bool = False, overrides: Mapping[str, Any] | None = None
) -> Path:
    """Train as the config says; returns the path of the final ``model.safetensors``."""
    settings = load_config(config, overrides)
    console = Console(stderr=True)
    with _placement(settings["device"]) as placement:
        return _run(settings, resume, placement, console)


def _check_resumed_run(output: Path, state: Mapping[str, Any], run_record: Mapping[str, Any]) -> None:
    """Refuse to resume on other photographs or from other initial weights than the checkpoint's run:
    a photo held out would be trained on, one trained on reported as held out, and the card would
    name weights the run did not start from. (Checkpoints written before the record was kept pass.)"""
    if "split" in state and state["split"] != run_record["split"]:
        before, now = state["split"], run_record["split"]
        moved = sorted({*before["train"], *before["validation"]} ^ {*now["train"], *now["validation"]})
        what = f"photos added or removed: {', '.join(Path(p).name for p in moved[:3])}" if moved else (
            "the validation photographs are others (validation.holdout, among, files or seed changed)")
        raise TrainingError(f"{output}: --resume trains on the photographs the run started with, but {what}; "
                            "start a new run for another split")
    if state.get("init_weights_sha256", run_record["init_weights_sha256"]) != run_record["init_weights_sha256"]:
        raise TrainingError(f"{output}: the initial weights file (model.init_weights) has changed since the run "
                            "started; resume with the file it started from")


def _validate(trainer: Trainer, crops: list[ValidationCrop], log: ScalarLog, console: Console) -> dict[str, float]:
    scores = trainer.scored(crops)
    log.write(trainer.step, scores)
    measure = "dice" if trainer.segmentation else "psnr"
    shown = (f"{tag.removeprefix(f'val/{measure}_')} {value:.{4 if trainer.segmentation else 2}f}"
             for tag, value in scores.items() if tag.startswith(f"val/{measure}"))
    console.print(f"step {trainer.step}: validation {measure.upper() if measure == 'psnr' else 'Dice'} " + ", ".join(shown))
    return scores


def _past(deadline: float | None, placement: Placement) -> bool:
    """Whether the time limit has passed, as rank 0 sees it (all ranks must stop at the same step)."""
    if deadline is None:
        return False
    late = torch.tensor([time.monotonic() > deadline], dtype=torch.int32)
    if placement.world_size > 1:
        late = late.to(placement.device) if dist.get_backend() == "nccl" else late
        dist.broadcast(late, src=0)
    return bool(late.item())


def _run(config: dict[str, Any], resume: bool, placement: Placement, console: Console) -> Path:
    output = Path(config["output"])
    with _RunFolderLock(output) as lock:
        # The main process holds the folder from before it reads a checkpoint until the model is written.
        if placement.is_main and output.is_dir():
            lock.take()
        return _run_holding(config, resume, placement, console, lock)


def _run_holding(config: dict[str, Any], resume: bool, placement: Placement, console: Console,
                 lock: _RunFolderLock) -> Path:
    output = lock.output
    state = _resume_state(config, resume, placement.world_size, console)
    train_images, validation_images = training_split(config)
    trainer = Trainer(config, placement)
    # What a checkpoint records beyond the trainer's state, for --resume to check it trains on as before.
    run_record = {"split": {"train": [str(p) for p in train_images], "validation": [str(p) for p in validation_images]},
                  "init_weights_sha256": trainer.init_weights_sha256}
    if state is not None:
        _check_resumed_run(output, state, run_record)
        trainer.load_state(state)
    main = placement.is_main
    # A training photo too small for a patch, or a bad validation photo, stops it before any file is written.
    stream = _patch_stream(config, train_images, trainer.step, placement)
    crops: list[ValidationCrop] = []
    if main:
        crops = run_validation_crops(config, validation_images)
        output.mkdir(parents=True, exist_ok=True)
        if lock.take():  # a new folder: whichever run made it, the first to lock it trains
            _refuse_earlier_run(output)  # a run that took it first may have ended since
        (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        log = ScalarLog(output, resume_step=trainer.step if state is not None else None)

    workers = config["data"]["workers"]
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=placement.device.type == "cuda")
    patches_per_step = config["batch_size"] * placement.world_size
    scores: dict[str, float] = {}
    with _progress(console, disable=not main) as progress:
        task = progress.add_task("training", total=config["steps"], completed=trainer.step, loss=float("nan"), rate=0.0)
        # Throughput counts the time spent waiting for and training on batches, not validating or saving.
        window_seconds, window_steps = 0.0, 0
        if main and crops and state is None:
            _validate(trainer, crops, log, progress.console)  # where the run starts from, e.g. the official weights
        batches = iter(loader)
        deadline = None if config["time_limit_minutes"] is None else time.monotonic() + 60 * config["time_limit_minutes"]
        while trainer.step < config["steps"]:
            started = time.perf_counter()
            batch = _next_batch(batches)
            losses = trainer.train_step(batch.noisy, batch.clean, batch.sigma)
            trainer.skipped_photos.update(batch.skipped)
            loss = losses["loss"]
            elapsed = time.perf_counter() - started
            trainer.train_seconds += elapsed
            window_seconds, window_steps = window_seconds + elapsed, window_steps + 1
            step = trainer.step
            if step % config["log_every"] == 0 or step == config["steps"]:
                rate = window_steps * patches_per_step / window_seconds
                progress.update(task, completed=step, loss=loss, rate=rate)
                if main and not console.is_terminal:  # a log file gets no live bar: a line per log step instead
                    console.print(f"step {step}/{config['steps']}: loss {loss:.4g}, {rate:.0f} patches/s")
                if main:
                    scalars = {f"train/{name}": value for name, value in losses.items()}
                    log.write(step, scalars | {"train/lr": trainer.learning_rate, "train/patches_per_s": rate})
                window_seconds, window_steps = 0.0, 0
            out_of_time = step % config["log_every"] == 0 and _past(deadline, placement)
            last = step == config["steps"] or out_of_time  # the model is written after this step
            if main and crops and (step % config["validate_every"] == 0 or last):
                scores = _validate(trainer, crops, log, progress.console)
            if step % config["checkpoint_every"] == 0 or last:
                trainer.share_skipped_photos()
                if main:
                    save_atomically(trainer.state() | run_record, output / CHECKPOINT)
            if out_of_time:
                progress.console.print(f"step {step}: time limit of {config['time_limit_minutes']} minutes reached")
                break
    del batches  # stop the loader's workers before the final writes
    weights = output / "model.safetensors"
    if main:
        final = trainer.final_model()
        calibration = calibrate_on_training_data(final, config, train_images, trainer.step) if trainer.calibrates else None
        if crops and (calibration or not scores):  # the model as saved (or a resumed finished run's)
            scores = trainer.scored(crops, final)
        save_model(final, weights)
        card = _model_card(trainer, final, train_images, validation_images, scores, calibration)
        (output / "model.json").write_text(strict_json(card, indent=2) + "\n", encoding="utf-8")
        if trainer.skipped_photos:
            names = ", ".join(Path(path).name for path in trainer.skipped_photos)
            console.print(f"trained without {len(trainer.skipped_photos)} of the {len(train_images)} training "
                          f"photographs, which could not be used (model.json lists why): {names}")
    if placement.world_size > 1:
        dist.barrier()  # the other ranks return once rank 0 has written the model
    return weights
