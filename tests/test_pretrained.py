from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fundus_restore import list_models, load_model, save_model
from fundus_restore.models import create_model
from fundus_restore.pretrained import WeightsError, default_model_name, model_card


def test_save_and_load_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = create_model("dncnn", depth=4, width=8, batch_norm=False)
    path = save_model(model, tmp_path / "a (1).safetensors")
    loaded = load_model(path)
    assert loaded.config == model.config and not loaded.training
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.partial"))  # written atomically


def test_every_bundled_model_loads_and_has_a_card():
    names = list_models()
    assert names, "at least one model is bundled"
    assert default_model_name() in names
    for name in names:
        card = model_card(name)
        assert {"architecture", "summary", "recipe", "validation"} <= set(card)
        model = load_model(name)
        assert model.architecture == card["architecture"] and model.config == card["config"]


def test_nan_weights_are_refused_naming_the_file(tmp_path: Path):
    model = create_model("dncnn", depth=3, width=4, batch_norm=False)
    model.body[0].weight.data[0, 0, 0, 0] = float("nan")
    path = save_model(model, tmp_path / "nan.safetensors")
    with pytest.raises(WeightsError, match=r"nan\.safetensors.*NaN"):
        load_model(path)


def test_weights_of_another_shape_are_refused(tmp_path: Path):
    path = save_model(create_model("dncnn", depth=3, width=4, batch_norm=False), tmp_path / "w.safetensors")
    state = load_model(path).state_dict()
    metadata = {"architecture": "dncnn", "config": json.dumps({"depth": 3, "width": 8, "batch_norm": False})}
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata=metadata)
    with pytest.raises(WeightsError, match=r"mismatch\.safetensors.*do not fit"):
        load_model(tmp_path / "mismatch.safetensors")


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"\x00" * 100, "unreadable"), (None, "no such weights file")],
)
def test_bad_files_are_refused(tmp_path: Path, content: bytes | None, problem: str):
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=problem):
        load_model(path)


def test_file_without_architecture_is_refused(tmp_path: Path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="architecture"):
        load_model(tmp_path / "plain.safetensors")


def test_unknown_name_lists_the_bundled_models():
    with pytest.raises(WeightsError, match=default_model_name()):
        load_model("no-such-model")


def test_default_is_the_bundled_denoiser_with_the_best_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import fundus_restore.pretrained as pretrained

    model = create_model("dncnn", depth=3, width=4, batch_norm=False)
    for name, psnr, task in (("weak", 30.0, "denoise"), ("strong", 38.0, "denoise"), ("sr", 45.0, "upscale")):
        save_model(model, tmp_path / f"{name}.safetensors")
        card = {"task": task, "validation": {pretrained.RANKING_MEASURE: psnr}}
        (tmp_path / f"{name}.json").write_text(json.dumps(card))
    monkeypatch.setattr(pretrained, "BUNDLED_DIR", tmp_path)
    assert pretrained.default_model_name() == "strong"


def test_the_card_beside_a_weights_file_gives_its_training_noise_range(tmp_path: Path):
    path = save_model(create_model("dncnn", depth=3, width=4, batch_norm=False), tmp_path / "model.safetensors")
    assert load_model(path).noise_range is None  # no card, nothing known
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"recipe": {"noise": {"sigma": [0, 55]}}}))
    assert load_model(path).noise_range == (0.0, 55.0)
    card.write_text(json.dumps({"recipe": {"noise": {"sigma": 25}}}))
    assert load_model(path).noise_range == (25.0, 25.0)
    assert load_model("dncnn-retina").noise_range == (25.0, 25.0)  # the paper's fixed level
    card.write_text("{not json")
    with pytest.raises(WeightsError, match=r"model\.json: unreadable model card"):
        load_model(path)
