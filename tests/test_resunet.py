from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.inference import _tile_spans, denoise, estimated_noise_level
from fundus_restore.models import create_model, list_architectures
from fundus_restore.models.resunet import ResUNet
from fundus_restore.pretrained import load_model, save_model
from test_inference import whole_image as whole


def small_resunet(widths: tuple[int, ...] = (4, 8, 8), blocks: int = 1) -> ResUNet:
    """A random residual U-Net whose last convolution is not zero (an untrained one is the identity)."""
    torch.manual_seed(0)
    model = create_model("resunet", widths=widths, blocks=blocks)
    with torch.no_grad():
        model.tail.weight.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def odd_image() -> np.ndarray:
    return np.random.default_rng(2).random((101, 133, 3), dtype=np.float32)


def test_layout_by_name_and_an_untrained_network_is_the_identity(odd_image: np.ndarray) -> None:
    assert "resunet" in list_architectures()
    model = create_model("resunet").eval()
    assert model.config == {"channels": 3, "widths": [32, 64, 128, 256], "blocks": 2}
    assert model.factor == model.tile_alignment == 8
    strided = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.stride == (2, 2)]
    assert len(strided) == 6  # three levels down, three up
    np.testing.assert_array_equal(whole(model, odd_image[:37, :45]), odd_image[:37, :45])


def test_any_size_keeps_its_shape(odd_image: np.ndarray) -> None:
    model = small_resunet()
    for height, width in ((1, 1), (7, 13), (101, 133)):
        assert whole(model, odd_image[:height, :width]).shape == (height, width, 3)


def test_receptive_field_radius_bounds_the_reach_of_one_pixel() -> None:
    model = small_resunet(widths=(4, 8, 8, 8), blocks=2)
    image = torch.rand(1, 3, 320, 320)
    changed = image.clone()
    changed[..., 160, 160] += 1.0
    with torch.no_grad():
        difference = (model(changed) - model(image)).abs().amax(dim=(0, 1))
    rows, columns = torch.nonzero(difference > 0, as_tuple=True)
    reach = int(max((rows - 160).abs().max(), (columns - 160).abs().max()))
    assert 40 < reach <= model.receptive_field_radius  # far wider than DnCNN-20's 20 pixels


def test_aligned_tile_spans_start_and_stop_on_the_grid() -> None:
    for length in (101, 1696, 2001):
        spans = _tile_spans(length, 300, 40, alignment=8)
        assert spans[0][2] == 0 and spans[-1][3] == length
        for start, stop, keep_start, keep_stop in spans:
            assert start % 8 == 0 and (length - stop) % 8 == 0 and stop - start <= 300
            assert keep_start == 0 or keep_start >= start + 40
            assert keep_stop == length or keep_stop <= stop - 40


@pytest.mark.parametrize("ensemble", [False, True])
def test_tiled_denoise_equals_whole_image(odd_image: np.ndarray, ensemble: bool) -> None:
    model = small_resunet()  # 3 levels: radius 30, tiles on multiples of 4
    image = np.concatenate([odd_image, odd_image[:, ::-1]], axis=1)[:, :203]
    single = denoise(image, model, device="cpu", ensemble=ensemble)
    assert np.abs(single - image).max() > 1e-2  # the network does something
    for tile in (80, 111):
        tiled = denoise(image, model, tile=tile, device="cpu", ensemble=ensemble)
        np.testing.assert_allclose(tiled, single, atol=1e-5)
    # Unaligned tiles of the same overlap leave seams: the alignment is what makes it exact.
    unaligned = copy.deepcopy(model)
    unaligned.tile_alignment = 1
    assert np.abs(denoise(image, unaligned, tile=111, device="cpu") - single).max() > 1e-4


def test_weights_round_trip(tmp_path, odd_image: np.ndarray) -> None:
    model = small_resunet()
    loaded = load_model(save_model(model, tmp_path / "resunet.safetensors"))
    assert isinstance(loaded, ResUNet) and loaded.config == model.config
    np.testing.assert_array_equal(whole(loaded.eval(), odd_image), whole(model, odd_image))


