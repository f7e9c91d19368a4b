from __future__ import annotations

import pytest
import torch

from fundus_restore.models import create_model, list_architectures
from fundus_restore.models.dncnn import DnCNN


def _randomise_batch_norm(model: DnCNN) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor, low, high in (
                (module.running_mean, -0.2, 0.2),
                (module.running_var, 0.3, 2.0),
                (module.weight.data, 0.5, 1.5),
                (module.bias.data, -0.1, 0.1),
            ):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


def test_registry_builds_dncnn_by_name():
    assert "dncnn" in list_architectures()
    model = create_model("dncnn", channels=1, depth=17, width=64)
    assert isinstance(model, DnCNN) and model.architecture == "dncnn"
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15
    assert convs[0].in_channels == 1 and convs[-1].out_channels == 1


def test_unknown_architecture_names_the_known_ones():
    with pytest.raises(ValueError, match="dncnn"):
        create_model("no-such-net")


@pytest.mark.parametrize(
    ("architecture", "sizes", "problem"),
    [("dncnn", {"width": 0}, "width must be a positive whole number, got 0"),
     ("dncnn", {"channels": -3}, "channels must be a positive whole number, got -3"),
     ("srresnet", {"scale": 2.0}, "scale must be a positive whole number, got 2.0"),
     ("resunet", {"widths": [0, 0]}, r"widths must be a list of positive whole numbers, got \[0, 0\]"),
     ("srgan-discriminator", {"width": True}, "width must be a positive whole number, got True")],
)
def test_a_size_that_builds_no_runnable_network_is_refused(architecture: str, sizes: dict, problem: str):
    # Built, such a network failed only when run (a 0-channel convolution), or inside torch.
    with pytest.raises(ValueError, match=f"^{architecture}: {problem}$"):
        create_model(architecture, **sizes)


def test_network_predicts_the_noise_and_subtracts_it():
    model = create_model("dncnn", depth=3, width=4, batch_norm=False).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    model.body[-1].bias.data.fill_(0.1)  # predicted "noise": a constant 0.1
    x = torch.rand(1, 3, 9, 11)
    torch.testing.assert_close(model(x), x - 0.1)
    torch.testing.assert_close(model(x, sigma=25 / 255), x - 0.1)  # blind: sigma ignored


def test_folded_batch_norm_gives_the_same_output():
    model = create_model("dncnn", depth=6, width=16).eval()
    _randomise_batch_norm(model)
    folded = model.fold_batch_norm()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert folded.config["batch_norm"] is False
    x = torch.rand(2, 3, 24, 20) * 1.4 - 0.2  # noisy images lie outside [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_too_shallow_is_refused():
    with pytest.raises(ValueError, match="at least 3"):
        create_model("dncnn", depth=2)


def test_range_inputs_start_as_the_same_function() -> None:
    model = create_model("dncnn", depth=5, width=16, batch_norm=False).eval()
    widened = model.with_range_inputs()
    assert widened.config["range_inputs"] and not widened.training
    assert widened.body[0].in_channels == 9 and widened.with_range_inputs() is widened
    x = torch.rand(2, 3, 24, 20) * 1.6 - 0.3  # float noise leaves [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(widened(x), model(x), atol=1e-5, rtol=1e-5)


def test_range_gain_rescales_trained_range_weights_to_the_same_function() -> None:
    model = create_model("dncnn", depth=4, width=8, batch_norm=False, range_inputs=True).eval()
    with torch.no_grad():
        model.body[0].weight[:, 3:].normal_(std=0.1)
    amplified = model.with_range_inputs(gain=30.0)
    assert amplified.config["range_gain"] == 30.0 and amplified.with_range_inputs() is amplified
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.3
    with torch.no_grad():
        torch.testing.assert_close(amplified(x), model(x), atol=1e-5, rtol=1e-5)
    # The gain is the range weights' learning-rate multiplier: they hold 1/30 of the value.
    torch.testing.assert_close(amplified.body[0].weight[:, 3:] * 30, model.body[0].weight[:, 3:])


def test_range_inputs_see_only_what_leaves_zero_to_one() -> None:
    model = create_model("dncnn", depth=4, width=8, batch_norm=False, range_inputs=True).eval()
    inside = torch.rand(1, 3, 16, 16)
    outside = inside.clone()
    outside[..., :4, :4] = 1.2
    outside[..., -4:, -4:] = -0.2
    with torch.no_grad():
        before_inside, before_outside = model(inside), model(outside)
        model.body[0].weight[:, 3:] += 0.5  # only the range inputs' weights change
        # A clipped image (every real file) gives them nothing to act on; float noise does.
        torch.testing.assert_close(model(inside), before_inside)
        assert not torch.allclose(model(outside), before_outside)
