from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fundus_restore import list_models, load_model, save_model
from fundus_restore.models import create_model
from fundus_restore.pretrained import WeightsError, count_parameters, default_model_name, model_card

# The bundled models issues 3 and 5 name, the DnCNN default they led to, and ours, at sigma 25 and
# told the noise level (the default, last).
ISSUE_MODELS = ("autoencoder-retina", "dncnn-retina", "dncnn-retina-green", "srresnet-x4-retina", "srgan-x4-retina",
                "dncnn-retina-green-range", "resunet-retina-green", "resunet-retina-green-blind")
RESTORATION_MEASURES = {f"{m}_{p}_{r}" for m in ("psnr", "ssim") for p in ("paper", "camera") for r in ("centre", "rim")}
# What a card's validation block must score, by task: PSNR/SSIM for a restored photo
# (issue 3); a vessel map (1 channel of logits) has no PSNR, it is scored by Dice and AUC.
VALIDATION_MEASURES = {
    "denoise": RESTORATION_MEASURES,
    "upscale": RESTORATION_MEASURES,
    "segment-vessels": {f"{m}_{p}_{r}" for m in ("dice", "auc") for p in ("paper", "camera") for r in ("centre", "rim")},
}
RECIPE_KEYS = ("init_weights", "optimizer", "schedule", "steps", "batch_size", "patch_size", "loss", "noise", "seed")
TRAINING_KEYS = ("wall_time_s", "device", "device_name", "processes", "patches_per_s", "earlier_stages")


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
    ("name", "content", "problem"),
    [("bad.safetensors", b"\x00" * 100, "unreadable"), ("bad.safetensors", None, "no such weights file"),
     # The official file itself, given where its conversion belongs.
     ("GD_Color_Blind.mat", b"MATLAB 7.3 MAT-file" + b"\x00" * 200,
      r"GD_Color_Blind\.mat: a MATLAB file, not safetensors weights: convert it with "
      r"fundus-restore import-weights GD_Color_Blind\.mat -o GD_Color_Blind\.safetensors$")],
)
def test_bad_files_are_refused(tmp_path: Path, name: str, content: bytes | None, problem: str):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=problem):
        load_model(path)


def _with_state(tmp_path: Path, name: str, state: dict, config: dict) -> Path:
    metadata = {"architecture": "dncnn", "config": json.dumps(config)}
    save_file(state, str(tmp_path / name), metadata=metadata)
    return tmp_path / name


def test_weights_of_no_float_type_or_beyond_float32_are_refused(tmp_path: Path):
    config = {"depth": 3, "width": 4, "batch_norm": False}
    state = create_model("dncnn", **config).state_dict()
    as_int8 = {key: value.round().to(torch.int8) for key, value in state.items()}
    integers = _with_state(tmp_path, "int8.safetensors", as_int8, config)
    with pytest.raises(WeightsError, match=r"int8\.safetensors: weight '.+' holds torch.int8 samples, not floating"):
        load_model(integers)
    huge = {k: v.double() for k, v in state.items()}
    huge["body.0.weight"][0, 0, 0, 0] = 1e300  # finite as a double, infinite as the float32 the model holds
    with pytest.raises(WeightsError, match=r"NaN or infinite values in weight 'body.0.weight' \(as float32\)"):
        load_model(_with_state(tmp_path, "huge.safetensors", huge, config))
    # A config asking for a huge network is refused by the weights' shapes, before any memory is asked for.
    with pytest.raises(WeightsError, match=r"wide\.safetensors: weights do not fit"):
        load_model(_with_state(tmp_path, "wide.safetensors", state, config | {"width": 10**8}))
    with pytest.raises(WeightsError, match=r"negative\.safetensors: cannot build the model"):
        load_model(_with_state(tmp_path, "negative.safetensors", state, config | {"width": -1}))


def test_a_pickle_is_never_loaded_and_the_message_says_why(tmp_path: Path):
    torch.save(create_model("dncnn", depth=3, width=4, batch_norm=False).state_dict(), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match=r"w\.pt: a PyTorch pickle, not safetensors weights: it is not loaded"):
        load_model(tmp_path / "w.pt")


def test_a_bundled_name_is_not_hidden_by_a_folder_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dncnn-small-demo").mkdir()  # e.g. an output folder named after its model
    assert load_model("dncnn-small-demo").name == "dncnn-small-demo"
    with pytest.raises(WeightsError, match="no such model or weights file"):
        load_model("../weights/dncnn-small-demo")  # a path, not a name: never looked up among the bundled files
    with pytest.raises(WeightsError, match="an empty model name"):
        load_model("")


