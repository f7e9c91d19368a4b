"""A vessel segmenter against DRIVE's expert maps, inside the field of view.

    python scripts/check_vessels_drive.py [--drive ../shared/data/DRIVE] [--method hessian|unet] [--tune]

On the 20 test images: AUC of the vesselness (classical) or vessel probability
(the bundled U-Net) and Dice of the segmentation against the 1st grader, and the
2nd grader's Dice against the 1st (the human reference).
With ``--tune`` first the mean Dice on the 20 training images for a range of
thresholds, the way ``vessels.DEFAULT_THRESHOLD`` was chosen.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from skimage.morphology import remove_small_objects

from fundus_restore.io import read_image, read_mask
from fundus_restore.vessel_metrics import dice, segmentation_auc as auc
from fundus_restore.vessels import DEFAULT_THRESHOLD, learned_vesselness, segment_vessels, vesselness

TUNING_THRESHOLDS = (0.015, 0.02, 0.022, 0.025, 0.028, 0.03, 0.035, 0.05)


def drive_images(drive: Path, split: str) -> list[tuple[str, Path, Path]]:
    """(number, image, FOV mask) of each image of a DRIVE split."""
    images = sorted((drive / split / "images").glob(f"*_{split}.tif"))
    return [(path.name.split("_")[0], path, drive / split / "mask" / f"{path.name.split('_')[0]}_{split}_mask.gif") for path in images]


def tune(drive: Path) -> None:
    scores = []
    for number, image_path, mask_path in drive_images(drive, "training"):
        fov = read_mask(mask_path)
        truth = read_mask(drive / "training" / "1st_manual" / f"{number}_manual1.gif") & fov
        response = vesselness(read_image(image_path), fov)
        # The same small-component removal as segment_vessels, at DRIVE scale.
        scores.append([dice(remove_small_objects(response > t, max_size=30) & fov, truth) for t in TUNING_THRESHOLDS])
    for threshold, mean in zip(TUNING_THRESHOLDS, np.mean(scores, axis=0)):
        print(f"training threshold {threshold:.3f}: mean Dice {mean:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drive", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "DRIVE")
    parser.add_argument("--tune", action="store_true", help="first print training Dice over a range of thresholds")
    parser.add_argument("--method", choices=("hessian", "unet"), default="hessian")
    args = parser.parse_args()
    if args.tune:
        tune(args.drive)
    rows = []
    for number, image_path, mask_path in drive_images(args.drive, "test"):
        fov = read_mask(mask_path)
        first = read_mask(args.drive / "test" / "1st_manual" / f"{number}_manual1.gif")
        second = read_mask(args.drive / "test" / "2nd_manual" / f"{number}_manual2.gif")
        image = read_image(image_path)
        start = time.perf_counter()
        response = (vesselness if args.method == "hessian" else learned_vesselness)(image, fov)
        seconds = time.perf_counter() - start
        segmented = segment_vessels(image, fov, method=args.method)
        row = (auc(response[fov], first[fov]), dice(segmented & fov, first & fov), dice(second & fov, first & fov), seconds)
        rows.append(row)
        print(f"test {image_path.name:12} AUC {row[0]:.4f}  Dice {row[1]:.4f}  2nd grader Dice {row[2]:.4f}  map {row[3]:.2f} s")
    if not rows:
        print(f"no DRIVE test images under {args.drive}", file=sys.stderr)
        return 2
    mean = np.mean(rows, axis=0)
    print(
        f"{len(rows)} test images, {args.method}, threshold {DEFAULT_THRESHOLD if args.method == 'hessian' else 0.5}: mean AUC {mean[0]:.4f}, mean Dice {mean[1]:.4f}; "
        f"2nd grader vs 1st: mean Dice {mean[2]:.4f}; {mean[3]:.2f} s per image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
