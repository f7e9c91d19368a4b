"""Does a denoiser's red-channel loss on a bright photo come from near-saturated pixels?

    python scripts/check_saturation.py [--official ../shared/weights/dncnn/GD_Color_Blind.mat]
        [--method dncnn-retina-green] [--gain 1.0 --gain 0.8 --gain 0.6] [--level 1.0 --level 0.97 ...]
        [--photos ../shared/data/HEI-MED]

Two views of one question, both at σ 25, seed 0:

* **The photo.** Scikit-image's retina photograph (central 1024² of its field of view,
  Table 1's unseen photo), whose red channel is nearly saturated, multiplied by each
  gain (fewer pixels near 1), with noise under the paper's protocol (float, not
  clipped): per-channel PSNR inside the FOV of the official CDnCNN-B and the given
  models. A model trained with clipped inputs that reads bright unclipped noise as
  clipping loses red at gain 1 and recovers as the gain falls.
* **Flat patches.** A 128² patch of red at each level (green 0.6, blue 0.4) under both
  noise protocols: the mean error of each model's red output (away from the borders)
  and its spread. Clipping lowers the mean of a noisy channel near 1, so a model should
  lift its output there under camera noise and not under paper noise.

With ``--photos DIR`` it first lists how bright each photograph of a folder is: the
share of red above 0.9 in the central 1024² of its field of view, Table 1's crop.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import PROTOCOLS, degrade_for_protocol
from fundus_restore.evaluate import Method, build_methods, centre_square, load_clean
from fundus_restore.fov import crop_to_fov, fov_mask
from fundus_restore.io import list_images
from fundus_restore.metrics import psnr

SIGMA = 25.0
CROP, BRIGHT = 1024, 0.9
FLAT_SIZE, FLAT_BORDER = 128, 16  # the border is the receptive field's reach into the padding


def central_crop(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return centre_square(*crop_to_fov(photo, fov_mask(photo)), CROP)


def bright_red_share(clean: np.ndarray, mask: np.ndarray) -> float:
    return float(np.mean(clean[..., 0][mask] > BRIGHT))


def photo_brightness(folder: Path) -> None:
    print(f"{'red > 0.9':>9}  photo")
    for path in list_images([folder]):
        clean, mask = load_clean(path, CROP)[:2]  # as evaluate crops it
        print(f"{bright_red_share(clean, mask):9.3f}  {path.name}", flush=True)
    print()


def photo_gains(methods: list[Method], gains: list[float]) -> None:
    from skimage.data import retina
    from skimage.util import img_as_float32

    clean, mask = central_crop(img_as_float32(retina()))
    print(f"{'gain':>5} {'red > 0.9':>9}  " + "  ".join(f"{m.name + ' R/G/B':>30}" for m in methods))
    for gain in gains:
        scaled = clean * gain
        noisy = degrade_for_protocol(scaled, SIGMA, "paper", seed=0)
        cells = []
        for method in methods:
            restored = method.restore(noisy, SIGMA)
            cells.append("/".join(f"{v:.2f}" for v in psnr(scaled, restored, mask=mask, per_channel=True)))
        print(f"{gain:5.2f} {bright_red_share(scaled, mask):9.3f}  " + "  ".join(f"{c:>30}" for c in cells), flush=True)


def flat_patch_bias(methods: list[Method], levels: list[float]) -> None:
    print(f"\n{'red':>5} {'noise':>6}  " + "  ".join(f"{m.name + ' red error':>34}" for m in methods))
    for level in levels:
        clean = np.empty((FLAT_SIZE, FLAT_SIZE, 3), np.float32)
        clean[...] = (level, 0.6, 0.4)
        for protocol in PROTOCOLS:
            noisy = degrade_for_protocol(clean, SIGMA, protocol, seed=0)
            cells = []
            for method in methods:
                error = method.restore(noisy, SIGMA)[FLAT_BORDER:-FLAT_BORDER, FLAT_BORDER:-FLAT_BORDER, 0] - level
                cells.append(f"{error.mean():+.4f} ± {error.std():.4f}")
            print(f"{level:5.2f} {protocol:>6}  " + "  ".join(f"{c:>34}" for c in cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, default=Path("../shared/weights/dncnn/GD_Color_Blind.mat"))
    parser.add_argument("--method", action="append", help="Models to compare (default: dncnn-retina-green).")
    parser.add_argument("--gain", type=float, action="append", help="Brightness factors (default 1.0, 0.8, 0.6).")
    parser.add_argument("--level", type=float, action="append", help="Flat red levels (default 1.0, 0.97, 0.9).")
    parser.add_argument("--photos", type=Path, help="A folder whose photographs' brightness to list first.")
    args = parser.parse_args()
    if args.photos:
        photo_brightness(args.photos)
    methods = build_methods(["cdncnn-b", *(args.method or ["dncnn-retina-green"])], official_weights=args.official)
    photo_gains(methods, args.gain or [1.0, 0.8, 0.6])
    flat_patch_bias(methods, args.level or [1.0, 0.97, 0.9])


if __name__ == "__main__":
    main()
