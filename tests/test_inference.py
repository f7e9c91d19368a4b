from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fundus_restore
from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.inference import (
    CONSERVATIVE_OVERLAP,
    _prepare_file,
    _tile_spans,
    apply_tiled,
    check_run_settings,
    default_overlap,
    denoise,
    noise_level_mismatch,
    prepare_model,
    resolve_device,
    smallest_tile,
    tiling_cost,
    upscale,
)
from fundus_restore.metrics import psnr
from fundus_restore.models import create_model
from fundus_restore.pretrained import WeightsError, save_model


def random_dncnn(depth: int = 5, width: int = 8, batch_norm: bool = False, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return create_model("dncnn", channels=3, depth=depth, width=width, batch_norm=batch_norm, **kwargs).eval()


def upsampler_x2() -> nn.Module:
    """A toy super-resolution network: two convolutions and a PixelShuffle(2)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, padding=1), nn.PixelShuffle(2)
    ).eval()


def whole_image(model: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0))[0].permute(1, 2, 0).numpy()


@pytest.fixture
def odd_image() -> np.ndarray:
    return np.random.default_rng(1).random((203, 317, 3), dtype=np.float32)


@pytest.mark.parametrize("tile", [29, 50, 97, 203, 1000])
def test_tiled_denoise_equals_whole_image(odd_image: np.ndarray, tile: int) -> None:
    model = random_dncnn()
    restored = denoise(odd_image, model, tile=tile, device="cpu")
    assert np.abs(restored - whole_image(model, odd_image)).max() < 1e-4


@pytest.mark.parametrize("tile", [29, 97])
def test_tiled_denoise_with_range_inputs_equals_whole_image(odd_image: np.ndarray, tile: int) -> None:
    """The default denoiser reads the parts of its input outside [0, 1]: tiles must see them too."""
    model = random_dncnn(range_inputs=True, range_gain=30.0)
    with torch.no_grad():
        model.body[0].weight.normal_(0, 0.1)  # non-zero range weights
    unclipped = 1.6 * odd_image - 0.3
    restored = denoise(unclipped, model, tile=tile, device="cpu")
    whole = whole_image(model, unclipped)
    assert np.abs(whole - whole_image(model, unclipped.clip(0, 1))).max() > 1e-2  # the range inputs matter
    assert np.abs(restored - whole).max() < 1e-4


@pytest.mark.parametrize("tile", [17, 64, 150])
def test_tiled_upsampler_equals_whole_image(odd_image: np.ndarray, tile: int) -> None:
    model = upsampler_x2()
    source = torch.from_numpy(odd_image).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        tiled = apply_tiled(model, source, tile=tile, overlap=default_overlap(model), scale=2)
        assert tiled.shape == (1, 3, 406, 634)
        assert (tiled - model(source)).abs().max() < 1e-4


def test_too_small_overlap_leaves_seams(odd_image: np.ndarray) -> None:
    # The equality above is not an accident of the data: without overlap the tiles disagree.
    model = random_dncnn()
    restored = denoise(odd_image, model, tile=50, overlap=0, device="cpu")
    assert np.abs(restored - whole_image(model, odd_image)).max() > 1e-3


@pytest.mark.parametrize("architecture", ["dncnn", "resunet"])
def test_the_smallest_tile_runs_exactly_and_one_less_is_refused_up_front(architecture: str) -> None:
    torch.manual_seed(0)
    kwargs = {"depth": 5, "width": 8} if architecture == "dncnn" else {"widths": [4, 8], "blocks": 1}
    model = create_model(architecture, **kwargs).eval()
    smallest = smallest_tile(model)
    # A few pixels more than the tile, so that the image is cut into a few tiles (each keeps little).
    image = np.random.default_rng(1).random((smallest + 3, smallest + 5, 3), dtype=np.float32)
    whole = denoise(image, model, device="cpu")
    assert np.abs(denoise(image, model, tile=smallest, device="cpu") - whole).max() < 1e-4
    assert check_run_settings(model, tile=smallest, device="cpu") is model
    with pytest.raises(ValueError, match=f"tile {smallest - 1} is too small for .*: at least {smallest} pixels"):
        check_run_settings(model, tile=smallest - 1, device="cpu")
    with pytest.raises(ValueError, match="must be larger than twice the overlap"):  # what it spares a batch
        denoise(image, model, tile=smallest - 1, device="cpu")


@pytest.mark.parametrize("run", [denoise, upscale])
def test_channel_axis_takes_channels_first_and_grey_images_as_scikit_image_does(run: Any) -> None:
    model = random_dncnn() if run is denoise else random_srresnet(2)
    image = np.random.default_rng(3).random((21, 17, 3), dtype=np.float32)
    last = run(image, model, device="cpu")
    first = run(np.ascontiguousarray(np.moveaxis(image, -1, 0)), model, device="cpu", channel_axis=0)
    np.testing.assert_array_equal(first, np.moveaxis(last, -1, 0))
    grey = image[..., 1]
    flat = run(grey, model, device="cpu", channel_axis=None)
    np.testing.assert_array_equal(flat, run(grey[..., None], model, device="cpu")[..., 0])
    with pytest.raises(ValueError, match="channel_axis=None is for an H×W grey image"):
        run(image, model, device="cpu", channel_axis=None)
    with pytest.raises(ValueError, match=r"or H×W with channel_axis=None\), got an array of shape \(21, 17\)"):
        run(grey, model, device="cpu")
    with pytest.raises(ValueError, match=r"got 17 channels \(channels first\? pass channel_axis=0\)"):
        run(np.moveaxis(image, -1, 0), model, device="cpu")


@pytest.mark.parametrize(("option", "value"), [("tile", 300.5), ("overlap", 10.5), ("overlap", -1)])
def test_a_tile_or_overlap_that_is_not_a_whole_number_of_pixels_is_named(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"^{option} is a whole number of pixels, got {value}$"):
        denoise(np.zeros((16, 16, 3), np.float32), random_dncnn(), device="cpu", **{"tile": 300, option: value})


@pytest.mark.parametrize("device", ["tpu", "mps", "xpu", "meta"])  # unknown to torch, or known but not run here
def test_an_unknown_device_is_named_in_one_line(device: str) -> None:
    with pytest.raises(ValueError, match=f"^unknown device '{device}': auto, cpu or cuda"):
        resolve_device(device)


@pytest.mark.parametrize("length", [1, 7, 100, 203, 1696])
@pytest.mark.parametrize(("tile", "overlap"), [(5, 2), (40, 5), (64, 0), (512, 20)])
def test_tile_spans_partition_the_axis_inside_valid_regions(length: int, tile: int, overlap: int) -> None:
    spans = _tile_spans(length, tile, overlap)
    assert spans[0][2] == 0 and spans[-1][3] == length
    for (start, stop, keep_start, keep_stop), following in zip(spans, spans[1:] + [None]):
        assert 0 <= start and stop <= length and stop - start <= tile
        # The kept part is at least `overlap` away from every cut the image does not share.
        assert keep_start == 0 or keep_start >= start + overlap
        assert keep_stop == length or keep_stop <= stop - overlap
        assert keep_start < keep_stop
        if following is not None:
            assert following[2] == keep_stop


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("tile", [256, 512, 1024])
def test_tiling_cost_bounds_the_tiles_run_for_a_strided_network_too(length: int, tile: int) -> None:
    model = create_model("resunet")  # overlap 112 and a grid of 8, which tiles may grow by 7 on each side
    spans = _tile_spans(length, tile, default_overlap(model), model.tile_alignment)
    run = (sum(stop - start for start, stop, _, _ in spans) / length) ** 2
    assert run <= tiling_cost(model, tile) and (tile >= length or run > 0.5 * tiling_cost(model, tile))


def test_tiles_are_balanced() -> None:
    # 1696 pixels in tiles of ≤ 512 with overlap 20 need 4 tiles; equal ones of 454 repeat the least work.
    assert [stop - start for start, stop, _, _ in _tile_spans(1696, 512, 20)] == [454] * 4


def test_default_overlap_is_the_receptive_field_radius() -> None:
    assert default_overlap(random_dncnn(depth=7)) == 7
    assert default_overlap(create_model("autoencoder", channels=3, skip_weights=True)) == 8
    assert default_overlap(upsampler_x2()) == 2
    pooled = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2))
    assert default_overlap(pooled) == CONSERVATIVE_OVERLAP
    pooled.receptive_field_radius = 5
    assert default_overlap(pooled) == 5


def test_output_is_float32_image_and_not_clipped() -> None:
    model = random_dncnn()
    # A zero last layer predicts no noise, so DnCNN returns its input exactly.
    nn.init.zeros_(model.body[-1].weight)
    nn.init.zeros_(model.body[-1].bias)
    image = np.random.default_rng(2).uniform(-0.5, 1.5, (40, 30, 3))
    restored = denoise(image, model, tile=16, device="cpu")
    assert restored.shape == (40, 30, 3) and restored.dtype == np.float32
    np.testing.assert_array_equal(restored, image.astype(np.float32))


def test_caller_model_is_left_untouched(odd_image: np.ndarray) -> None:
    model = random_dncnn(batch_norm=True)
    with torch.no_grad():  # non-trivial running statistics, so folding them matters
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    restored = denoise(odd_image, model, tile=64, device="cpu")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert np.abs(restored - whole_image(model.eval(), odd_image)).max() < 1e-4


def test_ready_model_is_used_without_a_copy() -> None:
    cpu = torch.device("cpu")
    ready = random_dncnn()
    assert prepare_model(ready, cpu) is ready
    training = random_dncnn().train()
    prepared = prepare_model(training, cpu)
    assert prepared is not training and not prepared.training and training.training


def test_in_place_network_leaves_the_input_alone() -> None:
    image = np.linspace(-0.4, 1, 5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    original = image.copy()
    restored = denoise(image, nn.ReLU(inplace=True), device="cpu")
    np.testing.assert_array_equal(image, original)
    np.testing.assert_array_equal(restored, np.maximum(original, 0))


def test_sigma_reaches_the_model() -> None:
    class ScaleBySigma(nn.Module):
        def forward(self, x: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
            return x * (1.0 if sigma is None else sigma)

    image = np.full((8, 8, 3), 0.5, dtype=np.float32)
    assert np.allclose(denoise(image, ScaleBySigma(), device="cpu"), 0.5)
    assert np.allclose(denoise(image, ScaleBySigma(), sigma=0.1, device="cpu"), 0.05)
    # One of the package's blind architectures ignores it, and says so.
    with pytest.warns(UserWarning, match="dncnn-small-demo is blind: the sigma given is ignored"):
        denoise(image, "dncnn-small-demo", sigma=0.1, device="cpu")


def test_models_loaded_by_file_are_cached(tmp_path, odd_image: np.ndarray) -> None:
    model = random_dncnn()
    weights = save_model(model, tmp_path / "tiny.safetensors")
    _prepare_file.cache_clear()
    first = denoise(odd_image, weights, device="cpu")
    second = denoise(odd_image, str(weights), device="cpu")
    assert _prepare_file.cache_info().misses == 1 and _prepare_file.cache_info().hits == 1
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - whole_image(model, odd_image)).max() < 1e-4
    # New weights written to the same file are picked up, not served from the cache.
    nn.init.zeros_(model.body[-1].weight)
    nn.init.zeros_(model.body[-1].bias)
    save_model(model, weights)
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1))
    np.testing.assert_array_equal(denoise(odd_image, weights, device="cpu"), odd_image)


def test_package_exposes_denoise() -> None:
    assert fundus_restore.denoise is denoise
    assert {"denoise", "upscale", "load_model"} <= set(dir(fundus_restore))  # the lazy ones listed too


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((10, 10), np.float32), "H×W×C"),
        (np.zeros((10, 10, 4), np.float32), "3-channel"),
        (np.zeros((0, 10, 3), np.float32), "empty"),
        (np.zeros((10, 10, 3), np.uint8), "dtype uint8"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_images_are_refused(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        denoise(image, random_dncnn(), device="cpu")


def test_flipped_and_read_only_views_are_taken_like_any_image(odd_image: np.ndarray) -> None:
    import warnings

    model = random_dncnn()
    read_only = odd_image.copy()
    read_only.flags.writeable = False
    views = {"mirrored": odd_image[:, ::-1], "BGR": odd_image[..., ::-1], "turned": np.rot90(odd_image),
             "read-only": read_only}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a read-only array it is given
        for name, view in views.items():
            expected = whole_image(model, view.copy())
            assert np.abs(denoise(view, model, tile=97, device="cpu") - expected).max() < 1e-4, name
    upscaler, flipped = random_srresnet(2), odd_image[:60, :70][::-1]
    assert np.abs(upscale(flipped, upscaler, device="cpu") - whole_image(upscaler, flipped.copy())).max() < 1e-4


def test_a_0_255_image_is_named_before_a_sigma_it_makes_look_wrong() -> None:
    with pytest.raises(ValueError, match=r"image values reach 200: expected the \[0, 1\] scale"):
        denoise(np.full((10, 10, 3), 200.0, np.float32), random_dncnn(), sigma=25, device="cpu")


@pytest.mark.parametrize("super_resolution", [False, True])
def test_a_grey_image_through_a_colour_model_is_the_mean_of_its_three_outputs(
    super_resolution: bool, odd_image: np.ndarray
) -> None:
    run, model = (upscale, random_srresnet(2)) if super_resolution else (denoise, random_dncnn())
    grey = odd_image[:90, :130, 1:2]
    restored = run(grey, model, device="cpu", tile=41)
    colour = run(np.repeat(grey, 3, axis=2), model, device="cpu", tile=41)
    assert restored.shape == (*colour.shape[:2], 1) and restored.dtype == np.float32
    np.testing.assert_allclose(restored[..., 0], colour.mean(axis=2), atol=1e-6)


def test_bad_settings_are_refused(odd_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="larger than twice the overlap"):
        denoise(odd_image, random_dncnn(), tile=10, overlap=5, device="cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        denoise(odd_image, random_dncnn(), precision="float8", device="cpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            denoise(odd_image, random_dncnn(), device="cuda")
    with pytest.raises(ValueError, match="expected 1×C×"):
        apply_tiled(lambda t: t[..., ::2, ::2], torch.zeros(1, 3, 20, 20), tile=8, overlap=1)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="CPU without native bfloat16")
def test_bfloat16_is_opt_in_and_returns_float32(odd_image: np.ndarray) -> None:
    model = random_dncnn()
    fast = denoise(odd_image, model, precision="bfloat16", device="cpu")
    exact = denoise(odd_image, model, device="cpu")
    assert fast.dtype == np.float32
    assert 0 < np.abs(fast - exact).max() < 0.05
    assert np.abs(exact - whole_image(model, odd_image)).max() < 1e-4


def test_large_photo_in_bounded_memory() -> None:
    # A HEI-MED-sized photo through tiles of 512: the peak RSS increase during denoise
    # (VmHWM after resetting it) stays far below what the whole image would need.
    script = textwrap.dedent(
        """
        import numpy as np, torch
        from pathlib import Path
        from fundus_restore.inference import denoise
        from fundus_restore.models import create_model

        torch.manual_seed(0)
        model = create_model("dncnn", channels=3, depth=3, width=32, batch_norm=False)
        image = np.random.default_rng(0).random((3504, 2336, 3), dtype=np.float32)

        def status_kib(field):
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
            return int(line.split()[1])

        Path("/proc/self/clear_refs").write_text("5")
        before = status_kib("VmRSS")
        restored = denoise(image, model, tile=512, device="cpu")
        assert restored.shape == image.shape
        print((status_kib("VmHWM") - before) / 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    increase_mib = float(result.stdout.strip().splitlines()[-1])
    assert increase_mib < 2048, f"peak RSS grew by {increase_mib:.0f} MiB"


@pytest.mark.shared
def test_fast_path_keeps_official_dncnn_psnr(dncnn_weights_dir) -> None:
    from skimage import data

    from fundus_restore.matconvnet import load_matconvnet_dncnn

    network = load_matconvnet_dncnn(dncnn_weights_dir / "GD_Color_Blind.mat")
    clean = data.retina()[400:656, 400:656].astype(np.float32) / 255
    noisy = add_gaussian_noise(clean, 25, seed=0)
    fast = denoise(noisy, network, tile=160, device="cpu")
    reference = whole_image(network, noisy)
    assert psnr(clean, fast) > psnr(clean, noisy) + 8  # the network does denoise
    assert abs(psnr(clean, fast) - psnr(clean, reference)) < 0.02


def random_srresnet(scale: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("srresnet", blocks=2, width=16, scale=scale)
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding them is exercised
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(("scale", "tile"), [(4, 29), (4, 64), (2, 41)])
def test_tiled_upscale_equals_whole_image(scale: int, tile: int) -> None:
    image = np.random.default_rng(3).random((61, 87, 3), dtype=np.float32)
    model = random_srresnet(scale)
    upscaled = upscale(image, model, tile=tile, device="cpu")
    assert upscaled.shape == (scale * 61, scale * 87, 3) and upscaled.dtype == np.float32
    assert np.abs(upscaled - whole_image(model, image)).max() < 1e-4


def dihedral_mean(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """The model's whole-image outputs for the 8 flips and quarter turns of ``image``, turned back and averaged."""
    outputs = []
    for turns in range(4):
        for mirror in (False, True):
            view = np.rot90(image, turns)
            view = view[:, ::-1] if mirror else view
            out = whole_image(model, np.ascontiguousarray(view))
            outputs.append(np.rot90(out[:, ::-1] if mirror else out, -turns))
    return np.mean(outputs, axis=0)


@pytest.mark.parametrize("tile", [50, 1000])
def test_ensemble_denoise_averages_flips_and_turns_and_tiles_exactly(odd_image: np.ndarray, tile: int) -> None:
    model = random_dncnn()
    image = odd_image[:90, :130]
    ensembled = denoise(image, model, tile=tile, device="cpu", ensemble=True)
    np.testing.assert_allclose(ensembled, dihedral_mean(model, image), atol=1e-4)
    assert np.abs(ensembled - denoise(image, model, device="cpu")).max() > 1e-2  # a random net is not symmetric


def test_ensemble_upscale_averages_flips_and_turns() -> None:
    image = np.random.default_rng(4).random((30, 41, 3), dtype=np.float32)
    model = random_srresnet(2)
    ensembled = upscale(image, model, tile=27, device="cpu", ensemble=True)
    assert ensembled.shape == (60, 82, 3)
    np.testing.assert_allclose(ensembled, dihedral_mean(model, image), atol=1e-4)


def test_upscale_from_a_file_matches_the_module(tmp_path, odd_image: np.ndarray) -> None:
    model = random_srresnet(2)
    weights = save_model(model, tmp_path / "sr.safetensors")
    crop = odd_image[:40, :50]
    np.testing.assert_allclose(upscale(crop, weights, device="cpu"), upscale(crop, model, device="cpu"), atol=1e-5)


def test_package_exposes_upscale() -> None:
    assert fundus_restore.upscale is upscale


def test_upscale_without_a_model_uses_the_bundled_x4_one_and_names_a_missing_scale(odd_image: np.ndarray) -> None:
    from fundus_restore.inference import default_upscale_model_name, load_upscaler

    crop = odd_image[:24, :30]
    assert upscale(crop, device="cpu").shape == (96, 120, 3)
    assert default_upscale_model_name() == default_upscale_model_name(4) == "srresnet-x4-retina"
    with pytest.raises(WeightsError, match="no x2 super-resolution model is bundled.*give a .safetensors file of one"):
        load_upscaler(scale=2)


def test_upscale_refuses_a_denoiser(odd_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not a super-resolution model"):
        upscale(odd_image, random_dncnn(), device="cpu")


def test_denoise_refuses_an_upscaler_and_the_vessel_segmenter(odd_image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="is not a denoiser: its task is 'upscale'"):
        denoise(odd_image, create_model("srresnet", blocks=1, width=8, scale=2), device="cpu")
    with pytest.raises(ValueError, match="vessels-unet is not a denoiser: its task is 'segment-vessels'"):
        denoise(odd_image, "vessels-unet", device="cpu")


def test_noise_level_mismatch_speaks_only_outside_the_trained_range() -> None:
    grey = np.full((64, 64, 3), 0.5, np.float32)
    noisy = {sigma: add_gaussian_noise(grey, sigma, seed=0) for sigma in (10, 25, 50)}
    model = random_dncnn()
    model.name = "m"
    assert noise_level_mismatch(noisy[10], model) is None  # no card: nothing to compare with
    model.noise_range = (25.0, 25.0)
    assert noise_level_mismatch(noisy[25], model) is None
    assert "smooth away" in noise_level_mismatch(noisy[10], model)
    assert "noise may remain" in noise_level_mismatch(noisy[50], model)
    assert "sigma 25 m was trained on" in noise_level_mismatch(noisy[10], model)
    # It names the best bundled denoiser trained on a range that holds the photo's level.
    assert "the bundled resunet-retina-green-blind suits it" in noise_level_mismatch(noisy[50], model)
    model.noise_range = (0.0, 55.0)  # blind
    assert all(noise_level_mismatch(image, model) is None for image in (grey, *noisy.values()))
    # Trained on a range already, and no bundled denoiser trained higher: that is what it says.
    very_noisy = add_gaussian_noise(grey, 150, seed=0)
    assert noise_level_mismatch(very_noisy, model).endswith("noise may remain; no bundled denoiser was trained at this level")
    # Only the masked part counts: noise outside the mask is not seen.
    half = noisy[10].copy()
    half[:, 32:] = noisy[50][:, 32:]
    model.noise_range = (10.0, 10.0)
    mask = np.zeros((64, 64), bool)
    mask[:, :32] = True
    assert noise_level_mismatch(half, model, mask) is None and noise_level_mismatch(half, model) is not None


def test_noise_level_mismatch_tells_an_upscaler_to_denoise_first() -> None:
    torch.manual_seed(0)
    upscaler = create_model("srresnet", blocks=1, width=8, scale=2)
    upscaler.noise_range = (0.0, 0.0)
    grey = np.full((32, 32, 3), 0.5, np.float32)
    assert noise_level_mismatch(grey, upscaler) is None
    noisy = add_gaussian_noise(grey, 10, seed=0)
    assert "trained on noise-free input" in noise_level_mismatch(noisy, upscaler)
    assert "denoise first" in noise_level_mismatch(noisy, upscaler)
    upscaler.lr_denoiser = "dn"  # trained behind a denoiser, it names it
    assert "trained on dn's outputs" in noise_level_mismatch(noisy, upscaler)
