"""Training throughput (patches per second) of the paper's networks on this machine.

    python benchmarks/bench_train.py [--threads 2] [--batch 16] [--steps 3] [--device cuda] [--json RATES.json]

One Adam step on random 80² patches (96² high-resolution patches for SRResNet ×4),
float32 with the default memory layout as the baseline, then channels-last and
channels-last with bfloat16 autocast (what ``mixed_precision: bfloat16`` trains with),
all in one process; prints patches/s and the ratio to the baseline. Data loading is
not included (the patch stream feeds far faster than these networks train on a CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fundus_restore.models import create_model

NETWORKS = {
    "DnCNN-20 (CDnCNN-B fine-tune)": (lambda: create_model("dncnn", depth=20, batch_norm=False), 80, 1),
    "skip autoencoder": (lambda: create_model("autoencoder", skip_weights=True), 80, 1),
    "SRResNet x4": (lambda: create_model("srresnet", scale=4), 96, 4),
    "vessel U-Net": (lambda: create_model("unet"), 96, 1),
    "residual U-Net denoiser (ours)": (lambda: create_model("resunet"), 80, 1),
}
MODES = ("float32", "channels-last", "channels-last + bfloat16")


def patches_per_second(
    build, patch: int, scale: int, mode: str, batch: int, steps: int, device: torch.device = torch.device("cpu")
) -> float:
    torch.manual_seed(0)
    model = build().to(device)
    inputs = torch.rand(batch, 3, patch // scale, patch // scale, device=device)
    with torch.no_grad():
        target = torch.rand_like(model(inputs[:1])).expand(batch, -1, -1, -1).contiguous()
    if mode != "float32":
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode.endswith("bfloat16")):
            output = model(inputs)
        loss = (output.float() - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up: oneDNN / cuDNN pick their kernels
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()  # CUDA runs asynchronously: wait for the last step before stopping the clock
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then cuDNN picks kernels by timing them)")
    parser.add_argument("--json", type=Path, help="Also write the rates here: {network: {mode: patches/s}}.")
    args = parser.parse_args()
    if min(args.threads, args.batch, args.steps) < 1:
        parser.error("--threads, --batch and --steps must be at least 1")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA device")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"{where}, batch {args.batch}; 80² patches (96² for SRResNet x4 targets and the U-Net)")
    print(f"{'network':32} " + " ".join(f"{mode:>26}" for mode in MODES))
    table: dict[str, dict[str, float]] = {}
    for name, (build, patch, scale) in NETWORKS.items():
        rates = [patches_per_second(build, patch, scale, mode, args.batch, args.steps, device) for mode in MODES]
        table[name] = dict(zip(MODES, rates))
        cells = [f"{rate:8.1f} patches/s {rate / rates[0]:5.2f}x" for rate in rates]
        print(f"{name:32} " + " ".join(f"{cell:>26}" for cell in cells), flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
