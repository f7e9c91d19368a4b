"""Import of the official DnCNN MatConvNet files: structure, errors, round trip and the
published PSNRs. Synthetic files are written in MATLAB v7.3 layout with h5py."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import shared_path
from scipy.ndimage import gaussian_filter

from fundus_restore.matconvnet import (
    BENCHMARK_IMAGE_COUNT,
    PUBLISHED_DNCNN,
    PUBLISHED_TOLERANCE_DB,
    PublishedResult,
    benchmark_images,
    denoising_psnr,
    import_weights,
    load_matconvnet_dncnn,
    noisy_benchmark_image,
)
from fundus_restore.metrics import psnr
from fundus_restore.pretrained import WeightsError, load_model, read_metadata


def _write_char(group: h5py.Group, name: str, text: str) -> None:
    dataset = group.create_dataset(name, data=np.array([[ord(c)] for c in text], dtype=np.uint16))
    dataset.attrs["MATLAB_class"] = np.bytes_("char")


def _write_cell(file: h5py.File, group: h5py.Group, name: str, items: list[h5py.HLObject]) -> None:
    if not items:
        # MATLAB writes an empty cell as its dimensions, flagged MATLAB_empty.
        dataset = group.create_dataset(name, data=np.zeros(2, dtype=np.uint64))
        dataset.attrs["MATLAB_empty"] = np.uint8(1)
    else:
        dataset = group.create_dataset(name, data=np.array([[item.ref] for item in items], dtype=h5py.ref_dtype))
    dataset.attrs["MATLAB_class"] = np.bytes_("cell")


def write_simplenn(path: Path, layers: list[dict]) -> Path:
    """A simplenn ``net.layers`` file; each layer is ``{"type": str, "weights": [arrays
    in MATLAB axis order], other numeric fields}``. Arrays are stored transposed, as
    MATLAB does, so the reader's axis handling is exercised."""
    with h5py.File(path, "w") as file:
        refs = file.create_group("#refs#")
        structs = []
        for index, layer in enumerate(layers):
            struct = refs.create_group(f"layer{index}")
            struct.attrs["MATLAB_class"] = np.bytes_("struct")
            _write_char(struct, "type", layer["type"])
            arrays = [refs.create_dataset(f"w{index}_{i}", data=np.asarray(a, np.float32).T) for i, a in enumerate(layer.get("weights", []))]
            _write_cell(file, struct, "weights", arrays)
            for key, value in layer.items():
                if key not in ("type", "weights"):
                    struct.create_dataset(key, data=np.atleast_2d(np.asarray(value, np.float64)))
            structs.append(struct)
        net = file.create_group("net")
        net.attrs["MATLAB_class"] = np.bytes_("struct")
        _write_cell(file, net, "layers", structs)
    return path


def tiny_dncnn_layers(channels: int = 1, width: int = 4, depth: int = 3, seed: int = 0) -> list[dict]:
    """conv, relu, ..., conv with random MATLAB-order (H×W×in×out) filters."""
    rng = np.random.default_rng(seed)
    sizes = [channels] + [width] * (depth - 1) + [channels]
    layers: list[dict] = []
    for inputs, outputs in zip(sizes[:-1], sizes[1:]):
        filters = rng.standard_normal((3, 3, inputs, outputs)).astype(np.float32)
        # MATLAB drops trailing singleton axes: a one-output filter is saved as 3×3×in.
        if outputs == 1:
            filters = filters[..., 0]
        layers += [{"type": "conv", "weights": [filters, rng.standard_normal(outputs)], "stride": 1, "pad": 1}, {"type": "relu", "leak": 0}]
    return layers[:-1]


# --- structure and axis order -------------------------------------------------------


