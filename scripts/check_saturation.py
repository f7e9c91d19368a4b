"""Does a denoiser's red-channel loss on a bright photo come from near-saturated pixels?

    python scripts/check_saturation.py [--official ../shared/weights/dncnn/GD_Color_Blind.mat]
        [--method dncnn-retina-green] [--gain 1.0 --gain 0.8 --gain 0.6]

Takes scikit-image's retina photograph (central 1024² of its field of view, Table 1's
unseen photo), whose red channel is nearly saturated, multiplies it by each gain (fewer
pixels near 1), adds σ 25 noise under the paper's protocol (float, not clipped; seed 0)
and prints the per-channel PSNR inside the FOV of the official CDnCNN-B and the given
models. A model trained with clipped inputs that reads bright unclipped noise as
clipping loses red at gain 1 and recovers as the gain falls.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import degrade_for_protocol
from fundus_restore.evaluate import build_methods, centre_square
from fundus_restore.fov import crop_to_fov, fov_mask
from fundus_restore.metrics import psnr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, default=Path("../shared/weights/dncnn/GD_Color_Blind.mat"))
    parser.add_argument("--method", action="append", help="Models to compare (default: dncnn-retina-green).")
    parser.add_argument("--gain", type=float, action="append", help="Brightness factors (default 1.0, 0.8, 0.6).")
    args = parser.parse_args()
    from skimage.data import retina
    from skimage.util import img_as_float32

    photo = img_as_float32(retina())
    clean, mask = centre_square(*crop_to_fov(photo, fov_mask(photo)), 1024)
    methods = build_methods(["cdncnn-b", *(args.method or ["dncnn-retina-green"])], official_weights=args.official)
    print(f"{'gain':>5} {'red > 0.9':>9}  " + "  ".join(f"{m.name + ' R/G/B':>30}" for m in methods))
    for gain in args.gain or [1.0, 0.8, 0.6]:
        scaled = clean * gain
        noisy = degrade_for_protocol(scaled, 25.0, "paper", seed=0)
        cells = []
        for method in methods:
            restored = method.restore(noisy, 25.0)
            cells.append("/".join(f"{v:.2f}" for v in psnr(scaled, restored, mask=mask, per_channel=True)))
        share = float(np.mean(scaled[..., 0][mask] > 0.9))
        print(f"{gain:5.2f} {share:9.3f}  " + "  ".join(f"{c:>30}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
