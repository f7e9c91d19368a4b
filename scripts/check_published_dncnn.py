"""Check that the imported official DnCNN weights reproduce their published PSNRs.

Runs the four official MatConvNet models on all 68 BSD68 / CBSD68 images at sigma 25
(seeded, unclipped noise; image i gets seed i), prints a table and exits non-zero
when any mean PSNR misses the published one by more than the tolerance.

    python scripts/check_published_dncnn.py [--shared ../shared] [--csv per_image.csv]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from fundus_restore.matconvnet import (
    BENCHMARK_IMAGE_COUNT,
    PUBLISHED_DNCNN,
    PUBLISHED_SIGMA,
    PUBLISHED_TOLERANCE_DB,
    benchmark_images,
    denoising_psnr,
    load_matconvnet_dncnn,
)
from fundus_restore.pretrained import WeightsError

DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="folder holding data/ and weights/dncnn/")
    parser.add_argument("--csv", type=Path, help="also write every image's noisy and denoised PSNR here")
    args = parser.parse_args()

    header = f"{'model':<9} {'weights':<19} {'dataset':<7} {'images':>6} {'noisy':>6} {'measured':>8} {'published':>9} {'diff':>6}  result"
    lines = [header, "-" * len(header)]
    all_pass = True
    per_image: list[dict[str, str | int | float]] = []
    for published in PUBLISHED_DNCNN:
        started = time.perf_counter()
        try:
            model = load_matconvnet_dncnn(args.shared / "weights" / "dncnn" / published.weights_file)
        except WeightsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        images = benchmark_images(args.shared / "data" / published.dataset)
        scores = np.array([denoising_psnr(model, path, seed=index) for index, path in enumerate(images)])
        noisy, measured = scores.mean(axis=0)
        per_image += [
            {"weights": published.weights_file, "image": path.name, "seed": index, "noisy_psnr": n, "denoised_psnr": d}
            for index, (path, (n, d)) in enumerate(zip(images, scores))
        ]
        difference = measured - published.psnr
        passed = len(images) == BENCHMARK_IMAGE_COUNT and abs(difference) <= PUBLISHED_TOLERANCE_DB
        all_pass &= passed
        lines.append(
            f"{published.model:<9} {published.weights_file:<19} {published.dataset:<7} {len(images):>6} {noisy:>6.2f} "
            f"{measured:>8.3f} {published.psnr:>9.2f} {difference:>+6.3f}  {'pass' if passed else 'FAIL'}"
        )
        print(f"{published.model}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if args.csv:
        with args.csv.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(per_image[0]))
            writer.writeheader()
            writer.writerows(per_image)
    print(f"sigma {PUBLISHED_SIGMA:g}, unclipped noise, tolerance ±{PUBLISHED_TOLERANCE_DB} dB")
    print("\n".join(lines))
    return 0 if all_pass else 1


if __name__ == "__main__":
    sys.exit(main())
