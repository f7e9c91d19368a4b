"""Does the hallucination guard's rate track the vessels an upscaler really invents?

    python scripts/check_guard.py [--shared ../shared] [--factor 1.0 0.7 0.5]

The guard of ``upscale --check`` (``vessel_metrics.hallucinated_vessels``; the
``invented_vs_bicubic`` column of the SR tables) needs no ground truth: it counts the
upscaled photo's vessel centreline that lies away from every vessel of the bicubic
upscale's segmentation. Here the ground truth is known: on DRIVE test (whole field of
view) and the HEI-MED validation crops (central 1024²), each photo is shrunk ×4 and
upscaled by bicubic, SRResNet and SRGAN, and the clean photo itself is scored too. The
true rate of invented vessels is ``vessel_preservation``'s ``spurious_rate`` (centreline
away from the clean photo's vessels and, on DRIVE, the expert's). The guard is scored with
its reference segmented at the default vesselness threshold times each ``--factor`` (a
lower threshold also counts faint evidence in the bicubic upscale as a vessel).
Printed: the mean of each rate per method, and the correlation over the photographs
between the guard's rate and the true rate of the two SR models' outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fundus_restore.degrade import bicubic_upsample, downsample
from fundus_restore.evaluate import load_clean
from fundus_restore.inference import upscale
from fundus_restore.io import list_images
from fundus_restore.vessel_metrics import hallucinated_vessels, vessel_preservation
from fundus_restore.vessels import DEFAULT_THRESHOLD, segment_vessels
from tables import heimed_validation

SCALE = 4
MODELS = ("srresnet-x4-retina", "srgan-x4-retina")


def scores(path: Path, crop: int | None, factors: list[float]) -> dict[str, list[float]]:
    """Per method: [true invented rate, guard rate at each factor]."""
    clean, mask, expert, scale = load_clean(path, crop)
    low = downsample(clean, SCALE)
    height, width = low.shape[0] * SCALE, low.shape[1] * SCALE
    clean, mask = clean[:height, :width], mask[:height, :width]
    expert = None if expert is None else expert[:height, :width]
    bicubic = bicubic_upsample(low, SCALE)
    outputs = {"clean photo": clean, "bicubic": bicubic, **{m: upscale(low, m) for m in MODELS}}
    references = [segment_vessels(bicubic, mask, threshold=DEFAULT_THRESHOLD * f, scale=scale) for f in factors]
    clean_vessels = segment_vessels(clean, mask, scale=scale)
    found = {}
    for name, output in outputs.items():
        true = vessel_preservation(
            clean, output, expert=expert, fov=mask, scale=scale, clean_vessels=clean_vessels
        )["spurious_rate"]
        guard = [hallucinated_vessels(output, bicubic, mask, scale=scale, reference_vessels=r)[1] for r in references]
        found[name] = [true, *guard]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--factor", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    args = parser.parse_args()
    data = args.shared / "data"
    sets = {
        "DRIVE test": [(p, None) for p in list_images([data / "DRIVE/test/images"])],
        "HEI-MED validation": [(p, 1024) for p in heimed_validation(data / "HEI-MED")],
    }
    header = " | ".join(f"guard, threshold x{f:g}" for f in args.factor)
    for set_name, photos in sets.items():
        per_photo = [scores(path, crop, args.factor) for path, crop in photos]
        print(f"\n{set_name} ({len(photos)} photos), SR x{SCALE}, paper protocol")
        print(f"| method | true invented rate | {header} |")
        print("|---" * (len(args.factor) + 2) + "|")
        for method in per_photo[0]:
            means = np.mean([photo[method] for photo in per_photo], axis=0)
            print(f"| {method} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
        rates = np.array([photo[m] for photo in per_photo for m in MODELS])
        # A guard that is 0 on every photo has no correlation to give.
        correlations = [
            f"{np.corrcoef(rates[:, 0], rates[:, 1 + i])[0, 1]:+.2f}" if np.ptp(rates[:, 1 + i]) > 0 else "n/a (constant)"
            for i in range(len(args.factor))
        ]
        print("correlation with the true rate over the SR outputs: "
              + ", ".join(f"x{f:g} {c}" for f, c in zip(args.factor, correlations)))


if __name__ == "__main__":
    main()
