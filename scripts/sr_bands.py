"""Where super-resolution's error lies: below or above the small image's Nyquist frequency.

    python scripts/sr_bands.py [--shared ../shared] [--scale 4] [--method NAME ...] [--back-project STEPS]

On the three sets of ``scripts/tables.py`` (DRIVE test, HEI-MED validation, the unseen
photo; paper protocol: antialiased bicubic shrink, no noise), prints per method the mean
PSNR of the whole crop and of its error below and above ``1 / (2 scale)`` cycles per pixel
(``fundus_restore.metrics.band_psnr``), and the **bound**: the PSNR of a method that
recovers everything below exactly and invents nothing above. A method that beats the
bound has synthesised detail above the small image's Nyquist frequency, right or wrong.
The HEI-MED and unseen crops lie inside the field of view; DRIVE's are the FOV's bounding
box, dark corners included, so its totals differ from the FOV PSNR of the tables.

A second table per set splits the error finer, into square rings of frequency around the
cutoff c (``fundus_restore.metrics.band_mse``, mean squared error ×10⁶ per ring), beside
the photo's own energy there: what a method that invents nothing leaves as error above c.
``--back-project STEPS`` also scores each upscaler made consistent with the small image:
STEPS rounds of adding the bicubic upscale of (small image − shrunk output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import bicubic_upsample, downsample
from fundus_restore.evaluate import build_methods, load_clean
from fundus_restore.io import list_images
from fundus_restore.metrics import band_mse, band_psnr, psnr

from tables import heimed_validation, unseen_photo

DEFAULT_METHODS = ["bicubic", "srresnet-x4-retina", "srgan-x4-retina"]


def back_projected(low: np.ndarray, upscaled: np.ndarray, scale: int, steps: int) -> np.ndarray:
    """``upscaled`` moved towards shrinking back to ``low`` (iterative back-projection)."""
    for _ in range(steps):
        upscaled = upscaled + bicubic_upsample(low - downsample(upscaled, scale), scale)
    return upscaled


def ring_edges(cutoff: float) -> list[float]:
    """Ring edges at fractions of the cutoff, finest around it, up to 0.5 cycles per pixel."""
    return [e for e in np.array([0, 0.5, 0.75, 1, 1.25, 1.5, 2]) * cutoff if e < 0.5] + [0.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--method", action="append", help=f"Upscalers (default: {', '.join(DEFAULT_METHODS)}).")
    parser.add_argument("--back-project", type=int, default=0,
                        help="Also score each upscaler back-projected this many steps.")
    parser.add_argument("--out", type=Path, default=Path("out/table-sr"), help="Where the unseen photo is written.")
    args = parser.parse_args()
    data, cutoff = args.shared / "data", 1 / (2 * args.scale)
    edges = ring_edges(cutoff)
    methods = build_methods(args.method or DEFAULT_METHODS, scale=args.scale)
    names = [m.name for m in methods]
    if args.back_project:
        names += [f"{m.name}, back-projected" for m in methods if m.name != "bicubic"]
    sets = {
        "DRIVE test": (list_images([data / "DRIVE/test/images"]), None),
        "HEI-MED validation": (heimed_validation(data / "HEI-MED"), 1024),
        "unseen photo": ([unseen_photo(args.out)], 1024),
    }
    rings = " | ".join(f"{low / cutoff:g}c–{high / cutoff:g}c" for low, high in zip(edges[:-1], edges[1:]))
    print(f"x{args.scale}, paper protocol, c = {cutoff:g} cycles per pixel")
    for name, (paths, crop) in sets.items():
        bounds, scores = [], {n: [] for n in names}
        energy, errors = [], {n: [] for n in names}
        for path in paths:
            clean = load_clean(path, crop)[0]
            low = downsample(clean, args.scale)
            clean = clean[: low.shape[0] * args.scale, : low.shape[1] * args.scale]
            # Against all-zero output the error above the cutoff is the photo's own content there.
            bounds.append(band_psnr(clean, np.zeros_like(clean), cutoff)[1])
            energy.append(band_mse(clean, np.zeros_like(clean), edges))
            outputs = {m.name: m.restore(low, 0.0) for m in methods}
            if args.back_project:
                outputs |= {
                    f"{m.name}, back-projected": back_projected(low, outputs[m.name], args.scale, args.back_project)
                    for m in methods
                    if m.name != "bicubic"
                }
            for method, restored in outputs.items():
                scores[method].append((psnr(clean, restored), *band_psnr(clean, restored, cutoff)))
                errors[method].append(band_mse(clean, restored, edges))
        print(f"\n{name}: PSNR of the crop / of its error below / above c; "
              f"bound {np.mean(bounds):.2f} (exact below, nothing above)")
        print("| method | PSNR | below c | above c |\n|---|---|---|---|")
        for method in names:
            print(f"| {method} | " + " | ".join(f"{v:.2f}" for v in np.mean(scores[method], axis=0)) + " |")
        print(f"\n{name}: mean squared error ×10⁶ per frequency ring")
        print(f"| | {rings} |\n|---|" + "---|" * (len(edges) - 1))
        for label, values in [("the photo's own energy", energy)] + [(m, errors[m]) for m in names]:
            print(f"| {label} | " + " | ".join(f"{v * 1e6:.2f}" for v in np.mean(values, axis=0)) + " |", flush=True)


if __name__ == "__main__":
    main()
