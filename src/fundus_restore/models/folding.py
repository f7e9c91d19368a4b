"""Batch norm folding shared by the architectures: for inference, a convolution
followed by batch norm (in eval mode) is one convolution with rescaled weights."""

from __future__ import annotations

import torch
from torch import nn


def fold_conv_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equivalent to ``conv`` then ``norm`` (in eval mode)."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    if norm is None:
        return weight, bias
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    return weight * scale[:, None, None, None], (bias - norm.running_mean) * scale + norm.bias.detach()


def _batch_norm_after_each_conv(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every convolution of ``model`` in module order, with the batch norm that follows it in its Sequential."""
    following: dict[nn.Conv2d, nn.BatchNorm2d] = {}
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            for current, after in zip(module, list(module)[1:]):
                if isinstance(current, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                    following[current] = after
    return [(m, following.get(m)) for m in model.modules() if isinstance(m, nn.Conv2d)]


def fold_into(source: nn.Module, folded: nn.Module) -> nn.Module:
    """Fill ``folded`` (the same architecture built without batch norm) from ``source``:
    every convolution with its batch norm folded in, every PReLU slope copied."""
    folded.to(next(source.parameters()).device)
    targets = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for target, (conv, norm) in zip(targets, _batch_norm_after_each_conv(source), strict=True):
            weight, bias = fold_conv_batch_norm(conv, norm)
            target.weight.copy_(weight)
            target.bias.copy_(bias)
        prelus = zip((m for m in folded.modules() if isinstance(m, nn.PReLU)),
                     (m for m in source.modules() if isinstance(m, nn.PReLU)), strict=True)  # fmt: skip
        for target, prelu in prelus:
            target.weight.copy_(prelu.weight)
    return folded.eval()
