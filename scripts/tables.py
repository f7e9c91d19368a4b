"""The results tables of `docs/results.md` on three sets of retinal photographs.

    python scripts/tables.py [--shared ../shared] [--out out/table1] [--method NAME ...]
    python scripts/tables.py --scale 4 [--out out/table-sr]       # super-resolution
    python scripts/tables.py --grey [--out out/table1-grey]       # red-free: the green channel
    python scripts/tables.py --scale 4 --sigma 25 --out out/table-restore \
        --method "bicubic" --method "resunet-retina-green-blind>srresnet-x4-retina"   # noisy small photos

Runs ``fundus-restore evaluate`` (seed 0, paper and camera noise, vessel measures;
sigma 25 for denoising — the paper's Table 1 — and no noise for super-resolution,
where the input is the photo shrunk by antialiased bicubic) on
  * DRIVE test: the 20 photographs, whole field of view, expert vessel maps;
  * HEI-MED validation: the 10 photographs the training configs hold out
    (``validation.holdout: 10`` among HEI-MED, seed 0), central 1024² crops;
  * unseen: scikit-image's retina photograph (never trained on), central 1024².
With ``--grey`` every set is scored on its photographs' green channel, as red-free
photographs (``evaluate --grey``).
Every score goes into one cache (``OUT/scores.jsonl``), so a rerun after adding a
method or retraining one model computes only that. Each set's report (tables,
report.html, figures) lands in ``OUT/<set>/``; ``OUT/tables.md`` joins the summaries.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fundus_restore.data import split_images
from fundus_restore.io import list_images, write_image

HEIMED_HOLDOUT, SPLIT_SEED = 10, 0  # as in configs/dncnn-finetune.yaml


def heimed_validation(heimed: Path) -> list[Path]:
    images = list_images([heimed])
    return split_images(images, holdout=HEIMED_HOLDOUT, among=images, seed=SPLIT_SEED)[1]


def unseen_photo(folder: Path) -> Path:
    from skimage.data import retina
    from skimage.util import img_as_float32

    path = folder / "skimage-retina.png"
    if not path.exists():
        write_image(path, img_as_float32(retina()))
    return path


def table_sets(data: Path, out: Path) -> dict[str, tuple[list[Path], int | None]]:
    """The tables' three sets: their photos (files or folders) and central crop (None: whole photos)."""
    return {
        "drive-test": ([data / "DRIVE/test/images"], None),
        "heimed-validation": (heimed_validation(data / "HEI-MED"), 1024),
        "unseen": ([unseen_photo(out)], 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--out", type=Path, help="Default: out/table1, or out/table-sr with --scale.")
    parser.add_argument("--method", action="append", help="Methods (default: the paper's table / the SR models).")
    parser.add_argument("--scale", type=int, default=1, help="Super-resolution factor (1: denoising).")
    parser.add_argument("--segmenter", default="hessian", help="Vessel segmenter of the vessel columns.")
    parser.add_argument("--lr-kernel", default="bicubic", help="With --scale: the kernel that shrinks the photos.")
    parser.add_argument("--grey", action="store_true", help="Score the green channel, as red-free photographs.")
    parser.add_argument("--sigma", type=float, help="Noise level (default: 25 for denoising, none with --scale).")
    args = parser.parse_args()
    default_out = ("out/table1" if args.scale == 1 else "out/table-sr") + ("-grey" if args.grey else "")
    args.out = args.out or Path(default_out)
    data, official = args.shared / "data", args.shared / "weights/dncnn/GD_Color_Blind.mat"
    sets = table_sets(data, args.out)
    title = "Denoising, sigma 25" if args.scale == 1 else f"Super-resolution x{args.scale}, {args.lr_kernel} shrink"
    title += f", noise sigma {args.sigma:g}" if args.sigma else ""
    title += ", green channel (red-free)" if args.grey else ""
    joined = [f"# {title}, seed 0, vessel segmenter {args.segmenter}", ""]
    for name, (files, crop) in sets.items():
        command = [sys.executable, "-m", "fundus_restore", "evaluate", "--report", str(args.out / name),
                   "--official-weights", str(official), "--cache", str(args.out / "scores.jsonl"),
                   "--scale", str(args.scale), "--segmenter", args.segmenter, "--lr-kernel", args.lr_kernel]
        command += [option for path in files for option in ("--clean", str(path))]
        # Without --method, evaluate's defaults, leaving out a bundled model that is not there (yet).
        command += [option for method in args.method or [] for option in ("--method", method)]
        command += ["--crop", str(crop)] if crop else []
        command += ["--grey"] if args.grey else []
        command += ["--sigma", str(args.sigma)] if args.sigma is not None else []
        subprocess.run(command, check=True)
        table = (args.out / name / "results.md").read_text(encoding="utf-8").splitlines()
        joined += [f"## {name} ({', '.join(Path(f).name for f in files)})", "", *table[2:], ""]
    (args.out / "tables.md").write_text("\n".join(joined), encoding="utf-8")
    print(f"wrote {args.out / 'tables.md'}")


if __name__ == "__main__":
    main()