@pytest.mark.parametrize(
    ("card", "problem"),
    [([1, 2], "a JSON list, not an object"), ({"recipe": None}, "its recipe and the recipe's noise must be objects"),
     ({"recipe": {"noise": {"sigma": "25"}}}, r"recipe\.noise\.sigma '25' is neither a number nor \[low, high\]"),
     ({"recipe": {"noise": {"sigma": [25]}}}, r"recipe\.noise\.sigma \[25\] is neither"),
     ({"task": "denoising"}, "task 'denoising' is none of denoise, upscale"),
     ({"architecture": "srresnet"}, r"describes a 'srresnet', the weights are a 'dncnn' \(a stale card\?\)")],
)
def test_a_card_that_does_not_describe_its_weights_is_refused_naming_it(tmp_path: Path, card, problem: str):
    path = save_model(create_model("dncnn", depth=3, width=4, batch_norm=False), tmp_path / "w.safetensors")
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=rf"w\.json: .*{problem}"):
        load_model(path)


def test_a_segmenter_without_its_card_is_no_denoiser(tmp_path: Path):
    from fundus_restore.inference import load_denoiser

    path = save_model(load_model("vessels-unet"), tmp_path / "segmenter.safetensors")  # its card left behind
    with pytest.raises(ValueError, match="segmenter is not a denoiser: its task is 'segment-vessels'"):
        load_denoiser(path)


def test_file_without_architecture_is_refused(tmp_path: Path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="architecture"):
        load_model(tmp_path / "plain.safetensors")


def test_unknown_name_lists_the_models_by_task():
    listed = rf"denoise: cbm3d \(classical\), .*{default_model_name()}.*; upscale: .*srresnet"
    with pytest.raises(WeightsError, match=rf"no-such-model: no such model or weights file; the models by task are {listed}"):
        load_model("no-such-model")


def test_default_is_the_bundled_denoiser_with_the_best_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import fundus_restore.pretrained as pretrained

    model = create_model("dncnn", depth=3, width=4, batch_norm=False)
    # A grey model's card scores grey crops, which are no measure of a colour denoiser.
    for name, psnr, task, channels in (("weak", 30.0, "denoise", 3), ("strong", 38.0, "denoise", 3),
                                       ("sr", 45.0, "upscale", 3), ("grey", 45.0, "denoise", 1)):
        save_model(model, tmp_path / f"{name}.safetensors")
        card = {"task": task, "config": {"channels": channels}, "validation": {pretrained.RANKING_MEASURE: psnr}}
        (tmp_path / f"{name}.json").write_text(json.dumps(card))
    monkeypatch.setattr(pretrained, "BUNDLED_DIR", tmp_path)
    assert pretrained.default_model_name() == "strong"
    assert pretrained.best_bundled_denoiser(pretrained.list_models(), channels=1) == "grey"
    # Grey photos get the grey default by its name; without it, the colour default takes them.
    assert pretrained.default_model_name(channels=1) == "strong"
    monkeypatch.setattr(pretrained, "DEFAULT_GREY_MODEL", "grey")
    assert pretrained.default_model_name(channels=1) == "grey" and pretrained.default_model_name() == "strong"
    # restore's denoiser of small photos, by its name, for colour photos only.
    assert pretrained.default_model_name(small_photos=True) == "strong"
    monkeypatch.setattr(pretrained, "DEFAULT_SMALL_PHOTO_MODEL", "weak")
    assert pretrained.default_model_name(small_photos=True) == "weak" and pretrained.default_model_name() == "strong"
    assert pretrained.default_model_name(channels=1, small_photos=True) == "grey"


def test_the_card_beside_a_weights_file_gives_its_training_noise_range(tmp_path: Path):
    path = save_model(create_model("dncnn", depth=3, width=4, batch_norm=False), tmp_path / "model.safetensors")
    assert load_model(path).noise_range is None  # no card, nothing known
    card = tmp_path / "model.json"
    card.write_text(json.dumps({"recipe": {"noise": {"sigma": [0, 55]}}}))
    assert load_model(path).noise_range == (0.0, 55.0)
    card.write_text(json.dumps({"recipe": {"noise": {"sigma": 25}}}))
    assert load_model(path).noise_range == (25.0, 25.0)
    assert load_model("dncnn-retina").noise_range == (25.0, 25.0)  # the paper's fixed level
    # An upscaler trained behind a denoiser saw that denoiser's outputs: noise-free input.
    upscaler = save_model(create_model("srresnet", blocks=1, width=4, scale=2), tmp_path / "sr.safetensors")
    upscaler_card = {"task": "upscale", "recipe": {"lr_denoiser": "dn", "noise": {"sigma": [0, 50]}}}
    (tmp_path / "sr.json").write_text(json.dumps(upscaler_card))
    assert load_model(upscaler).noise_range == (0.0, 0.0) and load_model(upscaler).lr_denoiser == "dn"
    card.write_text("{not json")
    with pytest.raises(WeightsError, match=r"model\.json: unreadable model card"):
        load_model(path)


def test_the_models_the_issues_name_are_bundled_and_the_default_is_ours():
    assert set(ISSUE_MODELS) <= set(list_models())
    assert default_model_name() == ISSUE_MODELS[-1]


