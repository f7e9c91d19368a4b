"""The paper's baseline: a convolutional autoencoder with symmetric skip connections.

Encoder: four 3×3 convolutions with 16, 32, 64 and 128 filters, ReLU, stride 1 and
no pooling, so every feature map keeps the image size. Decoder: four 3×3
convolutions with 64, 32, 16 and ``channels`` filters, the last one linear, whose
output is the restored image itself (not a noise estimate as in DnCNN).

Every other encoder layer is added to its mirror decoder layer (in the style of
RED-Net): encoder layer 1 (16 maps) to decoder layer 3, encoder layer 3 (64 maps)
to decoder layer 1, before their ReLU. These skips carry fine detail past the
bottleneck, but they also carry the noise of the first layers straight to the
output; with ``skip_weights=True`` each skip gets a trainable per-channel scale
(initialised to 1), the paper's fix for the residual noise left in the
background.

The decoder uses ordinary convolutions, not transposed ones: with stride 1 and
padding 1 a transposed 3×3 convolution is the same function as a convolution with
the kernel flipped and its in/out axes swapped, so it adds nothing but a slower
kernel (PyTorch runs it as the backward pass of a convolution).
"""

from __future__ import annotations

import torch
from torch import nn

from fundus_restore.models import register_architecture

ENCODER_WIDTHS = (16, 32, 64, 128)


def _conv(inputs: int, outputs: int) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, padding=1)


@register_architecture("autoencoder")
class SkipAutoencoder(nn.Module):
    def __init__(self, channels: int = 3, skip_weights: bool = False) -> None:
        super().__init__()
        self.config = {"channels": channels, "skip_weights": skip_weights}
        encoder_inputs = (channels, *ENCODER_WIDTHS[:-1])
        self.encoder = nn.ModuleList(_conv(i, o) for i, o in zip(encoder_inputs, ENCODER_WIDTHS))
        decoder_outputs = (*ENCODER_WIDTHS[-2::-1], channels)  # 64, 32, 16, channels
        decoder_inputs = (ENCODER_WIDTHS[-1], *decoder_outputs[:-1])
        self.decoder = nn.ModuleList(_conv(i, o) for i, o in zip(decoder_inputs, decoder_outputs))
        # Decoder layer index -> the encoder layer added to its output (mirror pairs 3↔1, 1↔3).
        self.skips = {0: 2, 2: 0}
        if skip_weights:
            self.skip_scales = nn.ParameterDict(
                {str(d): nn.Parameter(torch.ones(1, decoder_outputs[d], 1, 1)) for d in self.skips}
            )

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor | None = None) -> torch.Tensor:
        """Restore ``x`` (N×C×H×W). The autoencoder is blind: ``sigma`` is accepted and ignored."""
        features = []
        hidden = x
        for conv in self.encoder:
            hidden = torch.relu(conv(hidden))
            features.append(hidden)
        last = len(self.decoder) - 1
        for index, conv in enumerate(self.decoder):
            hidden = conv(hidden)
            if index in self.skips:
                skip = features[self.skips[index]]
                if self.config["skip_weights"]:
                    skip = skip * self.skip_scales[str(index)]
                hidden = hidden + skip
            if index < last:
                hidden = torch.relu(hidden)
        return hidden
