from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fundus_restore.models.vgg import VGG19Features, vgg19_layer_names
from fundus_restore.pretrained import WeightsError

# torchvision's vgg19().features, written out: the indices of its convolutions and
# max-pools and each convolution's (in, out) channels.
TORCHVISION_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
TORCHVISION_POOL_INDICES = [4, 9, 18, 27, 36]
TORCHVISION_CONV_CHANNELS = [
    (3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 256),
    (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512),
]  # fmt: skip


def torchvision_state_dict(up_to_index: int = 36, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic state dict with torchvision's key names and shapes, plus a classifier key."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (inputs, outputs) in zip(TORCHVISION_CONV_INDICES, TORCHVISION_CONV_CHANNELS):
        if index <= up_to_index:
            state[f"features.{index}.weight"] = torch.randn(outputs, inputs, 3, 3, generator=generator) * 0.05
            state[f"features.{index}.bias"] = torch.randn(outputs, generator=generator) * 0.01
    state["classifier.6.weight"] = torch.zeros(1000, 4)  # not a feature: ignored
    return state


def test_layout_matches_torchvision_vgg19_features() -> None:
    layers = list(VGG19Features("pool5").features)
    assert len(layers) == 37
    assert [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)] == TORCHVISION_CONV_INDICES
    assert [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)] == TORCHVISION_POOL_INDICES
    assert all(isinstance(layers[i + 1], nn.ReLU) for i in TORCHVISION_CONV_INDICES)
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == TORCHVISION_CONV_CHANNELS
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)


def test_named_layers_cut_the_network() -> None:
    names = vgg19_layer_names()
    assert names.index("relu2_2") == 8 and names.index("relu5_4") == 35 and names[-1] == "pool5"
    assert len(VGG19Features("relu2_2").features) == 9
    assert len(VGG19Features("relu5_4").features) == 36
    with pytest.raises(ValueError, match="relu5_4"):
        VGG19Features("relu6_1")


def test_torchvision_state_dict_loads_and_normalises_inside() -> None:
    state = torchvision_state_dict()
    extractor = VGG19Features.from_state_dict(state, "relu1_1")
    x = torch.rand(1, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = torch.relu(nn.functional.conv2d((x - mean) / std, state["features.0.weight"], state["features.0.bias"], padding=1))
    torch.testing.assert_close(extractor(x), expected)
    assert VGG19Features.from_state_dict(state, "relu5_4")(torch.rand(1, 3, 32, 32)).shape == (1, 512, 2, 2)


def test_bare_features_state_dict_loads() -> None:
    bare = {k.removeprefix("features."): v for k, v in torchvision_state_dict(8).items() if k.startswith("features.")}
    extractor = VGG19Features.from_state_dict(bare, "relu2_2")
    torch.testing.assert_close(extractor.features[7].weight, bare["7.weight"])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_loads(tmp_path: Path, suffix: str) -> None:
    state = torchvision_state_dict(8)  # up to relu2_2: a small file
    path = tmp_path / f"vgg19{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    extractor = VGG19Features.from_file(path, "relu2_2")
    assert extractor.weights_loaded
    torch.testing.assert_close(extractor.features[2].weight, state["features.2.weight"])
    assert extractor(torch.rand(2, 3, 16, 16)).shape == (2, 128, 8, 8)


def test_random_weights_are_refused() -> None:
    with pytest.raises(WeightsError, match="random weights.*from_file"):
        VGG19Features("relu2_2")(torch.rand(1, 3, 8, 8))


def test_missing_keys_are_named() -> None:
    state = torchvision_state_dict(8)
    del state["features.7.weight"]
    with pytest.raises(WeightsError, match=r"mine\.pth: .*missing features\.7\.weight"):
        VGG19Features.from_state_dict(state, "relu2_2", source="mine.pth")


def test_wrong_shapes_are_named() -> None:
    state = torchvision_state_dict(8)
    state["features.5.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(WeightsError, match=r"features\.5\.weight has shape \(64, 64, 3, 3\), VGG19 needs \(128, 64, 3, 3\)"):
        VGG19Features.from_state_dict(state, "relu2_2")


def test_unreadable_or_absent_files_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "vgg.pth"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(WeightsError, match=r"vgg\.pth: not a plain state dict"):
        VGG19Features.from_file(garbage)
    junk = tmp_path / "junk.pth"
    junk.write_text("junk\n")  # torch.load's legacy parser meets a KeyError here
    with pytest.raises(WeightsError, match=r"junk\.pth: unreadable VGG19 weights file"):
        VGG19Features.from_file(junk)
    truncated = tmp_path / "vgg.safetensors"
    truncated.write_bytes(b"\x10\x00")
    with pytest.raises(WeightsError, match=r"vgg\.safetensors: unreadable"):
        VGG19Features.from_file(truncated)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(WeightsError, match=r"list\.pth: expected a state dict, found a list"):
        VGG19Features.from_file(not_a_dict)
    with pytest.raises(WeightsError, match=r"absent\.pth: no such"):
        VGG19Features.from_file(tmp_path / "absent.pth")


def test_extractor_stays_frozen_but_passes_gradients() -> None:
    extractor = VGG19Features.from_state_dict(torchvision_state_dict(8), "relu2_2")
    extractor.train()
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    extractor(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
