from __future__ import annotations

import torch

from fundus_restore.models import create_model, list_architectures
from fundus_restore.models.autoencoder import SkipAutoencoder
from fundus_restore.pretrained import load_model, save_model


def test_registered_and_keeps_its_config() -> None:
    assert "autoencoder" in list_architectures()
    model = create_model("autoencoder", skip_weights=True)
    assert isinstance(model, SkipAutoencoder)
    assert model.config == {"channels": 3, "skip_weights": True}


def test_layers_match_the_paper() -> None:
    model = SkipAutoencoder()
    assert [conv.out_channels for conv in model.encoder] == [16, 32, 64, 128]
    assert [conv.out_channels for conv in model.decoder] == [64, 32, 16, 3]
    for conv in [*model.encoder, *model.decoder]:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)


def test_output_is_an_image_of_the_input_size() -> None:
    x = torch.rand(2, 3, 21, 30)
    for model in (SkipAutoencoder(), SkipAutoencoder(skip_weights=True), SkipAutoencoder(channels=1)):
        channels = model.config["channels"]
        assert model(x[:, :channels], sigma=0.1).shape == (2, channels, 21, 30)


def test_skip_weights_are_trainable_and_start_as_plain_skips() -> None:
    plain, weighted = SkipAutoencoder(), SkipAutoencoder(skip_weights=True)
    weighted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(weighted(x), plain(x))  # scales start at 1

    weighted(x).square().mean().backward()
    scales = dict(weighted.skip_scales.named_parameters())
    assert set(scales) == {"0", "2"}  # decoder layers 1 and 3 receive encoder layers 3 and 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in scales.values())
    with torch.no_grad():
        for scale in scales.values():
            scale.zero_()
    assert not torch.allclose(weighted(x), plain(x))  # the scales do act on the skips


def test_round_trips_through_safetensors(tmp_path) -> None:
    model = SkipAutoencoder(skip_weights=True)
    with torch.no_grad():
        model.skip_scales["0"].fill_(0.5)
    path = save_model(model, tmp_path / "ae.safetensors")
    loaded = load_model(path)
    x = torch.rand(1, 3, 12, 12)
    torch.testing.assert_close(loaded(x), model.eval()(x))
