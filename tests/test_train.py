from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from fundus_restore import train
from fundus_restore.data import PatchBatch
from fundus_restore.io import ImageFileError
from fundus_restore.losses import ChannelWeightedMSE
from fundus_restore.models import create_model
from fundus_restore.pretrained import load_model, save_model
from fundus_restore.train import (
    DEFAULT_CONFIG,
    Placement,
    Trainer,
    TrainingError,
    build_model,
    calibrate_output_bias,
    calibration_batches,
    learning_rate_factor,
    load_checkpoint,
    load_config,
    train_from_config,
)
from test_vgg import torchvision_state_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def smooth_fundus(size: int, seed: int) -> np.ndarray:
    """A smooth bright disk on black: easy to denoise, so a few steps already help."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    inside = (rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.45**2
    colour = rng.uniform(0.3, 0.9, 3) * (0.7 + 0.3 * np.sin(6 * rows + 4 * cols))[..., None]
    return (np.where(inside[..., None], colour, 0.0) * 255).round().astype(np.uint8)


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny convolutions run far faster on one thread: two threads wait on each other
    whenever another process holds a core (the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(4):
        Image.fromarray(smooth_fundus(48, index)).save(folder / f"photo{index}.png")
    return folder


def tiny_config(photo_dir: Path, output: Path, **changes: Any) -> dict[str, Any]:
    config = {
        "seed": 1,
        "output": str(output),
        "steps": 8,
        "batch_size": 4,
        "log_every": 1,
        "validate_every": 4,
        "checkpoint_every": 3,
        "model": {"architecture": "dncnn", "kwargs": {"depth": 3, "width": 8}},
        "data": {"train": [str(photo_dir)], "patch_size": 16, "patches_per_image": 4, "images_per_group": 2, "workers": 0},
        "validation": {"holdout": 1, "crop": 32},
        "optimizer": {"lr": 3e-3},
        "schedule": {"decay": "exponential", "lr_min": 1e-4},
    }
    for key, value in changes.items():
        section, _, leaf = key.rpartition(".")
        (config.setdefault(section, {}) if section else config)[leaf] = value
    return config


def logged(output: Path, tag: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (output / "scalars.jsonl").read_text().splitlines()]
    return [(row["step"], row[tag]) for row in rows if tag in row]


def test_a_short_run_lowers_the_loss_and_writes_model_and_card(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    weights = train_from_config(tiny_config(photo_dir, output, steps=40, validate_every=40, **{"optimizer.lr": 1e-2}))
    assert weights == output / "model.safetensors"
    losses = [loss for _, loss in logged(output, "train/loss")]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])

    model = load_model(weights)
    assert model.config["batch_norm"] is False  # folded for inference
    assert model.name == "run/model"  # every run writes model.safetensors: named by its run folder
    card = json.loads((output / "model.json").read_text())
    assert card["architecture"] == "dncnn" and card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["recipe"]["steps"] == 40 and card["recipe"]["patch_size"] == 16
    assert len(card["training_data"]["images"]) == 3 and len(card["training_data"]["validation_images"]) == 1
    assert card["training"]["patches_per_s"] > 0
    assert card["training"]["output_calibration"] is None  # float32 training needs none
    measures = {f"{m}_{p}_{r}" for m in ("psnr", "ssim") for p in ("paper", "camera") for r in ("centre", "rim")}
    assert measures <= set(card["validation"])
    assert [step for step, _ in logged(output, "val/psnr_camera_rim")] == [0, 40]  # the start point, then every 40
    assert (output / "scalars.csv").read_text().startswith("wall_time,step,tag,value\n")
    assert len(list(output.glob("events.out.tfevents.*"))) == 1  # for TensorBoard (see test_tfevents)
    # Output to a file (not a terminal) shows no live bar: a line per logged step says how it goes.
    progress_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ") and "loss" in line]
    assert len(progress_lines) == 40 and progress_lines[-1].startswith("step 40/40: loss ")
    assert "patches/s" in progress_lines[-1]


def test_a_card_lists_every_training_stage_behind_its_weights(photo_dir: Path, tmp_path: Path) -> None:
    first = train_from_config(tiny_config(photo_dir, tmp_path / "first", steps=2))
    second = train_from_config(tiny_config(photo_dir, tmp_path / "second", steps=3, **{"model.init_weights": str(first)}))
    third = train_from_config(tiny_config(photo_dir, tmp_path / "third", steps=1, **{"model.init_weights": str(second)}))
    stages = json.loads(third.with_suffix(".json").read_text())["training"]["earlier_stages"]
    assert [(stage["init_weights"], stage["steps"]) for stage in stages] == [(str(first), 3), (None, 2)]
    # Which file each run started from, should the name come to hold other weights.
    first_digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert json.loads(second.with_suffix(".json").read_text())["recipe"]["init_weights_sha256"] == first_digest
    assert stages[0]["init_weights_sha256"] == first_digest and stages[1]["init_weights_sha256"] is None
    first_card = json.loads(first.with_suffix(".json").read_text())
    assert first_card["training"]["earlier_stages"] == []
    assert stages[1]["wall_time_s"] == first_card["training"]["wall_time_s"]


def test_bfloat16_on_the_cpu_trains_and_keeps_float32_weights(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = tiny_config(photo_dir, output, steps=40, validate_every=40, mixed_precision="bfloat16",
                         **{"optimizer.lr": 1e-2})
    model = load_model(train_from_config(config))
    losses = [loss for _, loss in logged(output, "train/loss")]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The saved model is re-centred for float32 on fresh training patches: its mean error there is zero.
    card = json.loads((output / "model.json").read_text())
    calibration = card["training"]["output_calibration"]
    assert calibration["patches"] == 1024 and len(calibration["output_shift_255"]) == 3
    images = [photo_dir / name for name in card["training_data"]["images"]]
    errors = [model(b.noisy, b.sigma) - b.clean for b in calibration_batches(load_config(config), images, 40)]
    np.testing.assert_allclose(torch.cat(errors).mean(dim=(0, 2, 3)).detach().numpy(), 0, atol=1e-5)


class Squashed(torch.nn.Module):
    """A model whose last bias does not shift its output one to one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


