"""Registry of restoration architectures, one module per architecture.

Every denoiser follows one contract: ``forward(x, sigma=None) -> restored``, with
``x`` a float tensor N×C×H×W on the [0, 1] scale (noisy values may lie outside it)
and ``sigma`` the noise level on the same scale for models that take it (blind
models ignore it). Models are built by name so that a weights file only needs to
record ``architecture`` and its keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(
    name: str, task: str = "denoise"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class decorator that makes an architecture buildable by ``name``.

    The class gets ``architecture = name`` and ``task`` (denoise, upscale, segment-vessels
    or discriminate: what its output is, where no model card says); its instances must
    keep their constructor keyword arguments in ``self.config`` so that weights files can
    rebuild them.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is registered twice")
        builder.architecture = name  # type: ignore[attr-defined]
        builder.task = task  # type: ignore[attr-defined]
        _ARCHITECTURES[name] = builder
        return builder

    return decorate


def is_whole_number(value: Any) -> bool:
    """An int read from JSON or YAML, not a boolean (True is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The size arguments the architectures share: a zero or fractional one builds a network
# that fails only when run (a 0-channel convolution), or, negative, fails inside torch.
SIZE_ARGUMENTS = ("channels", "depth", "width", "widths", "blocks", "scale")


def create_model(architecture: str, **kwargs: Any) -> nn.Module:
    """Build an untrained model of a registered architecture; its size arguments
    (``SIZE_ARGUMENTS``) must be positive whole numbers (a list of them for ``widths``)."""
    try:
        builder = _ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r}; known: {known}") from None
    for name in SIZE_ARGUMENTS:
        value = kwargs.get(name, 1)
        sizes = value if isinstance(value, (list, tuple)) else [value]
        if not sizes or not all(is_whole_number(size) and size > 0 for size in sizes):
            raise ValueError(f"{architecture}: {name} must be {'a list of ' if name == 'widths' else 'a '}"
                             f"positive whole number{'s' if name == 'widths' else ''}, got {value!r}")
    return builder(**kwargs)


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


# Importing the modules registers their architectures.
from fundus_restore.models import autoencoder  # noqa: E402,F401
from fundus_restore.models import cbm3d  # noqa: E402,F401
from fundus_restore.models import dncnn  # noqa: E402,F401
from fundus_restore.models import srresnet  # noqa: E402,F401
from fundus_restore.models import discriminator  # noqa: E402,F401
from fundus_restore.models import unet  # noqa: E402,F401
from fundus_restore.models import resunet  # noqa: E402,F401
