"""How well ``estimate_noise_sigma`` reads the noise level of retinal photographs.

    python scripts/noise_estimate.py [--shared ../shared]

Adds seeded noise (sigma 0, 5, 10, 25, 50; paper and camera protocols, image i gets
seed i) to the 20 DRIVE test photographs (whole field of view) and to the 10 HEI-MED
validation photographs (central 1024²), estimates sigma inside the field of view and
prints, per setting, the mean estimate and the largest deviation from the true sigma.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import PROTOCOLS, degrade_for_protocol, estimate_noise_sigma
from fundus_restore.evaluate import load_clean
from fundus_restore.io import list_images

from tables import heimed_validation

SIGMAS = (0.0, 5.0, 10.0, 25.0, 50.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    args = parser.parse_args()
    data = args.shared / "data"
    sets = {
        "DRIVE test": (list_images([data / "DRIVE/test/images"]), None),
        "HEI-MED validation": (heimed_validation(data / "HEI-MED"), 1024),
    }
    print("| set | protocol | " + " | ".join(f"σ {s:g}: mean, largest error" for s in SIGMAS) + " |")
    print("|---|---|" + "---|" * len(SIGMAS))
    for name, (paths, crop) in sets.items():
        photos = [load_clean(path, crop)[:2] for path in paths]
        for protocol in PROTOCOLS:
            cells = []
            for sigma in SIGMAS:
                estimates = np.array([
                    estimate_noise_sigma(degrade_for_protocol(clean, sigma, protocol, index), mask)
                    for index, (clean, mask) in enumerate(photos)
                ])  # fmt: skip
                cells.append(f"{estimates.mean():.2f}, {np.abs(estimates - sigma).max():.2f}")
            print(f"| {name} | {protocol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
