"""Speed of ``fundus_restore.denoise`` against a plain PyTorch forward pass and CBM3D.

One square crop of a HEI-MED photograph (or scikit-image's retina, resized, when
../shared is absent) with sigma-25 Gaussian noise is denoised by

* the official CDnCNN-B as a plain float32 PyTorch forward pass on the whole image
  (``model(x)`` under ``torch.no_grad()``), the reference for the speed ratios;
* ``fundus_restore.denoise`` with the same network: default settings, and tile=512;
* CBM3D (``bm3d.bm3d_rgb``) on a centred crop (``--bm3d-size``), its time scaled per
  megapixel to the full image, since it runs about a minute per megapixel.

All in one process; the peak resident memory of each run is read from VmHWM after
resetting it through /proc/self/clear_refs.

    python benchmarks/bench_denoise.py [--size 1696] [--weights ../shared/weights/dncnn/GD_Color_Blind.mat]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fundus_restore
from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.io import read_image
from fundus_restore.metrics import psnr
from fundus_restore.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
SIGMA = 25.0


@dataclass
class Timing:
    name: str
    seconds: float
    megapixels: float
    peak_rss_mib: float
    psnr_db: float
    note: str = ""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(
    name: str, run: Callable[[], np.ndarray], clean: np.ndarray, repeat: int, note: str = ""
) -> tuple[Timing, np.ndarray]:
    """Best wall time of ``repeat`` runs, the peak RSS increase over them, the PSNR; and the result."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline_kib = _status_kib("VmRSS")
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        restored = run()
        best = min(best, time.perf_counter() - start)
    peak_mib = (_status_kib("VmHWM") - baseline_kib) / 1024
    megapixels = clean.shape[0] * clean.shape[1] / 1e6
    return Timing(name, best, megapixels, peak_mib, psnr(clean, restored), note), restored


def test_image(size: int) -> tuple[np.ndarray, str]:
    """A clean size×size float32 RGB image and where it came from."""
    heimed = sorted((SHARED / "data" / "HEI-MED").glob("*.jpg"))
    if heimed:
        image = read_image(heimed[0])
        height, width = image.shape[:2]
        if min(height, width) >= size:
            top, left = (height - size) // 2, (width - size) // 2
            return image[top : top + size, left : left + size], f"centre crop of HEI-MED {heimed[0].name}"
    from skimage import data, transform

    retina = transform.resize(data.retina(), (size, size), anti_aliasing=True).astype(np.float32)
    return retina, "scikit-image retina resized"


def official_network(weights: Path) -> tuple[nn.Module, str]:
    if weights.is_file():
        from fundus_restore.matconvnet import load_matconvnet_dncnn

        return load_matconvnet_dncnn(weights), f"official CDnCNN-B ({weights.name})"
    torch.manual_seed(0)
    network = create_model("dncnn", channels=3, depth=20, width=64, batch_norm=False).eval()
    return network, f"RANDOM-WEIGHT 20-layer DnCNN ({weights} absent): timings valid, PSNR meaningless"


def plain_forward(network: nn.Module, noisy: np.ndarray) -> np.ndarray:
    """The reference: a default float32 forward pass on the whole image."""
    with torch.no_grad():
        restored = network(torch.from_numpy(noisy).permute(2, 0, 1).unsqueeze(0).contiguous())
    return restored[0].permute(1, 2, 0).numpy()


def print_table(timings: list[Timing], reference: Timing) -> None:
    print(f"{'method':34}{'seconds':>10}{'s/MP':>8}{'MP/s':>9}{'peak RSS':>11}{'PSNR':>9}{'speed-up':>10}")
    for t in timings:
        per_mp = t.seconds / t.megapixels
        speedup = (reference.seconds / reference.megapixels) / per_mp
        print(
            f"{t.name:34}{t.seconds:10.2f}{per_mp:8.2f}{t.megapixels / t.seconds:9.4f}"
            f"{t.peak_rss_mib:8.0f} MiB{t.psnr_db:9.3f}{speedup:9.2f}×"
        )
        if t.note:
            print(f"{'':4}{t.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "dncnn" / "GD_Color_Blind.mat")
    parser.add_argument("--size", type=int, default=1696, help="side of the square test image")
    parser.add_argument("--bm3d-size", type=int, default=512, help="side of the centred crop BM3D runs on")
    parser.add_argument("--skip-bm3d", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the best time counts")
    args = parser.parse_args()

    clean, source = test_image(args.size)
    noisy = add_gaussian_noise(clean, SIGMA, seed=0)
    network, network_note = official_network(args.weights)
    print(f"image: {args.size}×{args.size} {source}, Gaussian noise sigma {SIGMA:g}/255 (seed 0)")
    print(f"network: {network_note}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, load average before {os.getloadavg()}"
    )
    # Warm-up (oneDNN primitive creation) for both paths, outside the timings.
    warm = noisy[:64, :64]
    plain_forward(network, warm)
    fundus_restore.denoise(warm, network, device="cpu")

    plain, plain_restored = measure(
        "plain float32 forward (whole)", lambda: plain_forward(network, noisy), clean, args.repeat
    )
    timings = [plain]
    for name, tile in (("denoise (default)", None), ("denoise tile=512", 512)):
        timing, restored = measure(name, partial(fundus_restore.denoise, noisy, network, tile=tile), clean, args.repeat)
        difference = np.abs(restored - plain_restored).max()
        timings.append(Timing(**{**vars(timing), "note": f"max |difference| to the plain forward {difference:.1e}"}))
    if not args.skip_bm3d:
        import bm3d

        side = min(args.bm3d_size, args.size)
        top = (args.size - side) // 2
        window = (slice(top, top + side), slice(top, top + side))
        bm3d_timing, _ = measure(
            f"CBM3D ({side}×{side} crop)",
            lambda: bm3d.bm3d_rgb(noisy[window], sigma_psd=SIGMA / 255).astype(np.float32),
            clean[window],
            1,
            note=f"timed on the crop; s/MP and speed-up are per megapixel; PSNR is on the crop "
            f"(plain DnCNN on the same crop: {psnr(clean[window], plain_restored[window]):.3f} dB)",
        )
        timings.append(bm3d_timing)
    print_table(timings, plain)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