@pytest.mark.parametrize("architecture, kwargs", [("dncnn", {"depth": 3, "width": 8}), ("srresnet", {"scale": 2, "width": 8, "blocks": 1})])
def test_calibration_removes_a_constant_output_error(architecture: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = create_model(architecture, **kwargs).eval()
    offset = torch.tensor([0.004, -0.002, 0.001])
    batches = []
    for _ in range(3):
        noisy, sigma = torch.rand(2, 3, 12, 12), torch.full((2,), 0.1)
        with torch.no_grad():  # targets the model misses by `offset` on average (±0.01 per patch)
            clean = model(noisy, sigma) - offset[:, None, None] + 0.01 * torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
        batches.append(PatchBatch(noisy, clean, sigma))
    shift = calibrate_output_bias(model, batches)
    with torch.no_grad():
        errors = torch.cat([model(b.noisy, b.sigma) - b.clean for b in batches])
    np.testing.assert_allclose(errors.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-6)
    np.testing.assert_allclose(shift, -offset.numpy(), atol=1e-6)
    assert not model.training


def test_calibration_refuses_what_it_cannot_shift() -> None:
    batch = PatchBatch(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), torch.full((2,), 0.1))
    with pytest.raises(ValueError, match="one to one"):
        calibrate_output_bias(Squashed(), [batch])
    with pytest.raises(ValueError, match="no batches"):
        calibrate_output_bias(create_model("dncnn", depth=3, width=8), [])


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two DataLoader workers and a restart at an odd step exercise the lanes.
    changes = {"data.workers": 2}
    straight = train_from_config(tiny_config(photo_dir, tmp_path / "straight", **changes))

    interrupted = tmp_path / "interrupted"
    original_step = Trainer.train_step

    def crash_at_step_5(self: Trainer, *batch: torch.Tensor) -> float:
        if self.step == 5:
            raise KeyboardInterrupt("simulated kill")
        return original_step(self, *batch)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(tiny_config(photo_dir, interrupted, **changes))
    assert load_checkpoint(interrupted / "checkpoint.pt")["step"] == 3
    for log in ("scalars.csv", "scalars.jsonl"):  # a kill can cut the last line short
        with open(interrupted / log, "a") as handle:
            handle.write('{"step": 6, "train/lo')
    monkeypatch.setattr(Trainer, "train_step", original_step)
    resumed = train_from_config(tiny_config(photo_dir, interrupted, **changes), resume=True)

    expected, actual = load_file(straight), load_file(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    # The log holds each step once: what the crashed run logged after step 3 was dropped.
    steps = [step for step, _ in logged(interrupted, "train/loss")]
    assert steps == list(range(1, 9))
    assert len(list(interrupted.glob("events.out.tfevents.*"))) == 2  # the resumed run's event file is new


def test_time_limit_stops_at_a_log_step_with_model_and_checkpoint_and_resume_goes_on(
    photo_dir: Path, tmp_path: Path
) -> None:
    straight = train_from_config(tiny_config(photo_dir, tmp_path / "straight", log_every=2))

    limited = tmp_path / "limited"
    weights = train_from_config(tiny_config(photo_dir, limited, log_every=2, time_limit_minutes=1e-9))
    assert load_checkpoint(limited / "checkpoint.pt")["step"] == 2  # the first log step after the limit
    card = json.loads((limited / "model.json").read_text())
    assert card["recipe"]["steps"] == 2 and "psnr_paper_centre" in card["validation"]
    assert weights.exists()

    resumed = train_from_config(tiny_config(photo_dir, limited, log_every=2), resume=True)
    expected, actual = load_file(straight), load_file(resumed)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_time_limit_must_be_positive(photo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="time_limit_minutes"):
        load_config(tiny_config(photo_dir, tmp_path / "run", time_limit_minutes=0))


def test_gradients_above_the_clip_norm_are_scaled_down_to_it_and_their_norm_is_logged(
    photo_dir: Path, tmp_path: Path
) -> None:
    config = load_config(tiny_config(photo_dir, tmp_path / "run", **{"optimizer.clip_grad_norm": 1e-4}))
    trainer = Trainer(config, Placement(0, 1, torch.device("cpu")))
    noisy, clean = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    reported = trainer.train_step(noisy, clean, torch.full((2,), 0.1))
    # The step leaves the gradients it applied on the parameters.
    applied = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()]).item()
    assert reported["grad_norm"] > 10 * 1e-4 and applied == pytest.approx(1e-4, rel=1e-3)
    for clip in (0, -1, "big"):
        with pytest.raises(TrainingError, match="optimizer.clip_grad_norm must be a positive number or null"):
            load_config(tiny_config(photo_dir, tmp_path / "bad", **{"optimizer.clip_grad_norm": clip}))


