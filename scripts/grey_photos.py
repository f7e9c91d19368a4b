"""Grey (red-free) photographs through the bundled colour models.

    python scripts/grey_photos.py [--shared ../shared] [--count 20] [--model resunet-retina-green-blind ...]

Red-free fundus photographs are taken through a green filter: one grey channel, much
like a colour photograph's green one. ``denoise`` and ``upscale`` give a grey image to a
colour model as the same level in all three channels and average the three outputs.
This script makes red-free stand-ins from the green channel of the DRIVE test
photographs and prints the mean FOV PSNR of

* denoising at sigma 25 (paper and camera protocols, seeded as ``evaluate``): the
  noisy input, BM3D (the ``bm3d`` package's grey version) and each ``--model``;
* super-resolution x4 of the clean grey photo (antialiased bicubic shrink): bicubic
  and the default upscaler.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import bm3d
import numpy as np

from fundus_restore.degrade import PROTOCOLS, bicubic_upsample, degrade_for_protocol, downsample
from fundus_restore.evaluate import load_clean
from fundus_restore.inference import DEFAULT_UPSCALE_MODEL, denoise, upscale
from fundus_restore.io import list_images
from fundus_restore.metrics import psnr
from fundus_restore.pretrained import default_model_name

SIGMA = 25.0
SCALE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--count", type=int, default=20, help="how many DRIVE test photographs")
    parser.add_argument("--model", action="append", help="denoisers (default: the bundled default)")
    args = parser.parse_args()
    models = args.model or [default_model_name()]

    scores: dict[str, list[float]] = {}
    for index, path in enumerate(list_images([args.shared / "data/DRIVE/test/images"])[: args.count]):
        clean, mask, _ = load_clean(path)
        grey = clean[..., 1:2]
        for protocol in PROTOCOLS:
            noisy = degrade_for_protocol(grey, SIGMA, protocol, index)
            restored = {"noisy": noisy, "bm3d": bm3d.bm3d(noisy[..., 0], SIGMA / 255.0)[..., None]}
            restored |= {model: denoise(noisy, model) for model in models}
            for method, image in restored.items():
                scores.setdefault(f"denoise sigma 25, {protocol}: {method}", []).append(
                    psnr(grey, image.astype(np.float32), mask=mask)
                )
        side = (np.array(grey.shape[:2]) // SCALE) * SCALE
        grey, mask = grey[: side[0], : side[1]], mask[: side[0], : side[1]]
        small = downsample(grey, SCALE)
        for method, image in (("bicubic", bicubic_upsample(small, SCALE)), (DEFAULT_UPSCALE_MODEL, upscale(small))):
            scores.setdefault(f"upscale x4: {method}", []).append(psnr(grey, image, mask=mask))
    for name, values in scores.items():
        print(f"{name}: {np.mean(values):.2f} dB FOV PSNR over {len(values)} photographs")


if __name__ == "__main__":
    main()
