"""fundus-restore: restore noisy, low-resolution colour fundus photographs
without losing thin vessels and without inventing new ones."""

from fundus_restore.pretrained import list_models, load_model, save_model

__version__ = "0.1.0"

__all__ = ["__version__", "denoise", "list_models", "load_model", "save_model", "upscale"]


def __getattr__(name: str):
    # Inference pulls in more of torch; import it only when asked for.
    if name in ("denoise", "upscale"):
        from fundus_restore import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'fundus_restore' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Tab completion and help() list the lazy functions too.
    return sorted({*globals(), "denoise", "upscale"})
