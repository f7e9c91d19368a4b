from __future__ import annotations

import pytest
import torch
from torch import nn

from fundus_restore.inference import apply_tiled, default_overlap
from fundus_restore.models import create_model, list_architectures
from fundus_restore.models.srresnet import SRResNet, upsampler_x2


def small_srresnet(scale: int = 4, batch_norm: bool = True, blocks: int = 2) -> SRResNet:
    torch.manual_seed(0)
    model = create_model("srresnet", blocks=blocks, width=8, scale=scale, batch_norm=batch_norm)
    with torch.no_grad():  # non-trivial statistics and slopes, so that folding and tiling are really tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.3, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.5)
    return model.eval()


def test_paper_layout_by_name() -> None:
    assert "srresnet" in list_architectures()
    model = create_model("srresnet")
    assert isinstance(model, SRResNet) and model.architecture == "srresnet"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # head + 16 blocks × 2 + fuse + 2 upsamplers + tail
    assert len(convs) == 1 + 32 + 1 + 2 + 1
    assert convs[0].kernel_size == (9, 9) and convs[-1].kernel_size == (9, 9)
    assert [c.out_channels for c in convs[-3:-1]] == [256, 256]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 33
    assert sum(isinstance(m, nn.PixelShuffle) for m in model.modules()) == 2
    assert model.config == {"channels": 3, "blocks": 16, "width": 64, "scale": 4, "batch_norm": True, "bicubic_skip": False}


@pytest.mark.parametrize("scale", [2, 4])
def test_output_is_scale_times_larger(scale: int) -> None:
    model = small_srresnet(scale=scale)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 7, 5)).shape == (2, 3, 7 * scale, 5 * scale)
        assert model(torch.rand(1, 3, 6, 6), sigma=0.1).shape == (1, 3, 6 * scale, 6 * scale)


def test_bad_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="2 or 4"):
        create_model("srresnet", scale=3)


def test_untrained_upsampler_has_no_checkerboard() -> None:
    # ICNR: every 2×2 output block of one upsampler is constant.
    upsampler = upsampler_x2(4)
    with torch.no_grad():
        out = upsampler(torch.randn(1, 4, 5, 6))
    torch.testing.assert_close(out, out[:, :, ::2, ::2].repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_folded_batch_norm_gives_the_same_output() -> None:
    model = small_srresnet()
    folded = model.fold_batch_norm()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.config["batch_norm"] is False
    x = torch.rand(2, 3, 10, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [2, 4])
def test_receptive_field_radius_is_tight(scale: int) -> None:
    """The input pixels any output pixel depends on lie within the stated radius, and some reach it."""
    model = small_srresnet(scale=scale, batch_norm=False)
    radius = model.receptive_field_radius
    size = 2 * radius + 5
    centre = size // 2
    reach = 0
    for sub_row in range(scale):
        for sub_column in range(scale):
            x = torch.rand(1, 3, size, size, requires_grad=True)
            model(x)[0, :, scale * centre + sub_row, scale * centre + sub_column].sum().backward()
            rows, columns = torch.nonzero(x.grad.abs().sum(dim=(0, 1)), as_tuple=True)
            reach = max(reach, int((rows - centre).abs().max()), int((columns - centre).abs().max()))
    assert reach == radius == default_overlap(model)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_tiled_equals_whole_image_at_the_receptive_field_overlap(batch_norm: bool) -> None:
    model = small_srresnet(batch_norm=batch_norm)
    image = torch.rand(1, 3, 61, 47)
    with torch.no_grad():
        whole = model(image)
    overlap = model.receptive_field_radius
    tiled = apply_tiled(model, image, tile=2 * overlap + 8, overlap=overlap, scale=4)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() < 1e-4


def test_bicubic_skip_starts_as_bicubic_and_tiles_and_folds_exactly() -> None:
    model = create_model("srresnet", scale=4, blocks=2, width=8, bicubic_skip=True).eval()
    image = torch.rand(1, 3, 40, 33)
    with torch.no_grad():
        bicubic = nn.functional.interpolate(image, scale_factor=4, mode="bicubic", align_corners=False)
        torch.testing.assert_close(model(image), bicubic)
        for parameter in model.tail.parameters():  # as if trained: the network's detail is added
            parameter.normal_(0, 0.01)
        whole = model(image)
        overlap = model.receptive_field_radius
        tiled = apply_tiled(model, image, tile=2 * overlap + 8, overlap=overlap, scale=4)
        assert (tiled - whole).abs().max() < 1e-4
        folded = model.fold_batch_norm()
        assert folded.config["bicubic_skip"] is True
        torch.testing.assert_close(folded(image), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_more_blocks_keep_the_function_and_train(batch_norm: bool) -> None:
    model = small_srresnet(batch_norm=batch_norm, blocks=2)
    image = torch.rand(2, 3, 12, 10)
    deeper = model.with_config({"blocks": 4}).eval()
    assert deeper.config == {**model.config, "blocks": 4} and len(deeper.blocks) == 4
    with torch.no_grad():
        torch.testing.assert_close(deeper(image), model(image))
    # The new blocks start as the identity but are not stuck there: one step moves them.
    deeper.train()
    deeper(image).square().mean().backward()
    last = deeper.blocks[3].body[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    for refused in ({"blocks": 1}, {"width": 16}, {"blocks": 4, "scale": 2}):
        with pytest.raises(ValueError, match="would change the function"):
            model.with_config(refused)
