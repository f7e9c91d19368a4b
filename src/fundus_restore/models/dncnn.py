"""DnCNN (Zhang et al., IEEE TIP 2017): residual learning of the noise.

``depth`` convolutions of 3×3: conv+ReLU, (depth-2)× conv+BN+ReLU, conv. The network
predicts the noise and the denoised image is ``x - noise``. The official blind
weights have 20 convolutions, the sigma-specific ones 17. Batch norm can be folded
into the preceding convolution for inference (the official MatConvNet files are
already folded: build with ``batch_norm=False`` to load them).

With ``range_inputs`` the network also sees the parts of its input above 1 and below 0.
Both are zero in every real file, which is clipped, and not under simulated float
noise. Near saturation the two need opposite corrections (clipping lowers the mean of
a noisy channel near 1), and a network that sees only the values has to guess which
one it is looking at: the fine-tunes lift bright red under float noise as if it were
clipped (``scripts/check_saturation.py``). ``range_gain`` multiplies those inputs: Adam
moves each weight by about the learning rate per step whatever its gradient's size, so a
gain of g is a g-times learning rate for their weights, which start at zero and stay
tiny at a fine-tune's rate (mean |w| 0.0013 against the image's 0.033 after 1800 steps
at 3e-5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fundus_restore.models import register_architecture
from fundus_restore.models.folding import fold_into


def above_one(x: torch.Tensor) -> torch.Tensor:
    return (x - 1).clamp(min=0)


def below_zero(x: torch.Tensor) -> torch.Tensor:
    return (-x).clamp(min=0)


# The range inputs, in this order after the image itself.
RANGE_PARTS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (above_one, below_zero)


@register_architecture("dncnn")
class DnCNN(nn.Module):
    def __init__(
        self,
        channels: int = 3,
        depth: int = 17,
        width: int = 64,
        batch_norm: bool = True,
        range_inputs: bool = False,
        range_gain: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"DnCNN needs at least 3 layers, got depth={depth}")
        self.config = {
            "channels": channels,
            "depth": depth,
            "width": width,
            "batch_norm": batch_norm,
            "range_inputs": range_inputs,
            "range_gain": range_gain,
        }
        inputs = channels * (1 + len(RANGE_PARTS)) if range_inputs else channels
        layers: list[nn.Module] = [nn.Conv2d(inputs, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            # A convolution followed by batch norm needs no bias of its own.
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width, eps=1e-4, momentum=0.05))
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x`` (N×C×H×W). DnCNN is blind: ``sigma`` is accepted and ignored."""
        if not self.config["range_inputs"]:
            return x - self.body(x)
        gain = self.config["range_gain"]
        return x - self.body(torch.cat([x, *(gain * part(x) for part in RANGE_PARTS)], dim=1))

    def with_range_inputs(self, gain: float | None = None) -> "DnCNN":
        """The same function on every input, with ``range_inputs`` and ``range_gain`` ``gain``
        (unchanged if None): new range weights start at zero, existing ones are rescaled."""
        gain = self.config["range_gain"] if gain is None else gain
        if self.config["range_inputs"] and gain == self.config["range_gain"]:
            return self
        state = self.state_dict()
        first = state["body.0.weight"]
        channels = self.config["channels"]
        if self.config["range_inputs"]:
            ranges = first[:, channels:] * (self.config["range_gain"] / gain)
        else:
            ranges = first.new_zeros(first.shape[0], channels * len(RANGE_PARTS), *first.shape[2:])
        state["body.0.weight"] = torch.cat([first[:, :channels], ranges], dim=1)
        widened = DnCNN(**{**self.config, "range_inputs": True, "range_gain": gain}).to(first.device)
        widened.load_state_dict(state)
        return widened.train(self.training)

    def with_config(self, changes: Mapping[str, Any]) -> "DnCNN":
        """The same function under the config ``changes``, for training from these weights.
        Only adding range inputs or changing their gain keeps it; anything else is refused."""
        keeps_function = set(changes) <= {"range_inputs", "range_gain"}
        if not (keeps_function and changes.get("range_inputs", self.config["range_inputs"])):
            raise ValueError(f"config {dict(changes)} would change the function of {self.config}")
        return self.with_range_inputs(changes.get("range_gain"))

    def fold_batch_norm(self) -> "DnCNN":
        """Return an equivalent inference model with every batch norm folded into its conv."""
        if not self.config["batch_norm"]:
            return self
        return fold_into(self, DnCNN(**{**self.config, "batch_norm": False}))
