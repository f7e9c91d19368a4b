"""Where super-resolution's error lies: below or above the small image's Nyquist frequency.

    python scripts/sr_bands.py [--shared ../shared] [--scale 4] [--method NAME ...]

On the three sets of ``scripts/tables.py`` (DRIVE test, HEI-MED validation, the unseen
photo; paper protocol: antialiased bicubic shrink, no noise), prints per method the mean
PSNR of the whole crop and of its error below and above ``1 / (2 scale)`` cycles per pixel
(``fundus_restore.metrics.band_psnr``), and the **bound**: the PSNR of a method that
recovers everything below exactly and invents nothing above. A method that beats the
bound has synthesised detail above the small image's Nyquist frequency, right or wrong.
The HEI-MED and unseen crops lie inside the field of view; DRIVE's are the FOV's bounding
box, dark corners included, so its totals differ from the FOV PSNR of the tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import downsample
from fundus_restore.evaluate import build_methods, load_clean
from fundus_restore.io import list_images
from fundus_restore.metrics import band_psnr, psnr

from tables import heimed_validation, unseen_photo

DEFAULT_METHODS = ["bicubic", "srresnet-x4-retina", "srgan-x4-retina"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--method", action="append", help=f"Upscalers (default: {', '.join(DEFAULT_METHODS)}).")
    parser.add_argument("--out", type=Path, default=Path("out/table-sr"), help="Where the unseen photo is written.")
    args = parser.parse_args()
    data, cutoff = args.shared / "data", 1 / (2 * args.scale)
    methods = build_methods(args.method or DEFAULT_METHODS, scale=args.scale)
    sets = {
        "DRIVE test": (list_images([data / "DRIVE/test/images"]), None),
        "HEI-MED validation": (heimed_validation(data / "HEI-MED"), 1024),
        "unseen photo": ([unseen_photo(args.out)], 1024),
    }
    print(f"x{args.scale}, paper protocol: PSNR of the crop / of its error below / above {cutoff:g} cycles per pixel")
    print("| set | bound (exact below, nothing above) | " + " | ".join(m.name for m in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for name, (paths, crop) in sets.items():
        bounds, scores = [], {m.name: [] for m in methods}
        for path in paths:
            clean = load_clean(path, crop)[0]
            low = downsample(clean, args.scale)
            clean = clean[: low.shape[0] * args.scale, : low.shape[1] * args.scale]
            # Against all-zero output the error above the cutoff is the photo's own content there.
            bounds.append(band_psnr(clean, np.zeros_like(clean), cutoff)[1])
            for method in methods:
                restored = method.restore(low, 0.0)
                scores[method.name].append((psnr(clean, restored), *band_psnr(clean, restored, cutoff)))
        cells = [" / ".join(f"{v:.2f}" for v in np.mean(scores[m.name], axis=0)) for m in methods]
        print(f"| {name} | {np.mean(bounds):.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