def test_synthetic_file_builds_matching_dncnn(tmp_path: Path) -> None:
    layers = tiny_dncnn_layers(channels=3, width=5, depth=4)
    model = load_matconvnet_dncnn(write_simplenn(tmp_path / "tiny.mat", layers))
    assert model.config == {"channels": 3, "depth": 4, "width": 5, "batch_norm": False, "range_inputs": False, "range_gain": 1.0}
    assert not model.training
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    for conv, layer in zip(convs, layers[::2], strict=True):
        matlab_filters, bias = layer["weights"]
        # PyTorch out×in×H×W from MATLAB H×W×in×out.
        np.testing.assert_array_equal(conv.weight.detach().numpy(), np.asarray(matlab_filters).transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(conv.bias.detach().numpy(), np.asarray(bias, np.float32))


def test_grey_last_layer_with_dropped_singleton_axis(tmp_path: Path) -> None:
    model = load_matconvnet_dncnn(write_simplenn(tmp_path / "grey.mat", tiny_dncnn_layers(channels=1)))
    assert model.config["channels"] == 1
    assert model.body[-1].weight.shape == (1, 4, 3, 3)


def test_filter_rows_are_image_rows(tmp_path: Path) -> None:
    """A MATLAB filter whose single 1 sits at (row 3, column 2) reads the pixel one row
    below (MatConvNet correlates, like PyTorch): this pins the H/W order down."""
    below = np.zeros((3, 3, 1, 1), np.float32)
    below[2, 1] = 1.0
    identity = np.zeros((3, 3, 1, 1), np.float32)
    identity[1, 1] = 1.0
    layers = [{"type": "conv", "weights": [f, [0.0]], "stride": 1, "pad": 1} for f in (below, identity, identity)]
    layers = [layers[0], {"type": "relu"}, layers[1], {"type": "relu"}, layers[2]]
    model = load_matconvnet_dncnn(write_simplenn(tmp_path / "shift.mat", layers))
    image = torch.rand(1, 1, 6, 7)
    with torch.inference_mode():
        predicted_noise = image - model(image)
    torch.testing.assert_close(predicted_noise[0, 0, :-1], image[0, 0, 1:])


@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "depth", "channels"),
    [("GD_Gray_Blind.mat", 20, 1), ("sigma=25.mat", 17, 1), ("GD_Color_Blind.mat", 20, 3), ("color_sigma=25.mat", 20, 3)],
)
def test_official_files_load(dncnn_weights_dir: Path, name: str, depth: int, channels: int) -> None:
    model = load_matconvnet_dncnn(dncnn_weights_dir / name)
    assert model.config == {"channels": channels, "depth": depth, "width": 64, "batch_norm": False, "range_inputs": False, "range_gain": 1.0}


@pytest.mark.shared
def test_import_weights_round_trip(dncnn_weights_dir: Path, tmp_path: Path) -> None:
    source = dncnn_weights_dir / "sigma=25.mat"
    written = import_weights(source, tmp_path / "dncnn-s25.safetensors")
    original, reloaded = load_matconvnet_dncnn(source), load_model(written)
    image = torch.rand(1, 1, 40, 33, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(image), original(image), rtol=0, atol=0)
    metadata = read_metadata(written)
    assert metadata["source_file"] == "sigma=25.mat"
    assert "MatConvNet" in metadata["source"]


# --- bad files ----------------------------------------------------------------------


def _assert_refused(path: Path, problem: str) -> None:
    with pytest.raises(WeightsError) as caught:
        load_matconvnet_dncnn(path)
    message = str(caught.value)
    assert str(path) in message and problem in message and "\n" not in message


def _replace_first_filters(path: Path, **dataset) -> Path:
    """``path`` with its first layer's filters replaced by a dataset of ``dataset``'s arguments."""
    with h5py.File(path, "r+") as file:
        del file["#refs#/w0_0"]
        file["#refs#"].create_dataset("w0_0", **dataset)
    return path


