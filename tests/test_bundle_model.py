from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_train import one_thread, photo_dir, tiny_config  # noqa: F401  (fixtures)

from fundus_restore.train import train_from_config

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
    rescored = bundle_model_script().rescored_validation(output, photos)
    assert rescored.keys() == card["validation"].keys()
    for key, value in card["validation"].items():
        assert rescored[key] == pytest.approx(value, abs=2e-4), key
