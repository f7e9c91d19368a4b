from __future__ import annotations

import pytest
import torch
from torch import nn

from fundus_restore.models import create_model, list_architectures
from fundus_restore.models.discriminator import SRGANDiscriminator


def test_paper_layout_by_name() -> None:
    assert "srgan-discriminator" in list_architectures()
    model = create_model("srgan-discriminator")
    assert isinstance(model, SRGANDiscriminator) and model.architecture == "srgan-discriminator"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2, 1, 2]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 7  # all but the first conv
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(512 * 6 * 6, 1024), (1024, 1)]
    assert model.config == {"channels": 3, "width": 64}


@pytest.mark.parametrize("size", [24, 40, 96])
def test_any_patch_size_gives_one_logit_per_image(size: int) -> None:
    model = create_model("srgan-discriminator", width=8).eval()
    with torch.no_grad():
        logits = model(torch.rand(3, 3, size, size))
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_pooling_is_the_identity_on_the_papers_96_pixel_patches() -> None:
    model = create_model("srgan-discriminator", width=8).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape[-2:] == (6, 6)
        torch.testing.assert_close(model(x), model.classifier(features).squeeze(1))


def test_gradient_reaches_the_input() -> None:
    model = create_model("srgan-discriminator", width=8)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