def test_a_filter_beyond_float32_and_a_huge_declared_array_are_refused(tmp_path: Path) -> None:
    layers = tiny_dncnn_layers()
    overflow = write_simplenn(tmp_path / "overflow.mat", layers)
    filters = np.asarray(layers[0]["weights"][0], np.float64).T.copy()
    filters.flat[0] = 1e39  # a double: finite, but infinite as the float32 the model holds
    _assert_refused(_replace_first_filters(overflow, data=filters), "layer 1 has NaN or infinite weights (as float32)")
    # A few bytes of header may declare terabytes: refused before any is read.
    huge = _replace_first_filters(write_simplenn(tmp_path / "huge.mat", layers),
                                  shape=(10**6, 10**6), dtype=np.float32, chunks=(8, 8))
    _assert_refused(huge, "layer 1 filters declares 1000000×1000000 values, far more than a DnCNN holds")


def test_import_refuses_to_write_over_a_file_or_to_another_format(tmp_path: Path) -> None:
    source = write_simplenn(tmp_path / "tiny.mat", tiny_dncnn_layers(channels=3))
    for out, problem in [(source, "the output must be a .safetensors file"),  # the official file itself
                         (tmp_path / "w.pt", "the output must be a .safetensors file"),
                         (tmp_path, "the output must be a .safetensors file")]:
        with pytest.raises(WeightsError, match=f"^{out}: {problem}$"):
            import_weights(source, out)
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(WeightsError, match="folder.safetensors: a folder, not a weights file$"):
        import_weights(source, tmp_path / "folder.safetensors")
    written = import_weights(source, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"w\.safetensors: exists; replace it with --overwrite$"):
        import_weights(source, written)
    assert import_weights(source, written, overwrite=True) == written
    (tmp_path / "file").write_text("x")  # a file where the output's folder should be
    with pytest.raises(WeightsError, match=r"x\.safetensors: cannot write the weights \(.+\)$"):
        import_weights(source, tmp_path / "file" / "x.safetensors")
    assert not list(tmp_path.rglob("*.partial"))


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.mat"
    path.write_text("not a MAT-file\n")
    _assert_refused(path, "not a MATLAB v7.3 MAT-file")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "absent.mat", "no such file")


def test_hdf5_without_net_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.mat"
    with h5py.File(path, "w") as file:
        file.create_dataset("weights", data=np.ones(3))
    _assert_refused(path, "no variable 'net'")


def test_unfolded_batch_norm_is_refused(tmp_path: Path) -> None:
    layers = tiny_dncnn_layers()
    layers[1] = {"type": "bnorm", "weights": [np.ones(4), np.zeros(4)]}
    _assert_refused(write_simplenn(tmp_path / "bnorm.mat", layers), "layer 2 has type 'bnorm'")


def test_stride_two_is_refused(tmp_path: Path) -> None:
    layers = tiny_dncnn_layers()
    layers[2]["stride"] = [2, 2]
    _assert_refused(write_simplenn(tmp_path / "strided.mat", layers), "layer 3 has stride [2.0, 2.0]")


def test_mismatched_channels_are_refused(tmp_path: Path) -> None:
    layers = tiny_dncnn_layers(width=4)
    layers[2]["weights"][0] = np.zeros((3, 3, 5, 4), np.float32)
    _assert_refused(write_simplenn(tmp_path / "chain.mat", layers), "convolution 2 maps 5 to 4 channels, expected 4 to 4")