def test_small_photos_have_their_own_bundled_default_trained_on_shrunk_photos():
    name = default_model_name(small_photos=True)
    assert name == "resunet-retina-green-blind-small" and name != default_model_name()
    assert max(model_card(name)["recipe"]["shrink"]) > 1  # photos shrunk before patches were cut


def test_grey_photos_have_their_own_bundled_default():
    name = default_model_name(channels=1)
    assert name == "resunet-retina-grey-blind" and name in list_models()
    model = load_model(name)
    assert model.config["channels"] == 1 and model.needs_noise_level
    assert model_card(name)["recipe"]["channels"] == [1]  # trained on the green channel


def card_gaps(card: dict) -> list[str]:
    """The fields issue 3 asks of a bundled model card that ``card`` lacks or leaves empty."""
    gaps = [key for key in ("task", "summary", "architecture", "config", "parameters") if key not in card]
    training_data = card.get("training_data", {})
    gaps += [f"training_data.{key}" for key in ("sources", "images", "validation_images") if not training_data.get(key)]
    gaps += [f"recipe.{key}" for key in RECIPE_KEYS if key not in card.get("recipe", {})]
    gaps += [f"training.{key}" for key in TRAINING_KEYS if key not in card.get("training", {})]
    validation = card.get("validation", {})
    measures = VALIDATION_MEASURES.get(card.get("task"), RESTORATION_MEASURES)
    gaps += [f"validation.{key}" for key in sorted(measures) if not isinstance(validation.get(key), (int, float))]
    return gaps


@pytest.mark.parametrize("name", list_models())
def test_bundled_card_describes_its_weights(name: str):
    """Issue 3: each bundled model ships safetensors weights with a card giving the
    architecture, parameter count, training data, recipe, training time and device, and
    validation scores; the card's numbers must describe the weights beside it."""
    card = model_card(name)
    gaps = card_gaps(card)
    if gaps:
        pytest.fail(f"{name}.json lacks {', '.join(gaps)}")
    model = load_model(name)
    state = model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    assert (model.architecture, model.config, model.task) == (card["architecture"], card["config"], card["task"])
    assert card["parameters"] == count_parameters(model)

    training_data = card["training_data"]
    assert len(set(training_data["images"])) == len(training_data["images"])
    assert not set(training_data["images"]) & set(training_data["validation_images"])  # held out by name
    assert card["recipe"]["steps"] > 0 and card["recipe"]["batch_size"] > 0 and card["recipe"]["patch_size"] > 0
    training = card["training"]
    assert training["wall_time_s"] > 0 and training["patches_per_s"] > 0 and training["processes"] >= 1
    assert training["device"] in ("cpu", "cuda") and training["device_name"]
    # A fine-tune of a fine-tune lists every run before it, back to weights without a card.
    stages = training["earlier_stages"]
    assert all(stage["steps"] > 0 and stage["wall_time_s"] > 0 and stage["device_name"] for stage in stages)

    validation = card["validation"]
    for key in VALIDATION_MEASURES[card["task"]]:
        low, high = (10.0, 60.0) if key.startswith("psnr") else (0.0, 1.0)  # dB; SSIM, Dice and AUC are fractions
        assert low < validation[key] <= high, (key, validation[key])

    # The task is what the model does: a denoiser keeps the photo's shape (colour, or grey
    # for a grey model), an upscaler enlarges it by its scale, a segmenter gives one
    # channel of vessel logits.
    channels = model.config.get("channels", 3)
    with torch.no_grad():
        shape = model(torch.rand(1, channels, 32, 32), torch.tensor([25 / 255])).shape
    scale = model.config.get("scale", 1)
    expected = {"denoise": (1, channels, 32, 32), "upscale": (1, 3, 32 * scale, 32 * scale), "segment-vessels": (1, 1, 32, 32)}
    assert shape == expected[card["task"]] and (card["task"] == "upscale") == (scale > 1)


def test_saved_weights_are_readable_by_others_as_the_umask_allows(tmp_path: Path):
    # safetensors' own save_file creates owner-only files; a lab shares its weights.
    previous = os.umask(0o022)
    try:
        path = save_model(create_model("dncnn", depth=3, width=8), tmp_path / "shared.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert load_model(path).config["depth"] == 3


def test_weights_that_do_not_fit_name_the_keys_and_a_missing_gpu_is_said_in_one_line(tmp_path: Path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3)}, str(path), metadata={"architecture": "dncnn", "config": "{}"})
    with pytest.raises(WeightsError, match=r"x\.safetensors: weights do not fit architecture 'dncnn' \(\{\}\): "
                                           r"missing body\.0\.weight, .* \.\.\.; unexpected a$"):
        load_model(path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' asked for, but CUDA is not available here"):
            load_model("dncnn-small-demo", device="cuda")
