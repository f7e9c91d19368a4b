"""Super-resolution on whole photographs: where inside the field of view the gain over bicubic lies.

    python scripts/sr_regions.py [--shared ../shared] [--method srresnet-x4-retina ...] [--erode 0 8 32 128]

The tables of `docs/results.md` score HEI-MED's central 1024² crops. On a whole
photograph the field of view also holds its rim, where the retina meets the black
surround: a sharp edge that bicubic blurs and an SR model restores. This script
shrinks each of the 10 HEI-MED validation photographs ×4 (antialiased bicubic, no
noise: the SR tables' paper protocol), upscales it by bicubic and by each model, and
prints the mean PSNR over the photographs inside the field of view eroded by each
``--erode`` distance (0: the whole FOV) and in the rim band between the FOV's edge and
``--rim`` pixels inside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from fundus_restore.degrade import bicubic_upsample, downsample
from fundus_restore.evaluate import load_clean
from fundus_restore.inference import upscale
from fundus_restore.metrics import psnr
from tables import heimed_validation

SCALE = 4


def regions(mask: np.ndarray, erosions: list[int], rim: int) -> dict[str, np.ndarray]:
    """The FOV eroded by each distance, and the rim band of width ``rim``."""
    eroded = {e: binary_erosion(mask, iterations=e) if e else mask for e in erosions}
    found = {f"FOV eroded {e} px": m for e, m in eroded.items()}
    found[f"rim band (outer {rim} px)"] = mask & ~binary_erosion(mask, iterations=rim)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--method", action="append", help="SR model(s) besides bicubic (default: srresnet-x4-retina).")
    parser.add_argument("--erode", type=int, nargs="+", default=[0, 8, 32, 128])
    parser.add_argument("--rim", type=int, default=32)
    args = parser.parse_args()
    methods = ["bicubic", *(args.method or ["srresnet-x4-retina"])]
    scores: dict[tuple[str, str], list[float]] = {}
    for path in heimed_validation(args.shared / "data" / "HEI-MED"):
        clean, mask = load_clean(path)[:2]
        low = downsample(clean, SCALE)
        height, width = low.shape[0] * SCALE, low.shape[1] * SCALE
        clean, mask = clean[:height, :width], mask[:height, :width]
        areas = regions(mask, args.erode, args.rim)
        for method in methods:
            restored = bicubic_upsample(low, SCALE) if method == "bicubic" else upscale(low, method)
            for name, area in areas.items():
                scores.setdefault((method, name), []).append(float(psnr(clean, restored, mask=area)))
        print(f"{path.name}: " + ", ".join(f"{m} {n} {v[-1]:.2f}" for (m, n), v in scores.items()), flush=True)
    names = list(dict.fromkeys(name for _, name in scores))
    print(f"\nHEI-MED validation, whole photographs, SR x{SCALE}: mean PSNR (dB)")
    print("| region | " + " | ".join(methods) + " | gain of " + " / ".join(methods[1:]) + " |")
    print("|---" * (len(methods) + 2) + "|")
    for name in names:
        means = [float(np.mean(scores[(m, name)])) for m in methods]
        gains = " / ".join(f"{mean - means[0]:+.2f}" for mean in means[1:])
        print(f"| {name} | " + " | ".join(f"{mean:.2f}" for mean in means) + f" | {gains} |")


if __name__ == "__main__":
    main()
