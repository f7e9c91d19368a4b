"""The fundus-restore command line: thin wrappers over the Python API."""

from __future__ import annotations

import csv
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

if TYPE_CHECKING:  # torch is imported only by the commands that run a model
    from torch import nn

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# soft_wrap: an error stays one line (file names are long); messages are escaped
# because file names may hold brackets that rich would read as markup.
console = Console(stderr=True, soft_wrap=True)


def _report_error(message: str, label: str = "error") -> None:
    console.print(f"[red]{label}:[/] {escape(message)}")

Inputs = Annotated[list[Path], typer.Argument(help="Image files or folders of images.")]
OutDir = Annotated[Path, typer.Option("--out", "-o", help="Folder for the outputs (created if needed).")]
_DENOISE_MODEL_HELP = "Denoiser: bundled name, .safetensors file or cbm3d (classical, far slower than the networks)"
ModelOption = Annotated[
    Optional[str], typer.Option("--model", "-m", help=f"{_DENOISE_MODEL_HELP} (default: best bundled).")
]
_UPSCALE_MODEL_HELP = "Super-resolution model: bundled name or .safetensors file (default: the bundled one)."
UpscaleModelOption = Annotated[Optional[str], typer.Option("--model", "-m", help=_UPSCALE_MODEL_HELP)]
ScaleOption = Annotated[
    Optional[int],
    typer.Option(min=2, help="Upscaling factor: picks the bundled model of that scale, or checks the given model's."),
]
TileOption = Annotated[Optional[int], typer.Option(help="Tile size for bounded memory on large photos (e.g. 512).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
EnsembleOption = Annotated[
    bool, typer.Option(help="Average the outputs for the 8 flips and quarter turns of each photo (8x slower).")
]
NoiseCheckOption = Annotated[
    bool,
    typer.Option(
        help="Estimate each photo's noise level inside its field of view and warn when it lies outside "
        "the range the model was trained on (about 1 s per 2k photo)."
    ),
]
SigmaOption = Annotated[float, typer.Option(min=0, help="Noise standard deviation on the 0-255 scale.")]
NoiseLevelOption = Annotated[
    Optional[float],
    typer.Option(
        "--sigma", min=0, max=255,
        help="Noise sigma (0-255 scale) to tell a denoiser that takes it (bundled: resunet-retina-green-blind, "
        "resunet-retina-green-blind-small, resunet-retina-grey-blind; cbm3d); default: estimated per photo.",
    ),
]
SeedOption = Annotated[
    int, typer.Option(min=0, help="Seed of the noise; the i-th file (a folder's in sorted order, listed files as given) "
                                  "uses seed + i.")
]
RecursiveOption = Annotated[
    bool,
    typer.Option(
        "--recursive", "-r",
        help="Also take the images in the folders' subfolders (not hidden ones, not the output folder, "
        "not links to folders, which could loop); the outputs mirror the tree.",
    ),
]
SkipExistingOption = Annotated[
    bool,
    typer.Option(
        help="Leave out photos whose outputs exist already, to resume a stopped batch (outputs are written "
        "whole or not at all)."
    ),
]
CheckOption = Annotated[
    bool,
    typer.Option(
        help="Hallucination guard: write NAME.hallucination.png (the output with, in red, vessel centreline "
        "absent from the bicubic upscale's segmentation) and print the rate of such centreline."
    ),
]
CheckThresholdOption = Annotated[
    float, typer.Option(min=0, max=1, help="With --check, warn when that share of centreline exceeds this fraction.")
]
LogOption = Annotated[
    Optional[Path],
    typer.Option(
        help="Append a CSV row per photo: time, input, outputs (;-separated), status (written, failed, skipped), seconds, "
        "model, the noise level it was told, the --check rate, warnings and errors."
    ),
]


TrainDataOption = Annotated[
    Optional[list[Path]],
    typer.Option("--data", help="Training photographs, a folder or file (repeat for several): data.train."),
]
ValidateOnOption = Annotated[
    Optional[list[Path]],
    typer.Option(help="Where the validation photographs are held out from (repeat): validation.among."),
]
InitWeightsOption = Annotated[
    Optional[str], typer.Option(help="Start from these weights, a bundled name or a file: model.init_weights.")
]


def _training_overrides(
    settings: list[str] | None, data: list[Path] | None, validate_on: list[Path] | None, init_weights: str | None,
    paths: dict[str, Path | None] | None = None,
) -> dict[str, Any]:
    """The config overrides of ``--set`` and of the options that name a run's paths (which
    replace the configs' placeholders, as --set would, and win over a --set of the same key);
    ``paths`` maps further dotted keys to paths."""
    named = {"data.train": data and [str(path) for path in data],
             "validation.among": validate_on and [str(path) for path in validate_on],
             "model.init_weights": init_weights} | {key: path and str(path) for key, path in (paths or {}).items()}
    # Not "if value": --init-weights "" is a mistake to report, not an option left out.
    given = {key: value for key, value in named.items() if value is not None}
    return dict(parse_override(item) for item in settings or []) | given


def _progress() -> Progress:
    # The description is cut short so that the bar, the count and the time left fit 80 columns.
    return Progress(
        TextColumn("{task.description}", table_column=Column(max_width=32, no_wrap=True, overflow="ellipsis")),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


@dataclass
class _Job:
    """One photo of a batch: its position among all the inputs (degrade's seed offset),
    its file, the files it gets (the output first), and what the --log row records."""

    index: int
    source: Path
    outputs: tuple[Path, ...]
    record: dict[str, str] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Print a warning about this photo, naming it, and keep it for the log."""
        _report_error(f"{self.source}: {message}", "warning")
        self.messages.append(f"warning: {message}")


_LOG_COLUMNS = ("time", "input", "outputs", "status", "seconds", "model", "noise_sigma", "invented_vs_bicubic", "message")


class _BatchLog:
    """The --log CSV: one row per photo, appended and flushed as each ends, so a stopped
    batch keeps the rows of what it did; the header is written into a new file only."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.writer = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # A file name that is not UTF-8 (an old archive's Latin-1) is written with its bytes escaped.
                self.file = path.open("a", newline="", encoding="utf-8", errors="backslashreplace")
                self.writer = csv.DictWriter(self.file, _LOG_COLUMNS)
                if self.file.tell() == 0:  # a new or empty file (append mode starts at its end)
                    self.writer.writeheader()
                    self.file.flush()  # at once: a second batch started with this one sees it
            except OSError as error:  # before any photo: the batch does not start without its log
                _report_error(f"{path}: cannot write the log ({error.strerror or error})")
                raise typer.Exit(2) from None

    def write(self, job: _Job, status: str, seconds: float | None = None) -> None:
        """Append ``job``'s row. A log that cannot be written (a full disk) is warned about once
        and left: the photos are not blamed for it, and the batch goes on."""
        if self.writer is None:
            return
        try:
            self.writer.writerow({
                **job.record,
                "time": datetime.now().isoformat(timespec="seconds"),
                "input": str(job.source),
                # ";" between them (names hold spaces); none for a photo whose outputs were not written.
                "outputs": "" if status == "failed" else ";".join(map(str, job.outputs)),
                "status": status,
                "seconds": "" if seconds is None else f"{seconds:.2f}",
                "message": " | ".join(job.messages),
            })
            self.file.flush()
        except OSError as error:
            _report_error(f"{self.path}: cannot write the log ({error.strerror or error}); the batch goes on "
                          "without it", "warning")
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer = None
            try:
                self.file.close()
            except OSError:  # what could not be flushed was warned about
                pass

    def __enter__(self) -> _BatchLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _same_name(relative: Path) -> tuple[Path, ...]:
    """The output of ``relative``: the same path; formats we cannot write become PNG."""
    writable = relative.suffix.lower() in {".png", ".tif", ".tiff", ".jpg", ".jpeg"}
    return (relative if writable else relative.with_suffix(".png"),)


def _conflicts(jobs: list[_Job]) -> list[str]:
    """What writing ``jobs`` would destroy: an input overwritten, or one output written twice."""
    inputs = {job.source.resolve(): job.source for job in jobs}
    writers: dict[Path, Path] = {}
    problems: list[str] = []
    for job in jobs:
        for output in job.outputs:
            key = output.resolve()
            if key in inputs:
                problems.append(f"{output} would overwrite the input {inputs[key]}; choose another --out")
            elif key in writers and writers[key].resolve() == job.source.resolve():
                problems.append(f"{job.source} is given twice")
            elif key in writers:
                problems.append(f"{writers[key]} and {job.source} would both be written to {output}")
            writers[key] = job.source
    return problems


def _run_batch(
    inputs: list[Path],
    out: Path,
    description: str,
    handle: Callable[[_Job], None],
    *,
    recursive: bool,
    skip_existing: bool,
    outputs: Callable[[Path], tuple[Path, ...]] = _same_name,
    log: Path | None = None,
) -> None:
    """Run ``handle`` on every photo with a progress bar; ``outputs`` names the files each
    photo gets under ``out`` from its path under its input folder; ``log`` is a CSV that
    gets a row per photo.

    A batch that would overwrite an input or write one output twice is refused before
    any file is touched (exit 2). A bad file is reported and skipped, the others still get
    their outputs, and the exit status says if any failed (exit 1)."""
    from fundus_restore.io import ImageFileError, find_images

    found = find_images(inputs, recursive=recursive, exclude=out)
    if not found:
        _report_error("no image files found in the given inputs")
        raise typer.Exit(2)
    jobs = [
        _Job(index, source.path, tuple(out / name for name in outputs(source.relative)))
        for index, source in enumerate(found)
    ]
    problems = _conflicts(jobs)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        _report_error(problems[0] + more)
        raise typer.Exit(2)
    _make_output_folder("--out", out)  # else every photo would fail on it, one by one
    failures: list[str] = []
    with _BatchLog(log) as batch_log, _progress() as progress:
        if skip_existing:
            remaining = []
            for job in jobs:
                if all(output.is_file() for output in job.outputs):
                    batch_log.write(job, "skipped")
                else:
                    remaining.append(job)
            jobs = remaining
        progress.console.print(escape(description))  # whole, once: the bar's copy may be cut short
        task = progress.add_task(description, total=len(jobs))
        for job in jobs:
            start = time.perf_counter()
            status = "written"
            try:
                if recursive:
                    _warn_if_made_by_us(job)
                handle(job)
            # A photo too large for the memory fails alone too (MemoryError; torch's allocator raises RuntimeError).
            except (ImageFileError, ValueError, OSError, MemoryError, RuntimeError) as error:
                problem = str(error) or type(error).__name__
                message = problem if problem.startswith(f"{job.source}: ") else f"{job.source}: {problem}"
                failures.append(message)
                _report_error(message, "failed")
                job.messages.append(f"error: {message}")
                status = "failed"
            batch_log.write(job, status, time.perf_counter() - start)
            progress.advance(task)
    skipped = len(found) - len(jobs)
    summary = f"{len(jobs) - len(failures)} of {len(jobs)} images written"
    if failures:
        summary += f", {len(failures)} failed"
    if skipped:
        summary += f", {skipped} skipped (outputs exist)"
    console.print(summary)
    if failures:
        raise typer.Exit(1)


def _warn_if_made_by_us(job: _Job) -> None:
    """Warn when ``job``'s photo is a restored output of fundus-restore (its metadata says so):
    ``-r`` walks a whole tree, where an earlier run's output folder may lie among the photographs.
    Degraded photos are inputs by design; an unreadable file is left for the command to report."""
    from fundus_restore.io import ImageFileError, read_description

    try:
        made = read_description(job.source)
    except ImageFileError:
        return
    if made is not None and " by fundus-restore " in made and not made.startswith("degraded"):
        job.warn(f"an output of an earlier run ({made}), processed again")


def _make_output_folder(option: str, folder: Path) -> None:
    """Create ``folder`` (the folder ``option`` names) before any work, or end the command
    (exit 2) with one line where it cannot be: a file there, a read-only disk."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        _report_error(f"{option} {folder}: a file, not a folder")
        raise typer.Exit(2) from None
    except OSError as error:
        _report_error(f"{option} {folder}: cannot create the folder ({error.strerror or error})")
        raise typer.Exit(2) from None


def _provenance(action: str, job: _Job) -> str:
    """What an output's own metadata says of it: that fundus-restore made it, how, and with
    the model and noise level the log records, so a restored photograph is never taken
    for an original."""
    from fundus_restore import __version__

    details = [f"{key.replace('_', ' ')} {job.record[key]}" for key in ("model", "noise_sigma") if key in job.record]
    described = f"{action} by fundus-restore {__version__}" + (f" ({', '.join(details)})" if details else "")
    return described.encode("ascii", "replace").decode()  # a model file's name may not be ASCII


def _ensemble_note(ensemble: bool) -> str:
    """What an output's description adds when ``--ensemble`` made it (it differs from a single pass)."""
    return " (x8 flip-and-turn ensemble)" if ensemble else ""


def _write_output(job: _Job, image: np.ndarray, action: str, *, bit_depth: int | None = None) -> None:
    """Write ``job``'s output with the input's bit depth (or ``bit_depth``) and its provenance."""
    from fundus_restore.io import image_bit_depth, write_image

    bits = image_bit_depth(job.source) if bit_depth is None else bit_depth
    if bits > 8 and job.outputs[0].suffix.lower() in (".jpg", ".jpeg"):  # e.g. a 16-bit PNG named .jpg
        job.warn(f"a {bits}-bit image in a file named {job.outputs[0].suffix}: written as the 8-bit JPEG its name says")
        bits = 8
    write_image(job.outputs[0], image, bit_depth=bits, description=_provenance(action, job))


def _loaded(load: Callable[[], nn.Module], why: str = "") -> nn.Module:
    """The model ``load`` returns; unusable weights end the command (exit 2) before any file is
    read, the error followed by ``why`` that model was asked for, where the user did not name it."""
    try:
        return load()
    except ValueError as error:  # WeightsError is one
        _report_error(f"{error}{why}")
        raise typer.Exit(2) from None


def _runnable(load: Callable[[], nn.Module], tile: int | None, device: str, why: str = "") -> nn.Module:
    """The model ``load`` returns, refused (see ``_loaded``) for a ``tile`` or ``device`` it cannot
    run with, and a warning when tiles that small cost several times the compute of whole ones."""
    from fundus_restore.inference import check_run_settings, tile_margin, tiling_cost

    network = _loaded(lambda: check_run_settings(load(), tile=tile, device=device), why)
    cost = tiling_cost(network, tile)
    if cost > 4:  # the core of a tile is less than half of it across
        margin = tile_margin(network)
        _report_error(
            f"--tile {tile} keeps as little as {tile - margin} pixels across of each tile ({margin} are overlap): "
            f"for photos larger than the tile, up to about {cost:.0f} times the compute of untiled; --tile "
            f"{2 * margin} or more costs at most 4",
            "warning",
        )
    return network


def _told(network: nn.Module, sigma: float | None) -> nn.Module:
    """``network``, refused when a noise level is given to a blind one (it would be ignored)."""
    from fundus_restore.pretrained import model_name

    if sigma is not None and not getattr(network, "needs_noise_level", False):
        raise ValueError(f"{model_name(network)} is blind: --sigma is for a denoiser told the noise level")
    return network


@app.command()
def denoise(
    inputs: Inputs,
    out: OutDir,
    model: ModelOption = None,
    tile: TileOption = None,
    device: DeviceOption = "auto",
    ensemble: EnsembleOption = False,
    sigma: NoiseLevelOption = None,
    noise_check: NoiseCheckOption = True,
    recursive: RecursiveOption = False,
    skip_existing: SkipExistingOption = False,
    log: LogOption = None,
) -> None:
    """Denoise photographs; writes one output per input with the same name, bit depth and channels (grey stays
    grey; an alpha channel is dropped, and formats it cannot write, such as GIF, become PNG)."""
    from fundus_restore.io import read_image

    denoiser_for, name = _denoisers(model, sigma, tile, device)

    def handle(job: _Job) -> None:
        image = read_image(job.source, rgb=False)
        denoised = _denoised(job, image, denoiser_for(image), sigma, noise_check, tile=tile, device=device,
                             ensemble=ensemble)
        _write_output(job, denoised, "denoised" + _ensemble_note(ensemble))

    _run_batch(
        inputs, out, f"denoising with {name}", handle, recursive=recursive, skip_existing=skip_existing, log=log
    )


def _denoisers(
    model: str | None, sigma: float | None, tile: int | None, device: str, *, small_photos: bool = False,
    why: str = "",
) -> tuple[Callable[[np.ndarray], nn.Module], str]:
    """The denoiser for each photo, and its name for the progress bar: ``model`` for every
    photo, or without one the bundled default of the photo's channels (of small photos
    with ``small_photos``; a grey photo gets the grey one, loaded when the first comes).
    Unusable weights, or a ``tile`` or ``device`` the denoiser cannot run with, end the
    command (exit 2), saying ``why`` that denoiser was chosen."""
    import functools

    from fundus_restore.inference import load_denoiser
    from fundus_restore.pretrained import default_model_name

    def usable(load: Callable[[], nn.Module]) -> nn.Module:
        return _runnable(lambda: _told(load(), sigma), tile, device, why)

    colour = usable(lambda: load_denoiser(model, small_photos=small_photos))
    name = getattr(colour, "name", str(model))
    grey_name = default_model_name(channels=1)
    if model is not None or grey_name == name:
        return (lambda image: colour), name
    grey = functools.cache(lambda: usable(lambda: load_denoiser(channels=1)))
    return (lambda image: grey() if image.shape[2] == 1 else colour), f"{name} ({grey_name} for grey photos)"


def _denoised(
    job: _Job, image: np.ndarray, network: nn.Module, sigma: float | None, noise_check: bool, **options: Any
) -> np.ndarray:
    """``job``'s ``image`` denoised by ``network`` after the noise check; a denoiser told the
    noise level gets ``sigma`` (0-255 scale) or the photo's estimate, made once for it and
    the check. The job records the model and the level it was told."""
    from fundus_restore.inference import denoise, estimated_noise_level, grey_through_colour, input_channels
    from fundus_restore.pretrained import DEFAULT_GREY_MODEL, model_name

    job.record["model"] = model_name(network)
    if grey_through_colour(image, input_channels(network)):
        job.warn(
            f"a grey photograph through a colour denoiser, which removes less noise from it than the "
            f"grey {DEFAULT_GREY_MODEL} (docs/results.md, 'Grey (red-free) photographs')"
        )
    told_level = getattr(network, "needs_noise_level", False)
    # The estimate: what the denoiser is told without --sigma, and what --sigma is checked against.
    level = estimated_noise_level(image) if told_level and (sigma is None or noise_check) else None
    estimated = None if level is None else 255.0 * level
    told = sigma if sigma is not None else estimated
    if told is not None:
        job.record["noise_sigma"] = f"{told:.2f}"
    if noise_check:
        if sigma is not None and estimated is not None and not _plausible_level(sigma, estimated):
            job.warn(f"--sigma {sigma:g} is far from the photo's estimated noise sigma, about {estimated:.1f} "
                     "(both on the 0-255 scale): the denoiser will leave noise or smooth away detail")
        _check_noise_level(job, image, network, estimated)
    return denoise(image, network, sigma=level if sigma is None else sigma / 255.0, **options)


def _plausible_level(told: float, estimated: float) -> bool:
    """Whether a noise level told (0-255) lies within a factor 2 (and 2 levels) of the photo's
    estimate, which is within 1.1 of the true sigma 5-50 on DRIVE and HEI-MED."""
    return estimated / 2 - 2 <= told <= 2 * estimated + 2


def _check_noise_level(job: _Job, image: np.ndarray, network: nn.Module, sigma: float | None = None) -> None:
    """Warn about ``job``'s photo when ``image``'s estimated noise level (``sigma``, 0-255, where
    already made) does not suit ``network``."""
    from fundus_restore.fov import fov_mask
    from fundus_restore.inference import noise_level_mismatch

    # The mask only when the model's card gives a range and no estimate is at hand.
    try:
        mismatch = noise_level_mismatch(image, network, fov_mask, sigma=sigma)
    except ValueError as error:  # an advice, not a reason to fail the photo: e.g. too small to estimate
        job.warn(f"noise level not checked: {error}")
        return
    if mismatch is not None:
        job.warn(mismatch)


def _hallucination_map(upscaled: np.ndarray, hallucinated: np.ndarray) -> np.ndarray:
    """The upscaled image (clipped to [0, 1]; a grey one in colour) with the hallucinated centreline pixels in pure red."""
    from fundus_restore.report import colour_view

    overlay = colour_view(upscaled)
    overlay[hallucinated] = (1.0, 0.0, 0.0)
    return overlay


def _upscale_outputs(check: bool) -> Callable[[Path], tuple[Path, ...]]:
    """What an upscaled photo gets: its output, and with ``--check`` its map, NAME.hallucination.png, beside it."""

    def outputs(relative: Path) -> tuple[Path, ...]:
        (output,) = _same_name(relative)
        return (output, relative.with_name(f"{relative.stem}.hallucination.png")) if check else (output,)

    return outputs


def _write_upscaled(job: _Job, small: np.ndarray, upscaled: np.ndarray, action: str, check: float | None) -> None:
    """Write ``job``'s upscale of ``small`` and, with ``check`` (``--check``'s threshold), its
    hallucination map (the job's second output). The check is made first: a photo it fails on
    gets no output, as its log row says."""
    from fundus_restore.io import write_image

    hallucination_map = None if check is None else _check_hallucinations(job, small, upscaled, check)
    _write_output(job, upscaled, action)
    if hallucination_map is not None:
        write_image(job.outputs[1], hallucination_map,
                    description=_provenance("vessels absent from the bicubic upscale mapped", job))


def _check_hallucinations(job: _Job, image: np.ndarray, upscaled: np.ndarray, threshold: float) -> np.ndarray:
    """The --check guard for one photo: print and record its rate (``evaluate``'s
    ``invented_vs_bicubic``: the share of the upscale's vessel centreline absent from the
    bicubic upscale's, not the spurious rate against a clean photo, which no user has), warn
    when it exceeds ``threshold``, and return the map to write."""
    from fundus_restore.degrade import bicubic_upsample
    from fundus_restore.fov import fov_mask
    from fundus_restore.vessel_metrics import hallucinated_vessels
    from fundus_restore.vessels import image_scale

    reference = bicubic_upsample(image, upscaled.shape[0] // image.shape[0])
    fov = fov_mask(reference)
    if fov.all():  # vessels are sized by the photo's width, which a crop's is not
        job.warn(f"the photo is all field of view (a crop?): --check sizes its vessels as in a whole photograph "
                 f"{upscaled.shape[1]} px wide")
    hallucinated, rate = hallucinated_vessels(upscaled, reference, fov, scale=image_scale(upscaled))
    console.print(f"{escape(str(job.source))}: vessels invented vs bicubic {rate:.3f}")
    job.record["invented_vs_bicubic"] = f"{rate:.4f}"
    if rate > threshold:
        job.warn(
            f"{rate:.1%} of the upscaled vessel centreline is absent from the bicubic upscale "
            f"(threshold {threshold:.1%}): vessels the small image does not show, recovered or invented; "
            f"check them in {job.outputs[1].name}"
        )
    return _hallucination_map(upscaled, hallucinated)


@app.command()
def upscale(
    inputs: Inputs,
    out: OutDir,
    model: UpscaleModelOption = None,
    scale: ScaleOption = None,
    tile: TileOption = None,
    device: DeviceOption = "auto",
    ensemble: EnsembleOption = False,
    check: CheckOption = False,
    check_threshold: CheckThresholdOption = 0.05,
    noise_check: NoiseCheckOption = True,
    recursive: RecursiveOption = False,
    skip_existing: SkipExistingOption = False,
    log: LogOption = None,
) -> None:
    """Super-resolve photographs; writes one output per input with the same name, bit depth and channels (grey stays
    grey; an alpha channel is dropped, and formats it cannot write, such as GIF, become PNG)."""
    from fundus_restore.inference import load_upscaler, upscale as upscale_image, upscale_factor
    from fundus_restore.io import read_image
    from fundus_restore.pretrained import model_name

    network = _runnable(lambda: load_upscaler(model, scale), tile, device)

    def handle(job: _Job) -> None:
        job.record["model"] = model_name(network)
        image = read_image(job.source, rgb=False)
        if noise_check:
            _check_noise_level(job, image, network)
        upscaled = upscale_image(image, network, tile=tile, device=device, ensemble=ensemble)
        _write_upscaled(job, image, upscaled, f"upscaled x{upscale_factor(network)}{_ensemble_note(ensemble)}",
                        check_threshold if check else None)

    _run_batch(
        inputs, out, f"upscaling with {model_name(network)}", handle,
        recursive=recursive, skip_existing=skip_existing, outputs=_upscale_outputs(check), log=log,
    )


@app.command()
def restore(
    inputs: Inputs,
    out: OutDir,
    denoise_model: Annotated[
        Optional[str],
        typer.Option(help=f"{_DENOISE_MODEL_HELP} (default: the one the upscaler was trained behind, if its card "
                     "names one, else the bundled one of small photos, resunet-retina-green-blind-small; grey photos "
                     "get the grey one)."),
    ] = None,
    upscale_model: Annotated[Optional[str], typer.Option(help=_UPSCALE_MODEL_HELP)] = None,
    scale: ScaleOption = None,
    tile: TileOption = None,
    device: DeviceOption = "auto",
    ensemble: EnsembleOption = False,
    sigma: NoiseLevelOption = None,
    check: CheckOption = False,
    check_threshold: CheckThresholdOption = 0.05,
    noise_check: NoiseCheckOption = True,
    recursive: RecursiveOption = False,
    skip_existing: SkipExistingOption = False,
    log: LogOption = None,
) -> None:
    """Denoise then upscale each photograph in one pass (no intermediate files); --check
    guards the upscale against the bicubic upscale of the denoised photo, what the upscaler saw."""
    from fundus_restore.inference import load_upscaler, upscale as upscale_image, upscale_factor
    from fundus_restore.io import read_image
    from fundus_restore.pretrained import model_name

    upscaler = _runnable(lambda: load_upscaler(upscale_model, scale), tile, device)
    behind = upscaler.lr_denoiser if denoise_model is None else None
    why = f" (the denoiser {model_name(upscaler)} was trained behind, from its card; or give --denoise-model)" if behind else ""
    denoiser_for, _ = _denoisers(denoise_model or behind, sigma, tile, device, small_photos=True, why=why)

    def handle(job: _Job) -> None:
        image = read_image(job.source, rgb=False)
        denoised = _denoised(job, image, denoiser_for(image), sigma, noise_check, tile=tile, device=device,
                             ensemble=ensemble)
        job.record["model"] += f" + {model_name(upscaler)}"
        upscaled = upscale_image(denoised, upscaler, tile=tile, device=device, ensemble=ensemble)
        action = f"denoised and upscaled x{upscale_factor(upscaler)}{_ensemble_note(ensemble)}"
        _write_upscaled(job, denoised, upscaled, action, check_threshold if check else None)

    _run_batch(inputs, out, "restoring", handle, recursive=recursive, skip_existing=skip_existing,
               outputs=_upscale_outputs(check), log=log)


@app.command()
def degrade(
    inputs: Inputs,
    out: OutDir,
    sigma: SigmaOption = 25.0,
    seed: SeedOption = 0,
    scale: Annotated[int, typer.Option(min=1, help="Downsampling factor applied before the noise (1 = none).")] = 1,
    kernel: Annotated[
        str, typer.Option(help="Antialiased downsampling kernel: bicubic, bilinear, box or lanczos3 (MATLAB's imresize).")
    ] = "bicubic",
    clip: Annotated[
        bool, typer.Option(help="Clip and quantise to the input's bit depth (camera); --no-clip writes float32 TIFF.")
    ] = True,
    recursive: RecursiveOption = False,
    skip_existing: SkipExistingOption = False,
) -> None:
    """Make degraded copies: downsampling by --scale (bicubic by default), then seeded Gaussian noise.

    By default the noisy images are clipped and quantised to the input's bit depth,
    as a camera's files are; --no-clip keeps the paper's unclipped noise in 32-bit
    float TIFF files (NAME.tif)."""
    from fundus_restore.degrade import KERNELS, add_gaussian_noise, downsample
    from fundus_restore.io import read_image

    if kernel not in KERNELS:
        _report_error(f"unknown --kernel {kernel!r}; known: {', '.join(KERNELS)}")
        raise typer.Exit(2)

    def handle(job: _Job) -> None:
        image = read_image(job.source, rgb=False)  # a grey (red-free) photo stays grey, one noise channel
        steps = []  # for the output's provenance
        if scale > 1:
            image = downsample(image, scale, kernel)
            steps.append(f"shrunk x{scale} by {kernel}")
        if sigma > 0:
            # The seed follows the photo's place among all the inputs, so a resumed batch adds the same noise.
            image = add_gaussian_noise(image, sigma, seed=seed + job.index, clip=clip)
            job.record["noise_sigma"] = f"{sigma:g}"
            steps.append(f"Gaussian noise of seed {seed + job.index}, {'clipped' if clip else 'not clipped'}")
        _write_output(job, image, f"degraded ({'; '.join(steps) or 'unchanged'})", bit_depth=None if clip else 32)

    def outputs(relative: Path) -> tuple[Path, ...]:
        return _same_name(relative) if clip else (relative.with_suffix(".tif"),)

    _run_batch(inputs, out, "degrading", handle, recursive=recursive, skip_existing=skip_existing, outputs=outputs)


@app.command("import-weights")
def import_weights(
    mat_file: Annotated[Path, typer.Argument(help="Official DnCNN MatConvNet .mat file (your own copy).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Convert official DnCNN MatConvNet weights to a safetensors file usable with --model."""
    from fundus_restore.matconvnet import import_weights as convert
    from fundus_restore.pretrained import WeightsError

    try:
        written = convert(mat_file, out, overwrite=overwrite)
    except WeightsError as error:
        _report_error(str(error))
        raise typer.Exit(2) from None
    console.print(f"wrote {written}")


@app.command("list-models")
def list_models() -> None:
    """List the bundled pretrained models with a line from each model card, and the classical denoisers."""
    from fundus_restore.pretrained import WEIGHTLESS_MODELS, list_models as bundled, model_card

    for name in bundled():
        card = model_card(name)
        print(f"{name}\t{card.get('summary', card.get('architecture', ''))}")
    for name in WEIGHTLESS_MODELS:
        print(f"{name}\tclassical denoiser (no weights), told each photo's estimated noise level")


def _training_errors() -> tuple[type[Exception], ...]:
    """What a training run (or a search's trial) reports in one line: its config, its photos, its weights."""
    from fundus_restore.io import ImageFileError
    from fundus_restore.pretrained import WeightsError
    from fundus_restore.train import TrainingError

    return TrainingError, ImageFileError, WeightsError


def parse_override(item: str) -> tuple[str, object]:
    """``key.sub=value`` from ``--set``, the value read as YAML."""
    import yaml

    key, separator, value = item.partition("=")
    if not separator or not key:
        raise typer.BadParameter(f"--set expects key=value, got {item!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise typer.BadParameter(f"--set {item!r}: the value is no YAML ({' '.join(str(error).split())})") from None


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML experiment config (see configs/).")],
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint of this run.")] = False,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value: key.sub=value (YAML value).")
    ] = None,
    data: TrainDataOption = None,
    validate_on: ValidateOnOption = None,
    init_weights: InitWeightsOption = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder: output.")] = None,
    vgg_weights: Annotated[
        Optional[Path],
        typer.Option(help="ImageNet VGG19 weights (torchvision state-dict layout) for a VGG perceptual loss."),
    ] = None,
) -> None:
    """Train a model from a config; checkpoints atomically and resumes exactly.

    The options name the run's paths; they replace the config's placeholders, as --set would
    (and win over a --set of the same key).
    """
    from fundus_restore.train import train_from_config

    overrides = _training_overrides(set_, data, validate_on, init_weights,
                                    {"output": output, "perceptual.vgg_weights": vgg_weights})
    try:
        weights = train_from_config(config, resume=resume, overrides=overrides)
    except _training_errors() as error:
        _report_error(str(error))
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 wrote it
        console.print(f"wrote {weights}")


@app.command("search-loss")
def search_loss(
    config: Annotated[Path, typer.Argument(help="Fine-tuning config to search around (e.g. dncnn-finetune-green.yaml).")],
    out: OutDir,
    trials: Annotated[int, typer.Option(help="Optuna trials after the baseline.")] = 20,
    psnr_tolerance: Annotated[float, typer.Option(help="PSNR (dB) a trial may lose against the baseline.")] = 0.1,
    timeout_minutes: Annotated[
        Optional[float], typer.Option(help="Start no trial after this many minutes (the baseline's included).")
    ] = None,
    set_: Annotated[
        Optional[list[str]], typer.Option("--set", help="Override a config value for every trial: key.sub=value.")
    ] = None,
    data: TrainDataOption = None,
    validate_on: ValidateOnOption = None,
    init_weights: InitWeightsOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the stopped search in --out; its logged trials are not run again.")
    ] = False,
) -> None:
    """Search channel weights and vessel weight for thin-vessel recall and contrast at fixed PSNR."""
    from fundus_restore.search import best_trial, search_loss_weights

    overrides = _training_overrides(set_, data, validate_on, init_weights)
    try:
        results = search_loss_weights(config, out, trials=trials, overrides=overrides, psnr_tolerance=psnr_tolerance,
                                      timeout_minutes=timeout_minutes, resume=resume)
    except _training_errors() as error:
        _report_error(str(error))
        raise typer.Exit(1) from None
    for result in results:
        console.print(
            f"trial {result.number}: R:G:B {':'.join(f'{w:.2f}' for w in result.weights)} vessel {result.vessel_weight:.2f}"
            f"  PSNR {result.psnr:.2f}  thin recall {result.thin_recall:.3f}  contrast {result.thin_contrast_retention:.3f}"
        )
    best = best_trial(results, psnr_tolerance)
    console.print(f"best within {psnr_tolerance} dB of the baseline: trial {best.number} ({best.output})")


@app.command()
def evaluate(
    clean: Annotated[list[Path], typer.Option("--clean", help="Clean photographs (files or folders).")],
    report: Annotated[Path, typer.Option("--report", help="Folder for the tables, report.html and figures/.")],
    sigma: Annotated[
        Optional[list[float]],
        typer.Option(help="Noise level(s) on the 0-255 scale; repeat for several. Default 25; 0 with --scale."),
    ] = None,
    methods: Annotated[
        Optional[list[str]],
        typer.Option("--method", "--methods", help="Method(s) to compare; repeat, or separate by commas. Default: the "
                     "paper's table (with --scale: bicubic and the bundled SR models, and with --sigma too the "
                     "pipelines of restore and of CBM3D; DENOISER>UPSCALER denoises the noisy small photo, then "
                     "upscales it). cbm3d and nlmeans are told the true sigma, a network told the level gets the "
                     "photo's estimate."),
    ] = None,
    protocol: Annotated[list[str], typer.Option(help="paper (float, unclipped) and/or camera (clipped, 8-bit).")] = list(
        ("paper", "camera")
    ),
    official_weights: Annotated[
        Optional[Path], typer.Option(help="Official CDnCNN-B weights (.mat or imported .safetensors) for 'cdncnn-b'.")
    ] = None,
    seed: SeedOption = 0,
    crop: Annotated[Optional[int], typer.Option(help="Evaluate the central CROP² of each photo (after the FOV crop).")] = None,
    vessels: Annotated[
        bool, typer.Option(help="Vessel-preservation columns (expert maps in DRIVE's layout, else the clean photo's).")
    ] = True,
    tile: TileOption = None,
    device: DeviceOption = "auto",
    cache: Annotated[
        Optional[Path],
        typer.Option(help="JSON-lines file of scores: those measured before are reused, new ones added."),
    ] = None,
    scale: Annotated[
        int, typer.Option(help="Super-resolution: shrink each photo SCALE times (bicubic) and compare upscalers.")
    ] = 1,
    segmenter: Annotated[
        str, typer.Option(help="Vessel segmenter behind the vessel columns: hessian (classical) or unet (learned).")
    ] = "hessian",
    lr_kernel: Annotated[
        str, typer.Option(help="With --scale: the kernel that shrinks the photos (bicubic, bilinear, box, lanczos3).")
    ] = "bicubic",
    grey: Annotated[
        bool, typer.Option(help="Score in one channel: the green channel of colour photos, as a red-free photo. "
                                "Grey (red-free) files are always scored grey.")
    ] = False,
) -> None:
    """Degrade clean photos, restore them with each method, write Markdown and CSV tables
    and an HTML report with figures of the first photo."""
    from fundus_restore.evaluate import (
        DEFAULT_GREY_METHODS, DEFAULT_METHODS, DEFAULT_NOISY_UPSCALE_METHODS, DEFAULT_UPSCALE_METHODS, MIN_SCORED_SIZE,
        Example, ScoreCache, build_methods, check_settings, evaluate_images, image_labels, write_tables,
    )
    from fundus_restore.io import ImageFileError, list_images, read_header_of_size
    from fundus_restore.report import write_html_report

    files = list_images(clean)
    if not files:
        _report_error(f"no image files in --clean {' '.join(map(str, clean))}")
        raise typer.Exit(1)
    _make_output_folder("--report", report)
    sigma = sigma or [25.0 if scale == 1 else 0.0]
    if scale > 1:
        defaults = DEFAULT_NOISY_UPSCALE_METHODS if any(sigma) else DEFAULT_UPSCALE_METHODS
    else:
        defaults = DEFAULT_GREY_METHODS if grey else DEFAULT_METHODS
    try:  # everything that can be refused is, before any method runs
        check_settings(protocol, segmenter, lr_kernel, sigmas=sigma, crop_size=crop, scale=scale, grey=grey)
        for path in files:  # a missing, empty or unreadable photo, or one too small to score
            read_header_of_size(path, MIN_SCORED_SIZE, "SSIM's window")
        names = [name.strip() for option in methods or [] for name in option.split(",") if name.strip()]
        if methods is not None and not names:
            raise ValueError("--method names no method")
        chosen = build_methods(names or defaults, official_weights=official_weights, tile=tile, device=device,
                               skip_missing=methods is None, scale=scale)
    except ValueError as error:
        _report_error(str(error))
        raise typer.Exit(1) from None
    steps = len(files) * len(sigma) * len(protocol) * len(chosen)
    examples: list[Example] = []
    try:  # the error is printed after the progress bar's last line
        with _progress() as progress:
            task = progress.add_task("evaluating", total=steps)

            def advance(description: str) -> None:
                progress.update(task, advance=1, description=description)

            rows = evaluate_images(
                files, chosen, sigmas=sigma, protocols=protocol, seed=seed, crop_size=crop, vessels=vessels,
                on_step=advance, on_example=examples.append, cache=ScoreCache(cache) if cache else None, scale=scale,
                segmenter=segmenter, lr_kernel=lr_kernel, grey=True if grey else None,
            )
    except ValueError as error:  # pixel data found corrupt past a sound header, a field of view too small, a NaN output
        _report_error(str(error))
        raise typer.Exit(1) from None
    title = "Denoising" if scale == 1 else f"Super-resolution x{scale}"
    markdown, _ = write_tables(rows, report, title=title)
    settings = {
        "sigmas": ", ".join(f"{s:g}" for s in sigma),
        "noise protocols": ", ".join(protocol),
        "seed": str(seed),
        "methods": ", ".join(m.name for m in chosen),
        "images": f"{len(files)}: " + ", ".join(image_labels(files)),
        "crop": "whole field of view" if crop is None else f"central {crop}²",
        "channels": "grey: the green channel of colour photos" if grey else "colour; grey files grey",
        "vessel segmenter": segmenter,
        "task": "denoising" if scale == 1 else f"super-resolution x{scale} (input: antialiased {lr_kernel} shrink, then noise)",
    }
    write_html_report(rows, report, settings=settings, example=examples[0] if examples else None,
                      title=f"{title} evaluation")
    print(markdown.read_text(encoding="utf-8"))
    console.print(f"wrote {report}/results.md, summary.csv, per_image.csv, report.html, figures/")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the figure and images.")] = Path("out/demo"),
    model: ModelOption = None,
    sigma: SigmaOption = 25.0,
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    tile: TileOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Noise scikit-image's retina photograph, denoise it, print PSNR/SSIM, draw a figure."""
    from skimage import data as skimage_data

    from fundus_restore.degrade import add_gaussian_noise
    from fundus_restore.fov import fov_mask
    from fundus_restore.inference import denoise as denoise_image, input_channels, load_denoiser
    from fundus_restore.io import write_image
    from fundus_restore.metrics import image_quality
    from fundus_restore.pretrained import model_name
    from fundus_restore.report import comparison_figure, thin_vessel_window

    clean = skimage_data.retina().astype(np.float32) / 255.0
    mask = fov_mask(clean)
    noisy = add_gaussian_noise(clean, sigma, seed=seed)

    def colour_denoiser() -> nn.Module:
        network = load_denoiser(model)
        channels = input_channels(network)
        if channels not in (None, 3):
            raise ValueError(f"{model_name(network)} takes {channels}-channel images; the demo's photograph is colour")
        return network

    network = _runnable(colour_denoiser, tile, device)
    _make_output_folder("--out", out)  # before the minute of denoising, not after it
    name = getattr(network, "name", str(model))
    console.print(f"denoising the {clean.shape[1]}×{clean.shape[0]} retina photo (sigma {sigma:g}) with {name} …")
    restored = denoise_image(noisy, network, tile=tile, device=device)

    before, after = image_quality(clean, noisy, mask=mask), image_quality(clean, restored, mask=mask)
    width = max(len(name), 5) + 2
    print(f"{'':{width}}{'PSNR':>8}{'SSIM':>8}{'PSNR-FOV':>10}{'SSIM-FOV':>10}")
    for label, quality in (("noisy", before), (name, after)):
        print(f"{label:{width}}{quality['psnr']:8.2f}{quality['ssim']:8.4f}{quality['psnr_fov']:10.2f}{quality['ssim_fov']:10.4f}")

    write_image(out / "noisy.png", noisy)
    write_image(out / "restored.png", restored)
    size = 160
    figure = comparison_figure(
        {"noisy": noisy, f"restored ({name})": restored, "clean": clean},
        out / "demo.png",
        zoom=(*thin_vessel_window(clean, mask, size), size),
        captions={
            "noisy": f"PSNR {before['psnr_fov']:.2f} dB, SSIM {before['ssim_fov']:.3f} (FOV)",
            f"restored ({name})": f"PSNR {after['psnr_fov']:.2f} dB, SSIM {after['ssim_fov']:.3f} (FOV)",
        },
    )
    console.print(f"wrote {figure}")


def _warn_in_one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the command line: ``warning: MESSAGE``, as the commands'
    own warnings read, not Python's file, line number and source line."""
    _report_error(str(message), "warning")


def main() -> None:
    # Before any work: DataLoader workers forked later inherit it (a skipped training photo warns there).
    warnings.showwarning = _warn_in_one_line
    # SIGTERM (a scheduler's stop) unwinds like Ctrl-C, so a file being written is cleaned away.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    app()


if __name__ == "__main__":
    main()
