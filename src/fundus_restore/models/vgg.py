"""VGG19 convolutional features for perceptual losses, without torchvision.

``VGG19Features`` rebuilds torchvision's ``vgg19().features`` layer for layer (same
indices: conv, ReLU, ..., max-pool), so a torchvision ImageNet state dict loads into
it unchanged (keys ``features.N.weight`` / ``features.N.bias``; a bare
``features`` state dict with keys ``N.weight`` loads too, and the classifier's keys
are ignored). The network is cut after a named layer: ``relu5_4`` is SRGAN's VGG54,
``relu2_2`` its VGG22. Inputs are RGB on [0, 1]; the ImageNet normalisation is done
inside.

The weights are not bundled (they are ImageNet's, 548 MB for the whole model): the
user gives a local file (``--vgg-weights``). Random VGG features are no perceptual
measure at all, so the extractor refuses to run until weights are loaded.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fundus_restore.pretrained import WeightsError

# torchvision's configuration "E": filter counts, "M" a 2×2 max-pool.
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_layer_names() -> list[str]:
    """Names of the layers of ``vgg19().features`` in index order: conv1_1, relu1_1, ..., pool5."""
    names = []
    block, index = 1, 1
    for entry in VGG19_CONFIG:
        if entry == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


def _vgg19_layers(last: int) -> list[nn.Module]:
    """The layers of ``vgg19().features`` up to index ``last`` included."""
    layers: list[nn.Module] = []
    channels = 3
    for entry in VGG19_CONFIG:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(entry), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(entry)
    return layers[: last + 1]


class VGG19Features(nn.Module):
    """Frozen VGG19 features up to ``layer`` of RGB images on [0, 1]; load weights with ``from_file``."""

    def __init__(self, layer: str = "relu5_4") -> None:
        super().__init__()
        names = vgg19_layer_names()
        if layer not in names:
            raise ValueError(f"unknown VGG19 layer {layer!r}; known: {', '.join(names)}")
        self.layer = layer
        self.features = nn.Sequential(*_vgg19_layers(names.index(layer)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.weights_loaded = False
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path, layer: str = "relu5_4") -> VGG19Features:
        """Load ImageNet VGG19 weights in torchvision's layout from a ``.pth`` or ``.safetensors`` file."""
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: no such VGG19 weights file")
        try:
            if path.suffix == ".safetensors":
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # weights_only refuses pickles that would run code: a whole pickled model rather than a state dict.
            raise WeightsError(f"{path}: not a plain state dict (torch.load with weights_only=True refused it)") from None
        except Exception as error:  # torch.load of a non-checkpoint raises whatever its parser meets (KeyError on text)
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            raise WeightsError(f"{path}: unreadable VGG19 weights file ({first_line})") from None
        if not isinstance(state, Mapping):
            raise WeightsError(f"{path}: expected a state dict, found a {type(state).__name__}")
        return cls.from_state_dict(state, layer, source=str(path))

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], layer: str = "relu5_4", source: str = "state dict"
    ) -> VGG19Features:
        """Build the extractor from a torchvision VGG19 (or ``vgg19().features``) state dict.

        Layers past the cut and the classifier are ignored; a missing or misshapen
        weight raises ``WeightsError`` naming ``source`` and the key.
        """
        model = cls(layer)
        features = {key.removeprefix("features."): value for key, value in state.items()}
        needed = model.features.state_dict()
        missing = [f"features.{key}" for key in needed if key not in features]
        if missing:
            raise WeightsError(
                f"{source}: not VGG19 weights in torchvision's layout: missing {', '.join(missing[:4])}"
                + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            )
        for key, expected in needed.items():
            found = features[key]
            if not isinstance(found, torch.Tensor) or found.shape != expected.shape:
                shape = tuple(found.shape) if isinstance(found, torch.Tensor) else type(found).__name__
                raise WeightsError(f"{source}: features.{key} has shape {shape}, VGG19 needs {tuple(expected.shape)}")
            if not torch.isfinite(found).all():
                raise WeightsError(f"{source}: NaN or infinite values in features.{key}")
        model.features.load_state_dict({key: features[key].float() for key in needed})
        model.weights_loaded = True
        return model

    def train(self, mode: bool = True) -> VGG19Features:
        """Stays in eval mode: the extractor is frozen, whatever the model around it does."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features at ``self.layer`` of ``x`` (N×3×H×W RGB on [0, 1])."""
        if not self.weights_loaded:
            raise WeightsError(
                "VGG19 features have random weights, which measure nothing perceptual: load ImageNet VGG19 "
                "weights in torchvision's layout with VGG19Features.from_file(PATH) (--vgg-weights)"
            )
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19 takes N×3×H×W RGB images, got shape {tuple(x.shape)}")
        return self.features((x - self.mean) / self.std)
