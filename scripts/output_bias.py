"""How far a restoration's output is biased, per channel, in float32 and under bfloat16.

    python scripts/output_bias.py [--shared ../shared] [--method NAME_OR_PATH ...]

Prints the mean error (output minus clean, on the 0–255 scale) per channel R, G, B:
  * on flat 192² patches at 0.1, 0.4 and 0.7 with sigma-25 noise (paper protocol,
    seed 0; the central 152² scored), in float32 and under bfloat16 autocast;
  * over the 10 HEI-MED validation photographs (central 1024², sigma 25, paper
    protocol, image i gets seed i), in float32, as ``denoise`` runs them.
``cdncnn-b`` is the official CDnCNN-B (``weights/dncnn/GD_Color_Blind.mat`` under
``--shared``); other names are bundled models or ``.safetensors`` files. An upscaler
(a model with a ``scale``) gets the same photographs and flat patches shrunk by that
scale with antialiased bicubic, without noise, as in the super-resolution tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fundus_restore.degrade import add_gaussian_noise, downsample, degrade_for_protocol
from fundus_restore.evaluate import load_clean
from fundus_restore.inference import denoise, upscale
from fundus_restore.matconvnet import load_matconvnet_dncnn
from fundus_restore.pretrained import load_model

from tables import heimed_validation

DEFAULT_METHODS = ["cdncnn-b", "dncnn-retina", "dncnn-retina-green", "dncnn-retina-green-range", "dncnn-retina-green-blind"]
LEVELS, SIGMA, FLAT_SIZE, BORDER = (0.1, 0.4, 0.7), 25.0, 192, 20


def flat_patch_bias(model: torch.nn.Module, level: float, bfloat16: bool) -> np.ndarray:
    """Mean error ×255 per channel on a flat patch at ``level`` (noisy, or shrunk for an
    upscaler), away from its border."""
    scale = model.config.get("scale", 1)
    clean = np.full((FLAT_SIZE // scale, FLAT_SIZE // scale, 3), level, np.float32)
    degraded = clean if scale > 1 else add_gaussian_noise(clean, SIGMA, seed=0)
    noisy = torch.from_numpy(degraded.transpose(2, 0, 1)[None].copy())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        restored = model(noisy).float()[0, :, BORDER:-BORDER, BORDER:-BORDER]
    return (restored.mean(dim=(1, 2)).numpy() - level) * 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--method", action="append", help=f"Denoisers (default: {', '.join(DEFAULT_METHODS)}).")
    args = parser.parse_args()
    official = args.shared / "weights/dncnn/GD_Color_Blind.mat"
    photos = [load_clean(path, 1024)[:2] for path in heimed_validation(args.shared / "data/HEI-MED")]
    noisy_photos = [degrade_for_protocol(clean, SIGMA, "paper", seed) for seed, (clean, _) in enumerate(photos)]

    def restored(model: torch.nn.Module, index: int) -> np.ndarray:
        scale = model.config.get("scale", 1)
        if scale == 1:
            return denoise(noisy_photos[index], model)
        return upscale(downsample(photos[index][0], scale), model=model)

    flat = [f"flat {level:g} {precision}" for precision in ("float32", "bfloat16") for level in LEVELS]
    print("mean error x255, R / G / B")
    print("| method | " + " | ".join(flat) + " | HEI-MED validation, float32 |")
    print("|---|" + "---|" * (len(flat) + 1))
    for name in args.method or DEFAULT_METHODS:
        model = (load_matconvnet_dncnn(official) if name == "cdncnn-b" else load_model(name)).eval()
        cells = [flat_patch_bias(model, level, precision == "bfloat16") for precision in ("float32", "bfloat16") for level in LEVELS]
        errors = [(restored(model, i) - clean)[mask].mean(axis=0) * 255 for i, (clean, mask) in enumerate(photos)]
        cells.append(np.mean(errors, axis=0))
        print(f"| {name} | " + " | ".join(" / ".join(f"{v:+.2f}" for v in cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
