"""Field-of-view detection against DRIVE's own masks: IoU per image, min and mean.

    python scripts/check_fov_drive.py [--drive ../shared/data/DRIVE]

Exits 1 if any image falls below the required IoU of 0.97.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fundus_restore.fov import fov_mask
from fundus_restore.io import list_images, read_image, read_mask

REQUIRED_IOU = 0.97


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drive", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "DRIVE")
    args = parser.parse_args()
    scores = []
    for split in ("training", "test"):
        for image_path in list_images([args.drive / split / "images"]):
            number = image_path.name.split("_")[0]
            truth = read_mask(args.drive / split / "mask" / f"{number}_{split}_mask.gif")
            mask = fov_mask(read_image(image_path))
            iou = float((mask & truth).sum() / (mask | truth).sum())
            scores.append(iou)
            print(f"{split:9} {image_path.name:18} IoU {iou:.4f}")
    if not scores:
        print(f"no DRIVE images under {args.drive}", file=sys.stderr)
        return 2
    print(f"{len(scores)} images: min IoU {min(scores):.4f}, mean {sum(scores) / len(scores):.4f} (required ≥ {REQUIRED_IOU})")
    return 0 if min(scores) >= REQUIRED_IOU else 1


if __name__ == "__main__":
    sys.exit(main())