def test_bad_patch_settings_are_refused_when_the_config_loads(photo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="data: gain"):
        load_config(tiny_config(photo_dir, tmp_path / "run"), overrides={"data.gain": [1.5, 0.5]})
    with pytest.raises(TrainingError, match="data: sigma"):
        load_config(tiny_config(photo_dir, tmp_path / "run"), overrides={"data.sigma": [30, 10]})
    with pytest.raises(TrainingError, match="data: sampling"):
        load_config(tiny_config(photo_dir, tmp_path / "run"), overrides={"data.sampling": "pixels"})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("corrupt", "what", "first_bad_call", "kept"),
    [
        (lambda loss, restored: loss * float("nan"), "the loss is nan", 5, "the last good checkpoint, .*, is kept"),
        (lambda loss, restored: loss * float("inf"), "the loss is inf", 5, "the last good checkpoint, .*, is kept"),
        # sqrt at 0 adds nothing to a finite loss but a NaN to every gradient, which one
        # optimizer step would spread into the weights.
        (lambda loss, restored: loss + torch.sqrt(0 * restored.sum()), "the gradient norm is nan", 5,
         "the last good checkpoint, .*, is kept"),
        # Before the first checkpoint (step 3) the message must not promise one.
        (lambda loss, restored: loss * float("nan"), "the loss is nan", 2,
         r"no checkpoint had been written yet \(checkpoint_every: 3\)"),
    ],
    ids=["nan loss", "infinite loss", "nan gradients", "nan before the first checkpoint"],
)
def test_a_non_finite_loss_or_gradient_stops_with_the_step_and_keeps_the_checkpoint(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corrupt: Any, what: str, first_bad_call: int,
    kept: str,
) -> None:
    original_forward = ChannelWeightedMSE.forward
    calls = []

    def corrupted_from_a_call(self: ChannelWeightedMSE, restored: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = original_forward(self, restored, clean)
        return corrupt(loss, restored) if len(calls) >= first_bad_call else loss

    monkeypatch.setattr(ChannelWeightedMSE, "forward", corrupted_from_a_call)
    output = tmp_path / "run"
    with pytest.raises(TrainingError, match=rf"step {first_bad_call}: {what}; training stopped and {kept}"):
        train_from_config(tiny_config(photo_dir, output))
    assert not (output / "model.safetensors").exists()
    if first_bad_call <= 3:
        assert not (output / "checkpoint.pt").exists()
        return
    checkpoint = load_checkpoint(output / "checkpoint.pt")
    assert checkpoint["step"] == 3
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_paths_in_a_config_given_from_python_are_written_and_resumed_as_text(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    config = tiny_config(photo_dir, output, steps=3)
    config["output"], config["data"]["train"] = output, (photo_dir,)  # a Path and a tuple, as Python callers write
    train_from_config(config)
    config["steps"] = 4
    train_from_config(config, resume=True)  # the checkpoint's config loads without unpickling a Path
    assert load_checkpoint(output / "checkpoint.pt")["config"]["output"] == str(output)
    assert yaml.safe_load((output / "config.yaml").read_text())["data"]["train"] == [str(photo_dir)]


def test_config_mistakes_are_named_before_training(photo_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(TrainingError, match=rf"data.train \(--data\): no such file or folder: {missing}"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"data.train": [str(photo_dir), str(missing)]}))
    with pytest.raises(TrainingError, match=r"validation.among \(--validate-on\): no such file or folder"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"validation.among": [str(missing)]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainingError, match=rf"data.train \(--data\): no image files in {empty}$"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"data.train": [str(photo_dir), str(empty)]}))
    (tmp_path / "other").mkdir()
    Image.fromarray(smooth_fundus(48, 7)).save(tmp_path / "other" / "elsewhere.png")  # not among the --data photos
    with pytest.raises(TrainingError, match=r"validation split: cannot hold out 1 validation images from 0 \(.*--validate-on"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"validation.among": [str(tmp_path / "other")]}))
    for key, value, problem in [
        ("optimizer.lr", -1, "optimizer.lr must be a positive number, got -1"),
        ("loss.weights", [1, 2], r"RGB photos have 3 channel\(s\): loss.weights needs as many, got \[1, 2\]"),
        ("data.workers", -1, r"data.workers must be a whole number \(0: read in the training process\), got -1"),
        ("device", "tpu", r"device must be one of \('auto', 'cpu', 'cuda'\), got 'tpu'"),
        ("data.patch_size", "abc", "data.patch_size must be a positive whole number of pixels, got 'abc'"),
        ("loss.weights", 3,
         r"loss.weights must be a list of numbers of at least 0, one per channel \(e.g. \[1, 3, 2\]\), got 3"),
        ("loss.weights", [-1, 3, 2], r"loss.weights must be a list of numbers of at least 0, .*got \[-1, 3, 2\]"),
        ("schedule.warmup", 8, r"schedule.warmup \(8 steps\) must be shorter than the run \(steps: 8\)"),
        # True is an int to Python: steps=true ran one step, batch_size=true batches of one.
        ("steps", True, "steps must be a whole number of at least 1, got True"),
        ("batch_size", True, "batch_size must be a whole number of at least 1, got True"),
        ("time_limit_minutes", True, "time_limit_minutes must be a positive number of minutes or null, got True"),
        ("seed", -1, "seed must be a whole number of at least 0, got -1"),
        ("validation.holdout", "abc", "validation.holdout must be a whole number of at least 0, got 'abc'"),
        ("validation.crop", 0, "validation.crop must be a whole number of at least 16, got 0"),
        ("validation.sigma", -5, "validation.sigma must be a number of at least 0, got -5"),
        ("optimizer.weight_decay", -1, "optimizer.weight_decay must be a number of at least 0, got -1"),
        ("loss.vessel_weight", -5, "loss.vessel_weight must be a number of at least 0, got -5"),
        # A step decay of zero intervals ran at 100 times the rate; a cosine "decay" to above lr raised it.
        ("schedule.intervals", 0, "schedule.intervals must be a whole number of at least 1, got 0"),
        ("schedule", {"decay": "cosine", "lr_min": 1},
         r"schedule.lr_min must lie in \[0, optimizer.lr\] for cosine decay"),
    ]:
        with pytest.raises(TrainingError, match=problem):
            train_from_config(tiny_config(photo_dir, tmp_path / "run", **{key: value}))
    with pytest.raises(TrainingError, match="model: unknown architecture 'dncn'"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"model.architecture": "dncn"}))
    with pytest.raises(TrainingError, match="model: .*'depthh'"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"model.kwargs": {"depthh": 3}}))
    grey = save_model(create_model("dncnn", channels=1, depth=3, width=8), tmp_path / "grey.safetensors")
    with pytest.raises(TrainingError, match=r"model \S*grey.safetensors: takes 1-channel images, but the patches have 3 \(RGB\)"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"model.init_weights": str(grey)}))
    assert not (tmp_path / "run").exists()


def test_a_photo_too_small_for_a_patch_is_named_in_one_line(photo_dir: Path, tmp_path: Path) -> None:
    Image.fromarray(smooth_fundus(12, 9)).save(photo_dir / "tiny.png")
    with pytest.raises(ImageFileError, match=r"^\S*tiny\.png: 12×12 pixels, smaller than the 16² a patch needs$"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"validation.holdout": 0}))
    assert not (tmp_path / "run").exists()  # refused before the run folder, its config and logs are written
    (photo_dir / "tiny.png").unlink()
    # A field of view (about 43² in these 48² frames) smaller than the patch is found by the
    # DataLoader worker reading it, which skips such photos; with none left, the message still
    # comes as one line, not the worker's traceback.
    config = tiny_config(photo_dir, tmp_path / "run", **{"data.patch_size": 46, "data.workers": 1})
    one_line = (r"^none of the 3 training photographs can be used; the last: "
                r"\S*photo\d\.png: its field of view crop is \d+×\d+, smaller than 46²$")
    with pytest.raises(ImageFileError, match=one_line):
        train_from_config(config)


