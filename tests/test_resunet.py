from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fundus_restore.inference import _tile_spans, denoise
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