def test_told_the_noise_level_it_starts_as_the_blind_network_and_then_uses_it(odd_image: np.ndarray) -> None:
    blind = small_resunet()
    told = blind.with_config({"noise_map": True}).eval()
    assert told.needs_noise_level and not blind.needs_noise_level
    assert told.config == {**blind.config, "noise_map": True} and told.head.in_channels == 4
    x = torch.from_numpy(odd_image.transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        # Its map's weights start at zero: the same function (to rounding, in another memory layout).
        np.testing.assert_allclose(told(x, 0.1).numpy(), blind(x).numpy(), rtol=0, atol=1e-6)
        told.head.weight[:, 3:].normal_(0, 0.1)
        quiet, noisy = told(x, 5 / 255), told(x, 50 / 255)
        assert (quiet - noisy).abs().max() > 1e-3
        # One level per image of a batch, each as if alone.
        pair = told(torch.cat([x, x]), torch.tensor([5 / 255, 50 / 255]))
        torch.testing.assert_close(pair, torch.cat([quiet, noisy]))
    with pytest.raises(ValueError, match="give sigma"):
        told(x)
    with pytest.raises(ValueError, match="2 levels for 1 images"):
        told(x, torch.tensor([0.1, 0.2]))
    for refused, model in (({"noise_map": True, "blocks": 2}, blind), ({"noise_map": False}, told)):
        with pytest.raises(ValueError, match="would change the function"):
            model.with_config(refused)
    assert told.with_config({"noise_map": True}).config == told.config  # asking for what it has changes nothing


@pytest.mark.parametrize("noise_map", [False, True])
def test_made_grey_it_is_the_mean_of_the_colour_networks_outputs_on_the_grey_level(
    odd_image: np.ndarray, noise_map: bool
) -> None:
    colour = small_resunet()
    if noise_map:
        colour = colour.with_config({"noise_map": True}).eval()
        with torch.no_grad():
            colour.head.weight[:, 3:].normal_(0, 0.1)  # so that the level matters
    grey = colour.with_config({"channels": 1}).eval()
    assert grey.config == {**colour.config, "channels": 1} and grey.head.in_channels == 1 + noise_map
    x = torch.from_numpy(odd_image[..., 1:2].transpose(2, 0, 1)[None].copy())
    sigma = 0.1 if noise_map else None
    with torch.no_grad():
        expected = colour(x.repeat(1, 3, 1, 1), sigma).mean(dim=1, keepdim=True)
        np.testing.assert_allclose(grey(x, sigma).numpy(), expected.numpy(), rtol=0, atol=1e-6)
    # It is what denoise makes of a grey image through the colour network.
    np.testing.assert_allclose(denoise(odd_image[..., 1:2], grey, device="cpu", sigma=sigma),
                               denoise(odd_image[..., 1:2], colour, device="cpu", sigma=sigma), rtol=0, atol=1e-6)
    # Only colour to grey keeps the function: not to two channels, nor back to colour.
    for refused, model in (({"channels": 2}, colour), ({"channels": 3}, grey)):
        with pytest.raises(ValueError, match="would change the function"):
            model.with_config(refused)
    both = small_resunet().with_config({"channels": 1, "noise_map": True})
    assert both.head.in_channels == 2 and not both.head.weight[:, 1:].any()


def test_told_the_noise_level_its_weights_round_trip_and_denoise_estimates_the_level(tmp_path) -> None:
    told = small_resunet().with_config({"noise_map": True}).eval()
    with torch.no_grad():
        told.head.weight[:, 3:].normal_(0, 0.1)
    loaded = load_model(save_model(told, tmp_path / "told.safetensors"))
    assert loaded.needs_noise_level and loaded.config == told.config
    rows, columns = np.mgrid[0:101, 0:133] / 133
    smooth = np.dstack([0.3 + 0.4 * rows, 0.5 + 0.2 * columns, 0.4 * (rows + columns)]).astype(np.float32)
    noisy = add_gaussian_noise(smooth, 20, seed=0)
    level = estimated_noise_level(noisy)
    assert 18 / 255 < level < 22 / 255
    estimated = denoise(noisy, loaded, device="cpu")
    np.testing.assert_array_equal(estimated, denoise(noisy, loaded, sigma=level, device="cpu"))
    assert np.abs(estimated - denoise(noisy, loaded, sigma=5 / 255, device="cpu")).max() > 1e-3
    np.testing.assert_allclose(denoise(noisy, loaded, tile=80, device="cpu"), estimated, atol=1e-5)
