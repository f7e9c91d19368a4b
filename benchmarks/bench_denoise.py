"""Speed of ``fundus_restore.denoise`` against a plain PyTorch forward pass and CBM3D.

One square crop of a HEI-MED photograph (or scikit-image's retina, resized, when
../shared is absent) with sigma-25 Gaussian noise is denoised by

* the official CDnCNN-B as a plain float32 PyTorch forward pass on the whole image
  (``model(x)`` under ``torch.no_grad()``), the reference for the speed ratios;
* ``fundus_restore.denoise`` with the same network: default settings (tile 2048: a
  1696² image is one tile), and tiles of 1024 and 512 (memory for recomputed overlap);
* ``fundus_restore.denoise`` with each ``--model`` (a bundled name or a weights file),
  default settings, to compare architectures (the residual U-Net against DnCNN);
* CBM3D (``denoise`` with ``cbm3d``, told the true sigma) on a centred crop
  (``--bm3d-size``), its time scaled per megapixel to the full image, since it runs
  about a minute per megapixel.

All in one process, in interleaved rounds (best time per method); the peak resident
memory of each run is read from VmHWM after resetting it through /proc/self/clear_refs.

    python benchmarks/bench_denoise.py [--size 1696] [--weights ../shared/weights/dncnn/GD_Color_Blind.mat] [--model NAME ...]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
class Method:
    """One way to denoise the test image and what its runs measured."""

    name: str
    run: Callable[[], np.ndarray]
    clean: np.ndarray
    note: str = ""
    seconds: list[float] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    restored: np.ndarray | None = None

    @property
    def megapixels(self) -> float:
        return self.clean.shape[0] * self.clean.shape[1] / 1e6

    def seconds_per_megapixel(self) -> float:
        return min(self.seconds) / self.megapixels


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def run_once(method: Method) -> None:
    """Time one run of ``method`` and record the increase of peak RSS during it."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    baseline_kib = _status_kib("VmRSS")
    start = time.perf_counter()
    method.restored = method.run()
    method.seconds.append(time.perf_counter() - start)
    method.peak_rss_mib = max(method.peak_rss_mib, (_status_kib("VmHWM") - baseline_kib) / 1024)


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


def print_table(methods: list[Method], reference: Method) -> None:
    width = max(34, *(len(m.name) + 2 for m in methods))  # a --model path can be long
    print(f"{'method':{width}}{'seconds':>10}{'s/MP':>8}{'MP/s':>9}{'peak RSS':>11}{'PSNR':>9}{'speed-up':>10}")
    for m in methods:
        per_mp = m.seconds_per_megapixel()
        print(
            f"{m.name:{width}}{min(m.seconds):10.2f}{per_mp:8.2f}{1 / per_mp:9.4f}{m.peak_rss_mib:8.0f} MiB"
            f"{psnr(m.clean, m.restored):9.3f}{reference.seconds_per_megapixel() / per_mp:9.2f}×"
        )
        if len(m.seconds) > 1:
            print(f"{'':4}all runs: {', '.join(f'{t:.2f}' for t in m.seconds)} s")
        if m.note:
            print(f"{'':4}{m.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "dncnn" / "GD_Color_Blind.mat")
    parser.add_argument("--size", type=int, default=1696, help="side of the square test image")
    parser.add_argument("--bm3d-size", type=int, default=512, help="side of the centred crop BM3D runs on")
    parser.add_argument("--skip-bm3d", action="store_true")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of runs; each method's best time counts")
    parser.add_argument("--model", action="append", default=[], help="also time denoise with this model (name or file)")
    args = parser.parse_args()
    if min(args.size, args.bm3d_size, args.repeat) < 1:
        parser.error("--size, --bm3d-size and --repeat must be at least 1")

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
    for model in args.model:
        fundus_restore.denoise(warm, model, device="cpu")

    plain = Method("plain float32 forward (whole)", partial(plain_forward, network, noisy), clean)
    networks = [
        plain,
        Method("denoise (default)", partial(fundus_restore.denoise, noisy, network), clean),
        *(
            Method(f"denoise tile={tile}", partial(fundus_restore.denoise, noisy, network, tile=tile), clean)
            for tile in (1024, 512)
        ),
    ]
    others = [Method(f"denoise with {model}", partial(fundus_restore.denoise, noisy, model), clean) for model in args.model]
    # Rounds over all methods, so that a change in the machine's load hits them alike.
    for round_index in range(args.repeat):
        for method in networks + others:
            run_once(method)
        print(f"round {round_index + 1}: load average {os.getloadavg()}", flush=True)
    for method in networks[1:]:
        method.note = f"max |difference| to the plain forward {np.abs(method.restored - plain.restored).max():.1e}"
    methods = networks + others
    if not args.skip_bm3d:
        side = min(args.bm3d_size, args.size)
        top = (args.size - side) // 2
        window = (slice(top, top + side), slice(top, top + side))
        crop = Method(
            f"CBM3D ({side}×{side} crop)",
            partial(fundus_restore.denoise, noisy[window], "cbm3d", sigma=SIGMA / 255),
            clean[window],
            note=f"timed once on the crop; s/MP and speed-up are per megapixel; PSNR is on the crop "
            f"(plain DnCNN on the same crop: {psnr(clean[window], plain.restored[window]):.3f} dB)",
        )
        run_once(crop)
        methods.append(crop)
    print_table(methods, plain)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
