"""Field-of-view detection on noisy photographs: IoU of each noisy photo's mask against
its clean photo's, per noise level.

    python scripts/check_fov_noise.py [--shared ../shared] [--sigma 25 50]

DRIVE test and every HEI-MED photograph, noised (seed 0, clipped to [0, 1] as every
noisy file is). Prints, per set and sigma, the mean and least IoU and the photos below
0.97. The masks ``evaluate`` and training use are the clean photos'; a noisy photo's
mask is what ``denoise`` estimates the noise level inside.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.fov import fov_mask
from fundus_restore.io import list_images, read_image

LOW_IOU = 0.97


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--sigma", type=float, nargs="+", default=[25.0, 50.0])
    args = parser.parse_args()
    data = args.shared / "data"
    sets = {"DRIVE test": data / "DRIVE" / "test" / "images", "HEI-MED": data / "HEI-MED"}
    for name, folder in sets.items():
        scores: dict[float, list[tuple[float, str]]] = {sigma: [] for sigma in args.sigma}
        for path in list_images([folder]):
            clean = read_image(path)
            reference = fov_mask(clean)
            for sigma in args.sigma:
                mask = fov_mask(add_gaussian_noise(clean, sigma, seed=0, clip=True))
                scores[sigma].append((float((mask & reference).sum() / (mask | reference).sum()), path.name))
        for sigma, found in scores.items():
            low = ", ".join(f"{photo} {iou:.3f}" for iou, photo in sorted(found) if iou < LOW_IOU) or "none"
            print(f"{name}, sigma {sigma:g}: {len(found)} photos, mean IoU {np.mean([iou for iou, _ in found]):.4f}, "
                  f"least {min(found)[0]:.4f}; below {LOW_IOU}: {low}")


if __name__ == "__main__":
    main()