def test_a_skipped_training_photo_is_warned_about_in_one_line_on_the_command_line(
    photo_dir: Path, tmp_path: Path
) -> None:
    (photo_dir / "broken.png").write_bytes((photo_dir / "photo0.png").read_bytes()[:200])  # truncated
    config = tiny_config(photo_dir, tmp_path / "run", steps=8, **{"validation.holdout": 0, "data.workers": 1})
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    finished = subprocess.run([sys.executable, "-m", "fundus_restore", "train", str(tmp_path / "run.yaml")],
                              capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-2000:]
    said = " ".join(finished.stderr.split())
    # From the DataLoader worker too: "warning: ...", not Python's file, line and source line.
    assert "warning: training goes on without it: " in said and "broken.png" in said
    assert "UserWarning" not in said and "warnings.warn(" not in said
    # Found by the worker, known to the training process: the card and the last line leave it out.
    assert "trained without 1 of the 5 training photographs, which could not be used (model.json lists why): broken.png" in said
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert "broken.png" not in card["training_data"]["images"] and len(card["training_data"]["images"]) == 4
    assert [s["image"] for s in card["training_data"]["skipped_images"]] == ["broken.png"]
    assert card["summary"].endswith("on 4 fundus photographs")


def test_a_skipped_training_photo_stays_out_of_the_card_of_a_resumed_run(photo_dir: Path, tmp_path: Path) -> None:
    (photo_dir / "broken.png").write_bytes((photo_dir / "photo0.png").read_bytes()[:200])  # truncated
    config = tiny_config(photo_dir, tmp_path / "run", steps=8, **{"validation.holdout": 0})
    with pytest.warns(UserWarning, match=r"training goes on without it: .*broken\.png"):
        train_from_config(config)
    # Resumed where it ended, the run meets no photo again: the checkpoint remembers the skipped one.
    train_from_config(config | {"steps": 8}, resume=True)
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert "broken.png" not in card["training_data"]["images"]
    skipped = card["training_data"]["skipped_images"]
    assert [s["image"] for s in skipped] == ["broken.png"] and skipped[0]["problem"].startswith("truncated or corrupt")


