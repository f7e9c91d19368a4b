from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import one_thread, photo_dir, tiny_config  # noqa: F401  (fixtures)

from fundus_restore.pretrained import load_model
from fundus_restore.train import calibration_batches, load_config, train_from_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bundle_model.py"


def bundle_model_script():
    spec = importlib.util.spec_from_file_location("bundle_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rescored_validation_reproduces_the_cards_own_validation(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    train_from_config(tiny_config(photo_dir, output, steps=4, validate_every=4))
    card = json.loads((output / "model.json").read_text())
    photos = [photo_dir / name for name in card["training_data"]["validation_images"]]
    model = load_model(output / "model.safetensors")
    rescored = bundle_model_script().rescored_validation(output, model, photos)
    assert rescored.keys() == card["validation"].keys()
    for key, value in card["validation"].items():
        assert rescored[key] == pytest.approx(value, abs=2e-4), key


def test_calibrating_a_finished_run_zeroes_its_mean_error_on_fresh_training_patches(photo_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    # Trained in float32, so train itself does not re-centre it.
    weights = train_from_config(tiny_config(photo_dir, output, steps=4, validate_every=4, calibration_patches=64))
    assert json.loads((output / "model.json").read_text())["training"]["output_calibration"] is None
    model = load_model(weights)
    record = bundle_model_script().calibrated(output, model)
    assert record["patches"] == 64 and len(record["output_shift_255"]) == 3
    config = load_config(output / "config.yaml")
    images = [photo_dir / name for name in json.loads((output / "model.json").read_text())["training_data"]["images"]]
    with torch.no_grad():
        errors = torch.cat([model(b.noisy, b.sigma) - b.clean for b in calibration_batches(config, images, config["steps"])])
    np.testing.assert_allclose(errors.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
