"""CBM3D told each photo's estimated noise level (as ``denoise``/``restore --denoise-model
cbm3d`` run it) against CBM3D told the true level (as ``evaluate`` and the tables run it),
on the noisy small photos of "Restoring noisy small photographs" in docs/results.md.

    python scripts/cbm3d_estimate.py [--shared ../shared] [--sigma 10 --sigma 25]

The sets, shrink (×4, antialiased bicubic), seeds and crops are those of
``scripts/tables.py --scale 4``; each noisy small photo is denoised and then upscaled by
``srresnet-x4-retina``. Prints the mean FOV PSNR under the paper and camera protocols.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fundus_restore import denoise
from fundus_restore.evaluate import Method, build_methods, evaluate_images
from fundus_restore.inference import estimated_noise_level
from fundus_restore.io import list_images

sys.path.insert(0, str(Path(__file__).parent))
from tables import table_sets  # noqa: E402

SCALE = 4
UPSCALER = "srresnet-x4-retina"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--sigma", type=float, action="append", help="noise levels (default: 10 and 25)")
    parser.add_argument("--out", type=Path, default=Path("out/cbm3d-estimate"), help="where the unseen photo is written")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    told_true = build_methods([f"cbm3d>{UPSCALER}"], scale=SCALE)[0]
    (upscaler,) = build_methods([UPSCALER], scale=SCALE)
    estimates: list[float] = []

    def told_estimate(noisy: np.ndarray, sigma: float) -> np.ndarray:
        level = estimated_noise_level(noisy)  # what denoise would estimate, made once
        estimates.append(255 * level - sigma)
        return upscaler.restore(denoise(noisy, "cbm3d", sigma=level), 0.0)

    methods = [told_true, Method(f"cbm3d (estimated sigma)>{UPSCALER}", told_estimate)]
    print(f"{'set':20}{'sigma':>6}  {'method':44}{'PSNR FOV paper / camera':>26}")
    for name, (files, crop) in table_sets(args.shared / "data", args.out).items():
        paths = list_images(files)
        for sigma in args.sigma or [10.0, 25.0]:
            rows = evaluate_images(paths, methods, sigmas=[sigma], crop_size=crop, vessels=False, scale=SCALE)
            for method in methods:
                means = [
                    np.mean([r["psnr_fov"] for r in rows if r["method"] == method.name and r["protocol"] == protocol])
                    for protocol in ("paper", "camera")
                ]
                print(f"{name:20}{sigma:6g}  {method.name:44}{means[0]:14.2f} / {means[1]:.2f}", flush=True)
    print(f"estimate minus true sigma (0-255): {min(estimates):+.2f} to {max(estimates):+.2f}, "
          f"mean {np.mean(estimates):+.2f}, over {len(estimates)} noisy photos")


if __name__ == "__main__":
    main()