def test_a_corrupt_validation_photo_stops_the_run_before_its_folder_is_made(photo_dir: Path, tmp_path: Path) -> None:
    broken = photo_dir / "photo3.png"
    broken.write_bytes(broken.read_bytes()[:200])  # header intact, pixels cut off
    with pytest.raises(ImageFileError, match=r"photo3\.png"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", **{"validation.among": [str(broken)]}))
    assert not (tmp_path / "run").exists()


def test_checkpoint_loads_with_weights_only(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    train_from_config(tiny_config(photo_dir, output, steps=3))
    state = torch.load(output / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["data_stream"]["step"] == 3
    assert {"python", "numpy", "torch"} <= set(state["random"])
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 3
    assert not list(output.glob("*.partial"))
    (output / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="checkpoint.pt: not a readable training checkpoint"):
        train_from_config(tiny_config(photo_dir, output, steps=3), resume=True)


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(photo_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(photo_dir, tmp_path / "run", steps=3)
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        train_from_config(config, resume=True)
    train_from_config(config)
    with pytest.raises(TrainingError, match="holds a checkpoint of an earlier run"):
        train_from_config(config)
    (tmp_path / "run" / "checkpoint.pt").unlink()  # a finished run, its checkpoint cleaned away: its model stays
    with pytest.raises(TrainingError, match="holds the model of an earlier run; choose another output"):
        train_from_config(config)
    # Cards and the search's log are standard JSON: a measure with nothing to measure is null, not a bare NaN.
    from fundus_restore.train import strict_json

    assert strict_json({"thin_recall": float("nan"), "scores": [1.5, float("inf")]}) == (
        '{"thin_recall": null, "scores": [1.5, null]}'
    )
    json.loads((tmp_path / "run" / "model.json").read_text(), parse_constant=lambda name: pytest.fail(name))


def test_a_run_is_refused_in_a_folder_another_run_is_training_in(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "run"
    config = tiny_config(photo_dir, output, steps=3)
    train_from_config(config)
    written = (output / "checkpoint.pt").read_bytes()
    busy = "another run is training in this folder; wait for it to end or choose another output"
    with train._RunFolderLock(output) as other:  # as another run holds it (a lock per open file, even in one process)
        other.take()
        with pytest.raises(TrainingError, match=busy):
            train_from_config(config | {"steps": 6}, resume=True)
    assert (output / "checkpoint.pt").read_bytes() == written
    train_from_config(config | {"steps": 6}, resume=True)  # once it has ended
    assert torch.load(output / "checkpoint.pt", weights_only=True)["step"] == 6

    # Two new runs into one new folder: the one that locks it first trains, the other stops before writing.
    fresh = tmp_path / "fresh"
    held = []
    reading_validation_photos = train.run_validation_crops

    def other_run_takes_the_folder(*args: Any) -> Any:
        fresh.mkdir()
        held.append(train._RunFolderLock(fresh))
        held[0].take()
        return reading_validation_photos(*args)

    monkeypatch.setattr(train, "run_validation_crops", other_run_takes_the_folder)
    with pytest.raises(TrainingError, match=busy):
        train_from_config(tiny_config(photo_dir, fresh, steps=3))
    assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
    held[0].__exit__(None, None, None)


def test_a_failed_run_lets_go_of_its_folder_though_its_workers_live_on(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "run"
    config = tiny_config(photo_dir, output, steps=6, **{"data.workers": 1})
    train_from_config(config | {"steps": 3})
    stepping = Trainer.train_step

    def interrupted(self: Trainer, *args: Any) -> dict[str, float]:
        if self.step == 4:
            raise KeyboardInterrupt
        return stepping(self, *args)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:  # its traceback keeps the loader's worker alive
        train_from_config(config, resume=True)
    monkeypatch.setattr(Trainer, "train_step", stepping)
    train_from_config(config, resume=True)  # not refused as "another run is training"
    assert stopped.value is not None and torch.load(output / "checkpoint.pt", weights_only=True)["step"] == 6


def test_a_folder_that_cannot_be_locked_is_trained_in_with_a_warning(
    photo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    def no_locks(*args: Any) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"the folder cannot be locked \(No locks available\): nothing stops a second"):
        train_from_config(tiny_config(photo_dir, tmp_path / "run", steps=2))
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_resume_refuses_a_changed_recipe_and_says_how_more_steps_move_the_rate(
    photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    train_from_config(tiny_config(photo_dir, output, steps=4))  # exponential decay from 3e-3 to 1e-4
    for key, value in (("optimizer.lr", 5e-3), ("data.patch_size", 24), ("seed", 2)):
        with pytest.raises(TrainingError, match=rf"--resume continues the run as it was configured, but {key} changed; "
                                                r"to train on with other settings, start a new run from its weights"):
            train_from_config(tiny_config(photo_dir, output, steps=6, **{key: value}), resume=True)
    assert load_checkpoint(output / "checkpoint.pt")["step"] == 4
    # How it is run and watched may change; more steps lay the decay out anew, which the note quantifies.
    train_from_config(tiny_config(photo_dir, output, steps=6, validate_every=2, **{"data.workers": 1}), resume=True)
    said = " ".join(capsys.readouterr().err.split())
    assert "resuming with changed settings: data.workers, steps, validate_every" in said
    assert "the exponential decay is laid out anew over 6 steps: at step 4 the learning rate moves from 0.0001 to 0.000311" in said
    assert load_checkpoint(output / "checkpoint.pt")["step"] == 6


def test_resume_refuses_other_photographs_other_initial_weights_and_fewer_steps(
    photo_dir: Path, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    init = save_model(create_model("dncnn", depth=3, width=8), tmp_path / "init.safetensors")
    train_from_config(tiny_config(photo_dir, output, steps=4, **{"model.init_weights": str(init)}))
    resumed = tiny_config(photo_dir, output, steps=6, **{"model.init_weights": str(init)})
    # Another split: the photo held out would be trained on, and one trained on reported as held out.
    with pytest.raises(TrainingError, match=r"--resume trains on the photographs the run started with, but the "
                                            r"validation photographs are others"):
        train_from_config(resumed | {"validation": {"holdout": 2, "crop": 32}}, resume=True)
    Image.fromarray(smooth_fundus(48, 9)).save(photo_dir / "added.png")
    with pytest.raises(TrainingError, match="but photos added or removed: added.png; start a new run"):
        train_from_config(resumed, resume=True)
    (photo_dir / "added.png").unlink()
    # The card would name weights the run did not start from.
    save_model(create_model("dncnn", depth=3, width=8), init, extra_metadata={"other": "weights"})
    with pytest.raises(TrainingError, match=r"the initial weights file \(model.init_weights\) has changed"):
        train_from_config(resumed, resume=True)
    with pytest.raises(TrainingError, match="steps 3 is below the step the checkpoint has reached, 4"):
        train_from_config(tiny_config(photo_dir, output, steps=3, **{"model.init_weights": str(init)}), resume=True)
    assert load_checkpoint(output / "checkpoint.pt")["step"] == 4


def test_a_model_diverged_to_finite_values_stops_the_run_in_one_message(photo_dir: Path, tmp_path: Path) -> None:
    from fundus_restore.train import run_validation_crops, training_split

    config = load_config(tiny_config(photo_dir, tmp_path / "run"))
    trainer = Trainer(config, Placement(0, 1, torch.device("cpu")))
    crops = run_validation_crops(config, training_split(config)[1])

    class Diverged(torch.nn.Module):  # a loss of thousands: outputs far off the image scale, but finite
        def forward(self, x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
            return x * 50 - 20

    with pytest.raises(TrainingError, match=r"^step 0: validation cannot score the model's output, which has "
                                            r"likely diverged \(.*\); training stopped and no checkpoint had been "
                                            r"written yet"):
        trainer.scored(crops, Diverged())


def test_a_config_whose_bases_loop_and_a_set_value_that_is_no_yaml_are_named(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("base: b.yaml\nsteps: 4\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(TrainingError, match=r"a\.yaml: its chain of base configs comes back to it$"):
        load_config(tmp_path / "a.yaml")
    from typer.testing import CliRunner

    from fundus_restore.cli import app

    result = CliRunner().invoke(app, ["train", str(tmp_path / "a.yaml"), "--set", "data.sigma=[10"])
    assert result.exit_code == 2 and "--set 'data.sigma=[10': the value is no YAML" in " ".join(result.output.split())


def test_overrides_replace_config_values(photo_dir: Path, tmp_path: Path) -> None:
    config = load_config(
        CONFIGS / "dncnn-finetune.yaml",
        overrides={"data.train": [str(photo_dir)], "model.init_weights": "x.mat", "optimizer.lr": 1e-5, "data.sigma": 15},
    )
    assert config["data"]["train"] == [str(photo_dir)]
    assert config["model"]["init_weights"] == "x.mat" and config["optimizer"]["lr"] == 1e-5 and config["data"]["sigma"] == 15
    assert config["schedule"]["lr_min"] == 2e-7  # untouched values stay
    assert load_config({}, overrides={"model.kwargs.depth": 5})["model"]["kwargs"] == {"depth": 5}
    assert load_config({"data": {"train": "one/folder"}})["data"]["train"] == ["one/folder"]
    with pytest.raises(TrainingError, match="unknown config key 'data.sigmaa'"):
        load_config({}, overrides={"data.sigmaa": 10})
    with pytest.raises(TrainingError, match="schedule.decay"):
        load_config({"schedule": {"decay": "linear"}})


def test_exponents_without_a_dot_are_numbers() -> None:
    # YAML 1.1 reads 1e-5 as the string "1e-5": in a file and on the command line alike.
    config = load_config({"optimizer": {"lr": "1e-5"}}, overrides={"schedule.lr_min": "2e-7"})
    assert config["optimizer"]["lr"] == 1e-5 and config["schedule"]["lr_min"] == 2e-7
    with pytest.raises(TrainingError, match="'optimizer.lr' must be a number"):
        load_config({"optimizer": {"lr": "fast"}})


def test_shipped_configs_are_valid_and_green_differs_only_in_loss() -> None:
    configs = {path.stem: load_config(path) for path in CONFIGS.glob("*.yaml")}
    assert {"autoencoder", "dncnn-finetune", "dncnn-finetune-green", "demo-small"} <= set(configs)
    for budget in ("", "-long"):  # the paper's recipe and ours for a GPU
        plain, green = configs[f"dncnn-finetune{budget}"], configs[f"dncnn-finetune-green{budget}"]
        assert plain["loss"]["weights"] == [1, 1, 1] and green["loss"]["weights"] == [1, 3, 2]
        assert {k for k in plain if plain[k] != green[k]} == {"loss", "output"}
    plain = configs["dncnn-finetune"]
    assert (plain["optimizer"]["lr"], plain["schedule"]["lr_min"]) == (3e-6, 2e-7)
    for config in configs.values():
        assert config.keys() == DEFAULT_CONFIG.keys()


def test_learning_rate_schedules_go_from_lr_to_lr_min() -> None:
    schedule = {"steps": 100, "lr": 1e-3, "lr_min": 1e-5, "intervals": 4}
    for decay in ("step", "exponential", "cosine"):
        assert learning_rate_factor(0, decay=decay, **schedule) == pytest.approx(1.0)
        assert learning_rate_factor(100, decay=decay, **schedule) == pytest.approx(1e-2)
    assert learning_rate_factor(50, decay="exponential", **schedule) == pytest.approx(1e-1)
    assert learning_rate_factor(50, decay="cosine", **schedule) == pytest.approx((1 + 1e-2) / 2)
    steps = [learning_rate_factor(s, decay="step", **schedule) for s in range(100)]
    assert len(set(steps)) == 4 and steps == sorted(steps, reverse=True)
    assert learning_rate_factor(70, decay="none", **schedule) == 1.0
    ramp = [learning_rate_factor(s, decay="none", warmup=4, **schedule) for s in range(6)]
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate_factor(1, decay="cosine", warmup=4, **schedule) == pytest.approx(
        0.5 * learning_rate_factor(1, decay="cosine", **schedule))


def test_initial_weights_from_a_safetensors_file(tmp_path: Path) -> None:
    source = create_model("dncnn", depth=3, width=8, batch_norm=False)
    path = save_model(source, tmp_path / "start.safetensors")
    model = build_model({"architecture": None, "kwargs": {}, "init_weights": str(path)})
    assert model.training
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(TrainingError, match="holds a 'dncnn' model"):
        build_model({"architecture": "autoencoder", "kwargs": {}, "init_weights": str(path)})


def test_initial_weights_gain_range_inputs_but_no_other_change(tmp_path: Path) -> None:
    source = create_model("dncnn", depth=3, width=8, batch_norm=False)
    path = save_model(source, tmp_path / "start.safetensors")
    model = build_model({"architecture": None, "kwargs": {"range_inputs": True}, "init_weights": str(path)})
    assert model.config["range_inputs"] and model.training
    assert torch.equal(model.body[0].weight[:, :3], source.body[0].weight)
    assert not model.body[0].weight[:, 3:].any()
    amplified = build_model(
        {"architecture": None, "kwargs": {"range_inputs": True, "range_gain": 20.0}, "init_weights": str(path)}
    )
    assert amplified.config["range_gain"] == 20.0 and torch.equal(amplified.body[0].weight, model.body[0].weight)
    with pytest.raises(TrainingError, match="differ from the weights'"):
        build_model({"architecture": None, "kwargs": {"range_inputs": True, "width": 16}, "init_weights": str(path)})


def test_a_blind_residual_unet_learns_to_use_the_noise_level_it_is_told(photo_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = save_model(create_model("resunet", widths=[4, 8], blocks=1), tmp_path / "blind.safetensors")
    told = {"architecture": "resunet", "kwargs": {"widths": [4, 8], "blocks": 1, "noise_map": True},
            "init_weights": str(start)}
    output = tmp_path / "told"
    weights = train_from_config(tiny_config(photo_dir, output, steps=30, model=told, **{"data.sigma": [0, 50]}))
    model = load_model(weights)
    assert model.needs_noise_level and model.head.weight[:, 3:].abs().max() > 0
    card = json.loads(weights.with_suffix(".json").read_text())
    assert card["config"]["noise_map"] is True and card["recipe"]["noise"]["sigma"] == [0, 50]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (model(x, 5 / 255) - model(x, 50 / 255)).abs().max() > 1e-4


def test_a_colour_residual_unet_trains_on_one_channel_as_a_grey_denoiser(photo_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = save_model(create_model("resunet", widths=[4, 8], blocks=1), tmp_path / "colour.safetensors")
    grey = {"architecture": "resunet", "kwargs": {"channels": 1, "widths": [4, 8], "blocks": 1}, "init_weights": str(start)}
    output = tmp_path / "grey"
    config = tiny_config(photo_dir, output, steps=12, model=grey, **{"data.channels": [1], "loss.weights": [1]})
    model = load_model(train_from_config(config))
    assert model.config["channels"] == 1 and model.head.in_channels == model.tail.out_channels == 1
    losses = [loss for _, loss in logged(output, "train/loss")]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert json.loads((output / "model.json").read_text())["recipe"]["channels"] == [1]
    with pytest.raises(TrainingError, match=r"data.channels \[1\] keeps 1 channel\(s\): loss.weights needs as many"):
        load_config(tiny_config(photo_dir, tmp_path / "x", **{"data.channels": [1]}))


def test_a_run_on_shrunk_photos_records_the_factors_in_its_card(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "shrink"
    train_from_config(tiny_config(photo_dir, output, steps=4, **{"data.shrink": [1, 2]}))
    assert json.loads((output / "model.json").read_text())["recipe"]["shrink"] == [1, 2]
    with pytest.raises(TrainingError, match="data: shrink must be a non-empty list of whole factors"):
        load_config(tiny_config(photo_dir, tmp_path / "x", **{"data.shrink": [0]}))


@pytest.mark.shared
def test_initial_weights_from_the_official_matconvnet_file(dncnn_weights_dir: Path) -> None:
    model = build_model({"architecture": "dncnn", "kwargs": {}, "init_weights": str(dncnn_weights_dir / "GD_Color_Blind.mat")})
    assert model.config == {"channels": 3, "depth": 20, "width": 64, "batch_norm": False, "range_inputs": False, "range_gain": 1.0} and model.training


@pytest.mark.slow
@pytest.mark.parametrize("task", ["denoiser", "srgan"])
def test_torchrun_two_cpu_processes(photo_dir: Path, tmp_path: Path, task: str) -> None:
    config_path = tmp_path / "tiny.yaml"
    output = tmp_path / "ddp"
    config = tiny_config(photo_dir, output, steps=4, checkpoint_every=2)
    if task == "srgan":  # the discriminator is a second DistributedDataParallel module, run twice a step
        config = sr_config(photo_dir, output, steps=4, checkpoint_every=2, **{
            "adversarial.weight": 1e-3, "perceptual.features": "vessels", "perceptual.feature_scale": 10.0})
    config_path.write_text(json.dumps(config))  # JSON is YAML
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "fundus_restore", "train", str(config_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert load_checkpoint(output / "checkpoint.pt")["step"] == 4
    card = json.loads((output / "model.json").read_text())
    assert card["training"]["processes"] == 2 and card["recipe"]["batch_size"] == 8
    load_model(output / "model.safetensors")
    assert len(list(output.glob("events.out.tfevents.*"))) == 1  # rank 0 alone logs
    if task == "srgan":
        assert len(logged(output, "train/discriminator")) == 4 and "discriminator" in load_checkpoint(output / "checkpoint.pt")


def sr_config(photo_dir: Path, output: Path, **changes: Any) -> dict[str, Any]:
    """A tiny x2 SRResNet; pass ``adversarial.weight`` to train it as an SRGAN."""
    config = tiny_config(photo_dir, output, **changes)
    config["model"] = {"architecture": "srresnet", "kwargs": {"scale": 2, "blocks": 1, "width": 8}}
    config["data"] |= {"scale": 2}
    return config


def test_super_resolution_run_lowers_the_loss_and_writes_an_upscaler(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "sr"
    weights = train_from_config(sr_config(photo_dir, output, steps=30, validate_every=30, **{"optimizer.lr": 3e-3}))
    losses = [loss for _, loss in logged(output, "train/loss")]
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:6])
    card = json.loads((output / "model.json").read_text())
    assert card["task"] == "upscale" and card["recipe"]["scale"] == 2
    model = load_model(weights)
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


def test_an_upscaler_can_learn_from_a_denoisers_outputs(photo_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    denoiser_file = save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "denoiser.safetensors")
    config = load_config(sr_config(photo_dir, tmp_path / "sr", steps=3, **{"data.lr_denoiser": str(denoiser_file)}))
    trainer = Trainer(config, Placement(0, 1, torch.device("cpu")))
    noisy, sigma = torch.rand(2, 3, 8, 8), torch.full((2,), 0.1)
    torch.testing.assert_close(trainer.model_input(noisy, sigma), load_model(denoiser_file)(noisy, sigma))
    assert not trainer.model_input(noisy, sigma).requires_grad
    images = sorted(photo_dir.iterdir())
    plain = next(calibration_batches(config | {"data": config["data"] | {"lr_denoiser": None}}, images, 0))
    denoised = next(calibration_batches(config, images, 0))  # re-centring sees what training saw
    torch.testing.assert_close(denoised.noisy, load_model(denoiser_file)(plain.noisy, plain.sigma))

    card = json.loads((train_from_config(config).with_suffix(".json")).read_text())
    assert card["recipe"]["lr_denoiser"] == str(denoiser_file) and card["recipe"]["lr_kernels"] == ["bicubic"]
    with pytest.raises(TrainingError, match="data: lr_kernels must be a non-empty list"):
        load_config(sr_config(photo_dir, tmp_path / "k", **{"data.lr_kernels": ["nearest"]}))
    with pytest.raises(TrainingError, match="data.lr_denoiser .* needs data.scale > 1"):
        load_config(tiny_config(photo_dir, tmp_path / "dn", **{"data.lr_denoiser": str(denoiser_file)}))
    with pytest.raises(TrainingError, match="data.lr_denoiser: srresnet-x4-retina is not a denoiser"):
        train_from_config(sr_config(photo_dir, tmp_path / "bad", **{"data.lr_denoiser": "srresnet-x4-retina"}))


def test_adversarial_training_alternates_after_pretraining_and_resumes_exactly(photo_dir: Path, tmp_path: Path) -> None:
    changes = {"steps": 6, "checkpoint_every": 2, "adversarial.weight": 1e-3, "adversarial.start_step": 2,
               "adversarial.discriminator_width": 8, "schedule.decay": "none"}  # the same rates when stopped at 4
    whole = tmp_path / "whole"
    train_from_config(sr_config(photo_dir, whole, **changes))
    discriminator_steps = [step for step, _ in logged(whole, "train/discriminator")]
    assert discriminator_steps == [3, 4, 5, 6]  # content-only pre-training for the first 2 steps
    assert all(value > 0 for _, value in logged(whole, "train/adversarial")[2:])

    part = tmp_path / "part"
    train_from_config(sr_config(photo_dir, part, **{**changes, "steps": 4}))
    resumed = load_model(train_from_config(sr_config(photo_dir, part, **changes), resume=True))
    uninterrupted = load_model(whole / "model.safetensors")
    for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# Ridge feature MSEs are thousands of times smaller than the U-Net's (see VesselUNetFeatures): scaled up.
@pytest.mark.parametrize(("features", "feature_scale"), [("vessels", 10.0), ("vessels-unet", 1 / 12.75), ("vgg19", 1 / 12.75)])
def test_each_perceptual_loss_trains_an_srgan_and_is_logged(
    photo_dir: Path, tmp_path: Path, features: str, feature_scale: float
) -> None:
    output = tmp_path / features
    changes: dict[str, Any] = {"perceptual.features": features, "perceptual.feature_scale": feature_scale,
                               "adversarial.weight": 1e-3}
    if features == "vgg19":  # synthetic weights in torchvision's layout, up to relu2_2 (a small file)
        changes |= {"perceptual.vgg_weights": str(tmp_path / "vgg19.pth"), "perceptual.layer": "relu2_2"}
        torch.save(torchvision_state_dict(8), changes["perceptual.vgg_weights"])
    train_from_config(sr_config(photo_dir, output, steps=2, **changes))
    for term in ("perceptual", "adversarial", "discriminator"):
        assert all(value > 0 for _, value in logged(output, f"train/{term}"))
    card = json.loads((output / "model.json").read_text())
    assert card["recipe"]["loss"]["perceptual"]["features"] == features


@pytest.mark.parametrize(("changes", "message"), [
    ({"perceptual.features": "vgg19"}, "--vgg-weights"),  # no weights given
    ({"perceptual.features": "vgg16"}, "must be one of null, 'vgg19', 'vessels', 'vessels-unet'; got 'vgg16'"),
    ({"perceptual.features": "vessels", "perceptual.vgg_weights": "vgg19.pth"},
     "VGG19 weights were given .* but perceptual.features is 'vessels'"),  # would be silently unused
])
def test_perceptual_loss_without_weights_unknown_or_unused_is_refused_before_training(
    photo_dir: Path, tmp_path: Path, changes: dict[str, str], message: str
) -> None:
    config = sr_config(photo_dir, tmp_path / "vgg", **changes)
    with pytest.raises(TrainingError, match=message):
        train_from_config(config)
    assert not (tmp_path / "vgg").exists()


@pytest.fixture
def drive_like_dir(tmp_path: Path) -> Path:
    """Photos with dark lines and the lines' maps in DRIVE's layout (images/, 1st_manual/)."""
    images, manual = tmp_path / "drive" / "images", tmp_path / "drive" / "1st_manual"
    images.mkdir(parents=True)
    manual.mkdir()
    for index in range(4):
        photo = smooth_fundus(64, index)
        vessels = np.zeros((64, 64), dtype=bool)
        for row in np.random.default_rng(index).integers(12, 52, 4):
            vessels[row : row + 2, 8:56] = True
        photo[vessels] = photo[vessels] // 2
        Image.fromarray(photo).save(images / f"{21 + index}_training.png")
        Image.fromarray(vessels.astype(np.uint8) * 255).save(manual / f"{21 + index}_manual1.gif")
    return images


def test_vessel_segmenter_learns_the_expert_maps(drive_like_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "unet"
    config = tiny_config(drive_like_dir, output, steps=40, validate_every=40, **{"optimizer.lr": 1e-2})
    config["model"] = {"architecture": "unet", "kwargs": {"widths": [8, 16]}}
    config["data"] |= {"targets": "vessels", "patch_size": 32, "sigma": 0.0}
    config["loss"] = {"name": "vessel_segmentation"}
    model = load_model(train_from_config(config))
    losses = [loss for _, loss in logged(output, "train/loss")]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    dice_scores = logged(output, "val/dice_paper_centre")
    assert [step for step, _ in dice_scores] == [0, 40] and dice_scores[-1][1] > dice_scores[0][1] + 0.2
    card = json.loads((output / "model.json").read_text())
    assert card["task"] == "segment-vessels" and card["recipe"]["loss"]["name"] == "vessel_segmentation"
    assert model(torch.rand(1, 3, 30, 30)).shape == (1, 1, 30, 30)


def test_targets_and_loss_must_match() -> None:
    with pytest.raises(TrainingError, match="trains with loss.name 'vessel_segmentation'"):
        load_config({"data": {"targets": "vessels"}})


def kill_after_checkpoint(config_path: Path, at_step: int, log: Path) -> int | None:
    """Run ``python -m fundus_restore train`` on the config and SIGKILL it once its checkpoint
    holds step ``at_step`` or later; returns that checkpoint's step, or None when the kill
    came too late (the run had finished training first)."""
    import signal
    import time

    config = load_config(config_path)
    output = Path(config["output"])
    checkpoint = output / "checkpoint.pt"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "fundus_restore", "train", str(config_path)],
            stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    deadline = time.monotonic() + 60
    # Written atomically (temporary file, then rename): a visible checkpoint must always load.
    while process.poll() is None and not (checkpoint.exists() and load_checkpoint(checkpoint)["step"] >= at_step):
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"no checkpoint of step {at_step} within 60 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.005)
    process.kill()  # nothing if it has exited
    process.wait(timeout=30)
    assert process.returncode in (0, -signal.SIGKILL), log.read_text()[-3000:]
    step = load_checkpoint(checkpoint)["step"]
    finished = process.returncode == 0 or step >= config["steps"] or (output / "model.safetensors").exists()
    return None if finished else step


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_one(photo_dir: Path, tmp_path: Path) -> None:
    """A real kill (SIGKILL of ``fundus_restore train``, no Python cleanup, possibly mid-write)
    then ``--resume`` ends bit for bit where an uninterrupted run ends, leaves no temporary
    files and logs each step once. A run that finished before the kill proves nothing: it
    is retried longer."""
    import yaml

    for steps in (200, 1000):  # about 7 ms a step: the kill at step 10 lands well inside
        config = tiny_config(photo_dir, tmp_path / f"killed-{steps}", steps=steps, checkpoint_every=5, log_every=5,
                             validate_every=steps)
        config_path = tmp_path / f"killed-{steps}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        killed_at = kill_after_checkpoint(config_path, 10, tmp_path / f"killed-{steps}.log")
        if killed_at is not None:
            break
    else:
        pytest.fail("every run finished training before it could be killed")
    assert killed_at % 5 == 0 and 10 <= killed_at < steps

    resumed = subprocess.run(
        [sys.executable, "-m", "fundus_restore", "train", str(config_path), "--resume"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = train_from_config(tiny_config(photo_dir, tmp_path / "straight", steps=steps, checkpoint_every=5,
                                             log_every=5, validate_every=steps))

    output = Path(config["output"])
    expected, actual = load_file(straight), load_file(output / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert not list(output.glob("*.partial"))
    assert [step for step, _ in logged(output, "train/loss")] == list(range(5, steps + 1, 5))
    assert [step for step, _ in logged(output, "val/psnr_paper_centre")] == [0, steps]


@pytest.mark.slow
def test_two_processes_train_as_one_process_on_both_ranks_batches(photo_dir: Path, tmp_path: Path) -> None:
    """What data parallelism promises, checked exactly: a 2-process run equals one process
    stepping on rank 0's and rank 1's batch k joined.

    A 1-process run at the same global batch is not comparable: each rank draws from its
    own stream (``PatchStream`` with its rank: its own share of the image sequence and its
    own random generator), so the patches differ. What holds by design is that the ranks
    start from the seed's weights, DistributedDataParallel averages their gradients, and
    the loss is a mean over equal-sized batches; so the run is plain training on the union
    of the ranks' batches. Batch norm is off: its statistics are per rank, not over the
    union. The logged loss is the ranks' mean, i.e. the joined batch's. Only rank 0 saves,
    so its weights are compared; the tolerance allows for gloo's order of summation.
    """
    from fundus_restore.train import _patch_stream, training_split

    output = tmp_path / "ddp"
    config = tiny_config(photo_dir, output, steps=6, checkpoint_every=6, validate_every=6,
                         **{"model.kwargs": {"depth": 3, "width": 8, "batch_norm": False}})
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "fundus_restore", "train", str(config_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]

    settings = load_config(config)  # a Trainer writes nothing
    images, _ = training_split(settings)
    cpu = torch.device("cpu")
    trainer = Trainer(settings, Placement(0, 1, cpu))
    streams = [_patch_stream(settings, images, 0, Placement(rank, 2, cpu)) for rank in (0, 1)]
    losses = []
    for step in range(settings["steps"]):
        first, second = (stream.batch(step) for stream in streams)
        assert not torch.equal(first.clean, second.clean)  # the ranks train on different patches
        joined = (torch.cat((first[field], second[field])) for field in range(3))  # noisy, clean, sigma
        losses.append(trainer.train_step(*joined)["loss"])

    np.testing.assert_allclose([loss for _, loss in logged(output, "train/loss")], losses, rtol=1e-5)
    expected, actual = trainer.final_model().state_dict(), load_file(output / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