@pytest.mark.shared
def test_truncated_official_file_is_refused(dncnn_weights_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.mat"
    content = (dncnn_weights_dir / "sigma=25.mat").read_bytes()
    path.write_bytes(content[: len(content) // 2])
    _assert_refused(path, "damaged or unreadable MAT-file")


@pytest.mark.shared
def test_nan_weight_in_official_file_is_refused(dncnn_weights_dir: Path, tmp_path: Path) -> None:
    path = Path(shutil.copy(dncnn_weights_dir / "sigma=25.mat", tmp_path / "poisoned.mat"))
    with h5py.File(path, "r+") as file:
        third_layer = file[file["net/layers"][2, 0]]
        filters = file[third_layer["weights"][0, 0]]
        filters[0, 0, 0, 0] = np.nan
    _assert_refused(path, "layer 3 has NaN or infinite weights")


# --- published PSNRs ----------------------------------------------------------------


def _published(weights_file: str) -> PublishedResult:
    return next(p for p in PUBLISHED_DNCNN if p.weights_file == weights_file)


@pytest.mark.slow
@pytest.mark.shared
def test_cdncnn_b_reproduces_published_psnr_on_all_cbsd68(dncnn_weights_dir: Path) -> None:
    published = _published("GD_Color_Blind.mat")
    model = load_matconvnet_dncnn(dncnn_weights_dir / published.weights_file)
    images = benchmark_images(shared_path("data", published.dataset))
    assert len(images) == BENCHMARK_IMAGE_COUNT
    measured = np.mean([denoising_psnr(model, path, seed=index)[1] for index, path in enumerate(images)])
    assert abs(measured - published.psnr) <= PUBLISHED_TOLERANCE_DB, f"{measured:.3f} dB vs published {published.psnr}"


# Denoised PSNR (dB) of a few images, by benchmark index (= noise seed), from the full
# 68-image run of scripts/check_published_dncnn.py --csv. Same image, same noise and
# same network give the same number up to float rounding, far below 0.01 dB.
# Images test001, test023, test046, test068 (BSD68) = 101085, 157055, 229036, 351093 (CBSD68).
FULL_RUN_PSNRS = {
    "GD_Gray_Blind.mat": {0: 25.867, 22: 28.997, 45: 26.429, 67: 26.096},
    "sigma=25.mat": {0: 25.952, 22: 29.042, 45: 26.483, 67: 26.171},
    "color_sigma=25.mat": {0: 28.296, 22: 31.283, 45: 28.984, 67: 29.022},
}
# Bounds independent of the recorded numbers. These four images are textured and
# harder than average: the networks gain 6.7 dB (grey) and 9.2 dB (colour) over the
# noisy input here (9 to 11 dB over all 68), and beat the best of a few Gaussian blurs
# (chosen per image knowing the clean image) by 2.1 dB (grey) and 4.7 dB (colour).
# A network with misread weights falls far below both.
MIN_GAIN_OVER_NOISY_DB = 6.0
MIN_MARGIN_OVER_GAUSSIAN_DB = 1.5
GAUSSIAN_WIDTHS = (0.6, 0.7, 0.8, 1.0)


def best_gaussian_filter_psnr(clean: np.ndarray, noisy: np.ndarray) -> float:
    """PSNR of the best of a few Gaussian blurs, chosen knowing the clean image."""
    return max(psnr(clean, gaussian_filter(noisy, sigma=(width, width, 0))) for width in GAUSSIAN_WIDTHS)


@pytest.mark.shared
@pytest.mark.parametrize("weights_file", sorted(FULL_RUN_PSNRS))
def test_official_model_on_benchmark_subset(dncnn_weights_dir: Path, weights_file: str) -> None:
    published = _published(weights_file)
    model = load_matconvnet_dncnn(dncnn_weights_dir / weights_file)
    images = benchmark_images(shared_path("data", published.dataset))
    gains, margins = [], []
    for index, full_run_psnr in FULL_RUN_PSNRS[weights_file].items():
        noisy_psnr, denoised_psnr = denoising_psnr(model, images[index], seed=index)
        assert denoised_psnr == pytest.approx(full_run_psnr, abs=0.01), images[index].name
        clean, noisy = noisy_benchmark_image(images[index], rgb=model.config["channels"] == 3, seed=index)
        gains.append(denoised_psnr - noisy_psnr)
        margins.append(denoised_psnr - best_gaussian_filter_psnr(clean, noisy))
    assert np.mean(gains) >= MIN_GAIN_OVER_NOISY_DB, f"gain over noisy {np.mean(gains):.2f} dB"
    assert np.mean(margins) >= MIN_MARGIN_OVER_GAUSSIAN_DB, f"margin over Gaussian blur {np.mean(margins):.2f} dB"
