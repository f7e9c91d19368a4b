"""The command line: batch behaviour, bad files, outputs, and the entry points."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fundus_restore import denoise, load_model, save_model, upscale
from fundus_restore.cli import app
from fundus_restore.degrade import add_gaussian_noise
from fundus_restore.io import image_bit_depth, read_description, read_image, write_image
from fundus_restore.models import create_model

from conftest import shared_path

runner = CliRunner()


@pytest.fixture
def tiny_model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "tiny.safetensors")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in put (1)"
    rng = np.random.default_rng(0)
    write_image(folder / "a (1).png", rng.random((40, 50, 3)), bit_depth=8)
    write_image(folder / "b.tif", rng.random((33, 47, 3)), bit_depth=16)
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_denoise_batch_goes_on_past_a_bad_file_and_fails_at_the_end(photos: Path, tiny_model_file: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["denoise", str(photos), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu"])
    assert result.exit_code == 1
    assert "broken.png" in result.output
    assert "2 of 3 images written, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a (1).png", "b.tif"]
    # Same bit depth as the input, same size, and what the model really computes.
    assert image_bit_depth(out / "b.tif") == 16
    expected = load_model(tiny_model_file)(torch.from_numpy(read_image(photos / "b.tif")).permute(2, 0, 1)[None])
    expected = expected[0].permute(1, 2, 0).detach().numpy().clip(0, 1)
    assert np.abs(read_image(out / "b.tif") - expected).max() < 2 / 65535


def test_outputs_say_in_their_metadata_how_they_were_made(photos: Path, tiny_model_file: Path, tmp_path: Path):
    from fundus_restore import __version__

    runner.invoke(app, ["denoise", str(photos), "-o", str(tmp_path / "out"), "-m", str(tiny_model_file)])
    assert read_description(tmp_path / "out" / "b.tif") == f"denoised by fundus-restore {__version__} (model tiny)"
    runner.invoke(app, ["degrade", str(photos), "-o", str(tmp_path / "noisy"), "--seed", "4", "--scale", "2"])
    assert read_description(tmp_path / "noisy" / "b.tif") == (  # the second photo: seed 4 + 1
        f"degraded (shrunk x2 by bicubic; Gaussian noise of seed 5, clipped) by fundus-restore {__version__} "
        "(noise sigma 25)"
    )


def test_denoise_warns_when_the_noise_level_is_not_the_models(tiny_model_file: Path, tmp_path: Path):
    # A model whose card says sigma 25, a photo at sigma 10: warned, named, and still written.
    (tiny_model_file.with_suffix(".json")).write_text('{"recipe": {"noise": {"sigma": 25}}}')
    photo = tmp_path / "in" / "quiet.png"
    write_image(photo, np.clip(add_gaussian_noise(np.full((48, 48, 3), 0.5, np.float32), 10, seed=0), 0, 1), bit_depth=8)
    args = ["denoise", str(photo), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file), "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and (tmp_path / "out" / "quiet.png").is_file()
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "warning:" in said and "quiet.png: noise sigma about 10." in said and "smooth away fine detail" in said
    result = runner.invoke(app, [*args, "--no-noise-check"])
    assert result.exit_code == 0 and "warning" not in result.output


def test_denoise_with_unusable_weights_stops_before_touching_any_file(photos: Path, tmp_path: Path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    result = runner.invoke(app, ["denoise", str(photos), "-o", str(tmp_path / "out"), "--model", str(bad)])
    assert result.exit_code == 2
    assert "bad.safetensors" in result.output
    assert not (tmp_path / "out").exists()


def test_degrade_is_seeded_and_downsamples(photos: Path, tmp_path: Path):
    good = photos / "a (1).png"
    args = ["degrade", str(good), "--sigma", "25", "--seed", "3", "--scale", "2"]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "one")]).exit_code == 0
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "two")]).exit_code == 0
    first, second = read_image(tmp_path / "one" / good.name), read_image(tmp_path / "two" / good.name)
    assert first.shape == (20, 25, 3)
    np.testing.assert_array_equal(first, second)
    other_seed = tmp_path / "three"
    runner.invoke(app, ["degrade", str(good), "--sigma", "25", "--seed", "4", "--scale", "2", "-o", str(other_seed)])
    assert not np.array_equal(first, read_image(other_seed / good.name))
    box = tmp_path / "box"
    assert runner.invoke(app, ["degrade", str(good), "--sigma", "0", "--scale", "2", "--kernel", "box", "-o", str(box)]).exit_code == 0
    clean = read_image(good)[:40, :50]
    np.testing.assert_allclose(read_image(box / good.name), clean.reshape(20, 2, 25, 2, 3).mean(axis=(1, 3)), atol=0.501 / 255)
    refused = runner.invoke(app, ["degrade", str(good), "--kernel", "nearest", "-o", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "unknown --kernel 'nearest'" in refused.output
    for option, value in [("--sigma", "-1"), ("--scale", "0"), ("--seed", "-1")]:  # refused by the parser
        refused = runner.invoke(app, ["degrade", str(good), option, value, "-o", str(tmp_path / "x")])
        assert refused.exit_code == 2 and "Invalid value" in refused.output and option in refused.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["degrade", "denoise"])
def test_a_batch_that_would_overwrite_its_inputs_is_refused_before_any_file_is_touched(
    command: str, photos: Path, tiny_model_file: Path
):
    before = {path.name: path.read_bytes() for path in photos.iterdir()}
    model = ["--model", str(tiny_model_file)] if command == "denoise" else []
    result = runner.invoke(app, [command, str(photos), "-o", str(photos), *model])
    assert result.exit_code == 2
    assert "would overwrite the input" in result.output and "(and 2 more)" in result.output
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before


def test_two_photos_with_one_output_name_are_refused(tmp_path: Path):
    rng = np.random.default_rng(0)
    for name in ["left/x.png", "right/x.png", "right/y.png"]:
        write_image(tmp_path / name, rng.random((16, 16, 3)))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "right/y.bmp")  # written as y.png
    out = tmp_path / "out"
    result = runner.invoke(app, ["degrade", str(tmp_path / "left"), str(tmp_path / "right"), "-o", str(out)])
    assert result.exit_code == 2
    both = f"{tmp_path / 'left/x.png'} and {tmp_path / 'right/x.png'} would both be written to {out / 'x.png'}"
    assert both in result.output
    assert "(and 1 more)" in result.output  # y.bmp becomes y.png too
    twice = runner.invoke(app, ["degrade", str(tmp_path / "left"), str(tmp_path / "left/x.png"), "-o", str(out)])
    assert twice.exit_code == 2 and f"{tmp_path / 'left/x.png'} is given twice" in twice.output
    assert not out.exists()


def test_recursive_mirrors_the_tree_without_hidden_folders_or_the_output_folder(tmp_path: Path):
    photos = tmp_path / "archive"
    rng = np.random.default_rng(0)
    for name in ["top.png", "patient 1/left.png", "patient 2/left.png", ".cache/thumb.png", "restored/old.png"]:
        write_image(photos / name, rng.random((16, 16, 3)))
    out = photos / "restored"  # inside the tree: never read back as input
    result = runner.invoke(app, ["degrade", "-r", str(photos), "-o", str(out), "--sigma", "0"])
    assert result.exit_code == 0, result.output
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*.png"))
    assert written == ["old.png", "patient 1/left.png", "patient 2/left.png", "top.png"]
    np.testing.assert_array_equal(read_image(out / "patient 2/left.png"), read_image(photos / "patient 2/left.png"))
    # Without -r only the folder's own photos are taken.
    flat = runner.invoke(app, ["degrade", str(photos), "-o", str(tmp_path / "flat"), "--sigma", "0"])
    assert flat.exit_code == 0 and [path.name for path in (tmp_path / "flat").iterdir()] == ["top.png"]
    # Degraded photos are what denoise is for: no word of them under -r.
    denoised = runner.invoke(app, ["denoise", "-r", str(photos), "-o", str(tmp_path / "denoised"), "-m",
                                   "dncnn-small-demo", "--device", "cpu", "--no-noise-check"])
    assert denoised.exit_code == 0 and "earlier run" not in denoised.output
    # A later -r run finds the denoised outputs moved into the tree: processed, and said.
    (tmp_path / "denoised").rename(photos / "denoised")
    again = runner.invoke(app, ["degrade", "-r", str(photos), "-o", str(tmp_path / "again"), "--sigma", "0"])
    said = " ".join(again.output.split())
    assert again.exit_code == 0 and said.count(", processed again") == 7  # every denoised photo
    assert f"warning: {photos / 'denoised' / 'top.png'}: an output of an earlier run (denoised by fundus-restore" in said


def test_skip_existing_resumes_a_batch_with_the_same_noise(photos: Path, tmp_path: Path):
    out = tmp_path / "out"
    args = ["degrade", str(photos), "-o", str(out), "--sigma", "25", "--seed", "7"]
    assert runner.invoke(app, args).exit_code == 1  # broken.png fails, the two others are written
    second = (out / "b.tif").read_bytes()
    (out / "b.tif").unlink()  # as if the run had stopped before it
    write_image(out / "a (1).png", np.zeros((40, 50, 3)))  # an existing output is kept as it is
    result = runner.invoke(app, [*args, "--skip-existing"])
    assert "1 of 2 images written, 1 failed, 1 skipped (outputs exist)" in result.output
    assert (out / "b.tif").read_bytes() == second  # its seed follows its place among all the inputs
    assert read_image(out / "a (1).png").max() == 0


def _log_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_log_records_each_photo_and_is_appended_to_by_a_resumed_batch(
    photos: Path, tiny_model_file: Path, tmp_path: Path
):
    out, log = tmp_path / "out", tmp_path / "logs" / "run.csv"
    args = ["denoise", str(photos), "-o", str(out), "--model", str(tiny_model_file), "--device", "cpu"]
    args += ["--log", str(log)]
    assert runner.invoke(app, args).exit_code == 1
    rows = _log_rows(log)
    assert [(Path(row["input"]).name, row["status"]) for row in rows] == [
        ("a (1).png", "written"), ("b.tif", "written"), ("broken.png", "failed")
    ]
    assert rows[0]["model"] == "tiny" and rows[0]["outputs"] == str(out / "a (1).png")
    assert float(rows[0]["seconds"]) >= 0 and rows[0]["message"] == "" and rows[0]["noise_sigma"] == ""  # blind
    assert rows[2]["message"].startswith(f"error: {photos / 'broken.png'}: ") and rows[2]["outputs"] == ""
    assert runner.invoke(app, [*args, "--skip-existing"]).exit_code == 1
    rows = _log_rows(log)  # one header, the first run's rows, then the second's
    assert [row["status"] for row in rows] == ["written", "written", "failed", "skipped", "skipped", "failed"]
    assert rows[3]["seconds"] == ""
    (tmp_path / "folder.csv").mkdir()
    refused = runner.invoke(app, [*args[:-1], str(tmp_path / "folder.csv")])
    assert refused.exit_code == 2
    assert refused.output.startswith(f"error: {tmp_path / 'folder.csv'}: cannot write the log")


def test_import_weights_round_trip(tmp_path: Path):
    mat = shared_path("weights", "dncnn", "GD_Color_Blind.mat")
    out = tmp_path / "cdncnn-b.safetensors"
    result = runner.invoke(app, ["import-weights", str(mat), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config["depth"] == 20 and model.config["channels"] == 3
    # Run again, it keeps the file unless told to replace it.
    again = runner.invoke(app, ["import-weights", str(mat), "-o", str(out)])
    assert again.exit_code == 2 and again.output == f"error: {out}: exists; replace it with --overwrite\n"
    assert runner.invoke(app, ["import-weights", str(mat), "-o", str(out), "--overwrite"]).exit_code == 0


def test_import_weights_rejects_a_corrupt_file(tmp_path: Path):
    fake = tmp_path / "fake (copy).mat"
    fake.write_text("hello")
    result = runner.invoke(app, ["import-weights", str(fake), "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert "fake (copy).mat" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "fundus_restore", "--help"], capture_output=True, text=True, check=True)
    assert "denoise" in result.stdout and "import-weights" in result.stdout


def test_demo_restores_the_retina_photo_with_the_bundled_model(tmp_path: Path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if "PSNR-FOV" in line)
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[header + 1 : header + 3]}
    noisy, restored = rows.pop("noisy"), next(iter(rows.values()))
    assert restored[2] > noisy[2] + 10  # PSNR inside the field of view, dB
    assert restored[3] > noisy[3] + 0.5  # SSIM inside the field of view
    assert {"demo.png", "noisy.png", "restored.png"} <= {p.name for p in tmp_path.iterdir()}


def test_degrade_without_clipping_keeps_the_exact_float_noise(photos: Path, tmp_path: Path):
    from fundus_restore.degrade import add_gaussian_noise

    good = photos / "a (1).png"
    result = runner.invoke(app, ["degrade", str(good), "--sigma", "25", "--seed", "7", "--no-clip", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = read_image(tmp_path / "a (1).tif")
    np.testing.assert_array_equal(written, add_gaussian_noise(read_image(good), 25, seed=7))
    assert written.min() < 0 or written.max() > 1  # unclipped
    assert image_bit_depth(tmp_path / "a (1).tif") == 32


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("optimizer.lr=1.0e-5", ("optimizer.lr", 1e-5)),
        ("steps=400", ("steps", 400)),
        ("data.train=[a b, c]", ("data.train", ["a b", "c"])),
        ("output=runs/x", ("output", "runs/x")),
    ],
)
def test_set_overrides_are_read_as_yaml(item: str, expected: tuple):
    from fundus_restore.cli import parse_override

    assert parse_override(item) == expected


def test_set_override_without_a_value_is_refused():
    import typer

    from fundus_restore.cli import parse_override

    with pytest.raises(typer.BadParameter):
        parse_override("steps")


@pytest.fixture
def tiny_upscaler_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(create_model("srresnet", blocks=2, width=16, scale=2), tmp_path / "sr.safetensors")


def test_upscale_batch_goes_on_past_a_bad_file_and_fails_at_the_end(
    photos: Path, tiny_upscaler_file: Path, tmp_path: Path
):
    out = tmp_path / "out"
    args = ["upscale", str(photos), "-o", str(out), "--model", str(tiny_upscaler_file), "--device", "cpu", "--tile", "30"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "broken.png" in result.output
    assert "2 of 3 images written, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a (1).png", "b.tif"]
    assert image_bit_depth(out / "b.tif") == 16
    expected = upscale(read_image(photos / "b.tif"), tiny_upscaler_file, device="cpu").clip(0, 1)
    assert read_image(out / "b.tif").shape == (66, 94, 3)
    assert np.abs(read_image(out / "b.tif") - expected).max() < 2 / 65535


def test_upscale_at_a_scale_with_no_bundled_model_says_so(photos: Path, tmp_path: Path):
    result = runner.invoke(app, ["upscale", str(photos), "-o", str(tmp_path / "out"), "--scale", "2"])
    assert result.exit_code == 2
    assert "no x2 super-resolution model is bundled" in result.output and "(upscale --model, restore --upscale-model)" in result.output
    assert not (tmp_path / "out").exists()


def test_upscale_refuses_a_model_of_another_scale(photos: Path, tiny_upscaler_file: Path, tmp_path: Path):
    args = ["upscale", str(photos), "-o", str(tmp_path / "out"), "-m", str(tiny_upscaler_file), "--scale", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "upscales by 2, not by the asked 4" in result.output
    assert not (tmp_path / "out").exists()


def test_upscale_refuses_a_denoiser_before_touching_any_file(photos: Path, tiny_model_file: Path, tmp_path: Path):
    result = runner.invoke(app, ["upscale", str(photos), "-o", str(tmp_path / "out"), "-m", str(tiny_model_file)])
    assert result.exit_code == 2
    assert "not a super-resolution model" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["denoise", "restore"])
def test_denoising_commands_refuse_a_model_that_is_no_denoiser(
    command: str, photos: Path, tiny_upscaler_file: Path, tmp_path: Path
):
    option = "-m" if command == "denoise" else "--denoise-model"
    result = runner.invoke(app, [command, str(photos), "-o", str(tmp_path / "out"), option, str(tiny_upscaler_file)])
    assert result.exit_code == 2 and "is not a denoiser" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["denoise", "upscale", "restore"])
@pytest.mark.parametrize(
    ("option", "problem"),
    [(["--tile", "7"], "tile 7 is too small for "), (["--device", "tpu"], "unknown device 'tpu'")],
)
def test_a_tile_or_device_a_model_cannot_run_with_stops_the_batch_before_any_file(
    command: str, option: list[str], problem: str, photos: Path, tmp_path: Path
):
    result = runner.invoke(app, [command, str(photos), "-o", str(tmp_path / "out"), *option])
    assert result.exit_code == 2 and result.output.startswith(f"error: {problem}") and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_or_a_scale_nothing_bundled_has_stops_before_any_photo(photos: Path, tmp_path: Path):
    log = tmp_path / "run.csv"
    log.write_text("kept\n")
    result = runner.invoke(app, ["denoise", str(photos), "-o", str(log)])
    assert result.exit_code == 2 and result.output.startswith(f"error: --out {log}: a file, not a folder")
    assert log.read_text() == "kept\n"
    result = runner.invoke(app, ["restore", str(photos), "-o", str(tmp_path / "out"), "--scale", "3"])
    assert result.exit_code == 2 and "no x3 super-resolution model is bundled" in result.output
    assert "restore --upscale-model" in result.output and not (tmp_path / "out").exists()
    for scale in ("1", "0"):  # no model enlarges by these: the option's range says so
        result = runner.invoke(app, ["upscale", str(photos), "-o", str(tmp_path / "one"), "--scale", scale])
        assert result.exit_code == 2 and "greater than or equal to 2" in " ".join(result.output.split())


def test_the_log_takes_names_that_are_not_utf8_and_a_full_disk_does_not_stop_the_batch(
    photos: Path, tiny_model_file: Path, tmp_path: Path
):
    (photos / "broken.png").unlink()
    latin1 = Path(os.fsdecode(bytes(photos) + b"/caf\xe9.png"))  # an old archive's Latin-1 name
    latin1.write_bytes((photos / "a (1).png").read_bytes())
    args = ["denoise", str(photos), "-m", str(tiny_model_file), "--device", "cpu", "--no-noise-check"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out"), "--log", str(tmp_path / "log.csv")])
    assert result.exit_code == 0 and "3 of 3 images written" in result.output, result.output
    rows = _log_rows(tmp_path / "log.csv")
    assert [row["status"] for row in rows] == ["written"] * 3 and any("caf\\udce9.png" in row["input"] for row in rows)  # the byte, escaped
    # A log that can no longer be written (the disk filled up) is warned about once; the photos are not blamed.
    def disk_full(self: csv.DictWriter, row: dict) -> None:
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(csv.DictWriter, "writerow", disk_full)
        result = runner.invoke(app, [*args, "-o", str(tmp_path / "full"), "--log", str(tmp_path / "log.csv")])
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "3 of 3 images written" in said and len(list((tmp_path / "full").iterdir())) == 3
    assert said.count(f"warning: {tmp_path / 'log.csv'}: cannot write the log (No space left on device); the batch "
                      "goes on without it") == 1


def test_a_photo_that_runs_out_of_memory_fails_alone(
    photos: Path, tiny_model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from fundus_restore import inference

    denoising = inference.denoise

    def out_of_memory_on_b(image: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        if image.shape[:2] == (33, 47):  # b.tif
            raise MemoryError("Unable to allocate 549. MiB")
        return denoising(image, *args, **kwargs)

    monkeypatch.setattr(inference, "denoise", out_of_memory_on_b)
    log = tmp_path / "log.csv"
    result = runner.invoke(app, ["denoise", str(photos), "-o", str(tmp_path / "out"), "-m", str(tiny_model_file),
                                 "--device", "cpu", "--log", str(log)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 of 3 images written, 2 failed" in said
    assert f"failed: {photos / 'b.tif'}: Unable to allocate 549. MiB" in said
    assert [row["status"] for row in _log_rows(log)] == ["written", "failed", "failed"]


def test_a_photo_the_check_fails_on_gets_no_output(
    tiny_upscaler_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from fundus_restore import vessel_metrics

    def failing(*args: object, **kwargs: object) -> None:
        raise ValueError("the check failed")

    monkeypatch.setattr(vessel_metrics, "hallucinated_vessels", failing)
    write_image(tmp_path / "in" / "a.png", np.random.default_rng(0).random((40, 50, 3)))
    log = tmp_path / "log.csv"
    result = runner.invoke(app, ["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m",
                                 str(tiny_upscaler_file), "--device", "cpu", "--check", "--log", str(log)])
    assert result.exit_code == 1 and "the check failed" in result.output
    assert not list((tmp_path / "out").iterdir())  # as the log says: failed, no outputs
    (row,) = _log_rows(log)
    assert row["status"] == "failed" and row["outputs"] == ""


def test_a_16_bit_image_named_jpg_is_written_as_the_8_bit_jpeg_its_name_says(tiny_model_file: Path, tmp_path: Path):
    import imagecodecs

    folder = tmp_path / "in"
    folder.mkdir()
    samples = (np.random.default_rng(0).random((40, 50, 3)) * 65535).astype(np.uint16)
    (folder / "x.jpg").write_bytes(imagecodecs.png_encode(samples))  # read by its content: a 16-bit PNG
    result = runner.invoke(app, ["denoise", str(folder), "-o", str(tmp_path / "out"), "-m", str(tiny_model_file),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "x.jpg: a 16-bit image in a file named .jpg: written as the 8-bit JPEG its name says" in said
    assert (tmp_path / "out" / "x.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    assert read_image(tmp_path / "out" / "x.jpg").shape == (40, 50, 3)


def test_a_tile_whose_core_is_small_is_warned_about_once_with_its_cost(photos: Path, tiny_model_file: Path, tmp_path: Path):
    # The tiny DnCNN's overlap is 3: a tile of 8 keeps 2 pixels across, 16 times the compute.
    args = ["denoise", str(photos / "a (1).png"), "-m", str(tiny_model_file), "--device", "cpu"]
    slow = runner.invoke(app, [*args, "-o", str(tmp_path / "slow"), "--tile", "8"])
    assert slow.exit_code == 0 and " ".join(slow.output.split()).count(
        "warning: --tile 8 keeps as little as 2 pixels across of each tile (6 are overlap): for photos larger than "
        "the tile, up to about 16 times the compute of untiled; --tile 12 or more costs at most 4") == 1
    fine = runner.invoke(app, [*args, "-o", str(tmp_path / "fine"), "--tile", "12"])
    assert fine.exit_code == 0 and "warning" not in fine.output
    assert np.array_equal(read_image(tmp_path / "slow" / "a (1).png"), read_image(tmp_path / "fine" / "a (1).png"))


def test_demo_with_a_grey_model_says_so_in_one_line(tmp_path: Path):
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "-m", "resunet-retina-grey-blind"])
    assert result.exit_code == 2 and not (tmp_path / "demo").exists()
    assert "resunet-retina-grey-blind takes 1-channel images; the demo's photograph is colour" in result.output


def test_demo_with_an_unknown_model_says_so_in_one_line(tmp_path: Path):
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "-m", "no-such-model"])
    assert result.exit_code == 2 and "no-such-model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "demo").exists()
    # An output folder that cannot be one is refused before the photo is denoised.
    (tmp_path / "taken").write_text("a file")
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "taken"), "-m", "dncnn-small-demo"])
    assert result.exit_code == 2 and result.output == f"error: --out {tmp_path / 'taken'}: a file, not a folder\n"


def test_denoise_writes_a_photo_too_small_to_check_its_noise_level(tiny_model_file: Path, tmp_path: Path):
    (tiny_model_file.with_suffix(".json")).write_text('{"recipe": {"noise": {"sigma": 25}}}')
    write_image(tmp_path / "in" / "tiny.png", np.full((1, 1, 3), 0.5, np.float32))  # no 2×2 block
    args = ["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_file)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0 and (tmp_path / "out" / "tiny.png").is_file()
    assert "tiny.png: noise level not checked:" in " ".join(result.output.split())


def test_tables_are_written_in_utf_8_whatever_the_locale(tmp_path: Path):
    # sigma is a Greek letter: under the C locale (or Windows' cp1252) the default encoding cannot write it.
    write_image(tmp_path / "clean" / "eye.png", np.full((48, 48, 3), 0.5, np.float32))
    command = [sys.executable, "-m", "fundus_restore", "evaluate", "--clean", str(tmp_path / "clean"),
               "--report", str(tmp_path / "report"), "--method", "noisy", "--no-vessels", "--protocol", "camera"]
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                   "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", env=environment)
    assert result.returncode == 0, result.stderr
    assert "σ" in (tmp_path / "report" / "results.md").read_text(encoding="utf-8")


def test_upscale_check_writes_the_map_and_prints_the_rate(tiny_upscaler_file: Path, tmp_path: Path):
    from fundus_restore import __version__

    folder = tmp_path / "in"
    rows, cols = np.mgrid[:40, :50]
    disc = (rows - 20) ** 2 + (cols - 25) ** 2 < 19**2  # a field of view on its black surround
    write_image(folder / "a.png", np.random.default_rng(0).random((40, 50, 3)) * disc[..., None], bit_depth=8)
    out = tmp_path / "out"
    args = ["upscale", str(folder), "-o", str(out), "-m", str(tiny_upscaler_file), "--device", "cpu", "--check"]
    result = runner.invoke(app, [*args, "--check-threshold", "1.0"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.hallucination.png", "a.png"]
    assert read_image(out / "a.hallucination.png").shape == (80, 100, 3)
    assert read_description(out / "a.hallucination.png") == (  # a map is never taken for a photograph either
        f"vessels absent from the bicubic upscale mapped by fundus-restore {__version__} (model sr)"
    )
    assert "a.png: vessels invented vs bicubic" in result.output and "warning" not in result.output
    # A threshold of 0 turns any invented centreline into a warning naming the file; a share above 1 is no threshold.
    assert runner.invoke(app, [*args, "--check-threshold", "5"]).exit_code == 2
    result = runner.invoke(app, [*args, "--check-threshold", "0"])
    assert result.exit_code == 0 and "warning:" in result.output and "a.png" in result.output
    # The log keeps the rate and the warning of each photo.
    log = tmp_path / "check.csv"
    runner.invoke(app, [*args, "--check-threshold", "0", "--log", str(log)])
    (row,) = _log_rows(log)
    assert row["outputs"] == f"{out / 'a.png'};{out / 'a.hallucination.png'}" and row["model"] == "sr"
    assert float(row["invented_vs_bicubic"]) > 0 and row["message"].startswith("warning: ")
    assert "check them in a.hallucination.png" in row["message"]
    # A photo is done when its map is written too: --skip-existing redoes it without one.
    (out / "a.hallucination.png").unlink()
    assert "1 of 1 images written" in runner.invoke(app, [*args, "--skip-existing"]).output
    assert "0 of 0 images written, 1 skipped" in runner.invoke(app, [*args, "--skip-existing"]).output
    # A crop from inside the disc: its vessels are sized by its own width, which the warning says.
    write_image(folder / "a.png", np.random.default_rng(0).random((40, 50, 3)), bit_depth=8)
    result = runner.invoke(app, [*args, "--check-threshold", "1.0"])
    assert result.exit_code == 0 and "the photo is all field of view (a crop?): --check sizes its vessels as in a " \
        "whole photograph 100 px wide" in " ".join(result.output.split())


@pytest.mark.parametrize("command", ["upscale", "restore"])
def test_the_guard_maps_a_vessel_the_upscaler_adds_and_stays_quiet_when_it_adds_none(
    command: str, tiny_model_file: Path, tiny_upscaler_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from fundus_restore import inference
    from fundus_restore.degrade import bicubic_upsample

    rows, cols = np.mgrid[:160, :160] / 160
    disk = ((rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.45**2)[..., None]
    folder = tmp_path / "in"
    write_image(folder / "a.png", np.where(disk, [0.7, 0.4, 0.2] * (0.9 + 0.1 * cols[..., None]), 0.0), bit_depth=16)
    invented = np.zeros((320, 320), dtype=bool)
    invented[158:161, 80:240] = True  # a thin dark vessel across the field of view, absent from the input

    def upscaler_adding(line: bool):
        def upscale(image: np.ndarray, network: object, **_: object) -> np.ndarray:
            upscaled = bicubic_upsample(image, 2)
            return np.where(invented[..., None], 0.6 * upscaled, upscaled) if line else upscaled
        return upscale

    args = [command, str(folder), "-m" if command == "upscale" else "--upscale-model", str(tiny_upscaler_file),
            "--device", "cpu", "--check"] + (["--denoise-model", str(tiny_model_file)] if command == "restore" else [])
    for line, out in ((False, tmp_path / "plain"), (True, tmp_path / "line")):
        monkeypatch.setattr(inference, "upscale", upscaler_adding(line))
        result = runner.invoke(app, [*args, "-o", str(out)])  # the default threshold, 5 %
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in out.iterdir()) == ["a.hallucination.png", "a.png"]
        marked = read_image(out / "a.hallucination.png")
        red = (marked[..., 0] > 0.9) & (marked[..., 1] < 0.1) & (marked[..., 2] < 0.1)
        if not line:  # bicubic itself: nothing absent from the bicubic upscale
            assert "invented vs bicubic 0.000" in result.output and "warning" not in result.output
            assert not red.any()
        else:
            assert "warning:" in result.output and "check them in a.hallucination.png" in result.output
            assert red.sum() > 100 and not red[~invented].any()  # its centreline, and only there


@pytest.mark.parametrize("command", ["denoise", "upscale", "restore"])
def test_a_grey_photograph_comes_back_grey(
    command: str, tiny_model_file: Path, tiny_upscaler_file: Path, tmp_path: Path
):
    photo = write_image(tmp_path / "in" / "red-free.png", np.random.default_rng(0).random((40, 50, 1)), bit_depth=16)
    models = {
        "denoise": ["-m", str(tiny_model_file)],
        "upscale": ["-m", str(tiny_upscaler_file), "--check", "--check-threshold", "1.0"],
        "restore": ["--denoise-model", str(tiny_model_file), "--upscale-model", str(tiny_upscaler_file)],
    }[command]
    result = runner.invoke(app, [command, str(photo), "-o", str(tmp_path / "out"), *models, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    grey = read_image(photo, rgb=False)
    expected = grey if command == "upscale" else denoise(grey, tiny_model_file, device="cpu")
    if command != "denoise":
        expected = upscale(expected, tiny_upscaler_file, device="cpu")
    written = read_image(tmp_path / "out" / "red-free.png", rgb=False)
    assert written.shape == expected.shape and image_bit_depth(tmp_path / "out" / "red-free.png") == 16
    assert np.abs(written - expected.clip(0, 1)).max() < 2 / 65535
    # Denoising it through a colour model is worth a warning; the guard's map is in colour.
    said = " ".join(result.output.split())
    assert ("red-free.png: a grey photograph through a colour denoiser" in said) == (command != "upscale")
    if command == "upscale":
        assert read_image(tmp_path / "out" / "red-free.hallucination.png", rgb=False).shape == (80, 100, 3)


def test_degrade_keeps_a_grey_photograph_grey_with_one_noise_channel(tmp_path: Path):
    grey = np.full((40, 50, 1), 0.5)
    photo = write_image(tmp_path / "in" / "red-free.png", grey, bit_depth=8)
    for scale in ("1", "2"):
        out = tmp_path / f"out{scale}"
        result = runner.invoke(app, ["degrade", str(photo), "-o", str(out), "--sigma", "25", "--scale", scale])
        assert result.exit_code == 0, result.output
        written = read_image(out / "red-free.png", rgb=False)
        assert written.shape == (40 // int(scale), 50 // int(scale), 1)
        assert 20 < 255 * np.std(written) < 30


@pytest.mark.parametrize("command", ["denoise", "restore"])
def test_without_a_model_grey_photos_get_the_grey_default(
    command: str, tiny_upscaler_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import fundus_restore.pretrained as pretrained

    torch.manual_seed(0)
    colour = create_model("resunet", widths=[4, 8], blocks=1)
    with torch.no_grad():
        colour.tail.weight.normal_(0, 0.1)  # not the identity
    grey = colour.with_config({"channels": 1})
    with torch.no_grad():
        grey.tail.weight.normal_(0, 0.1)  # no longer the colour model's mean either
    bundled = tmp_path / "bundled"
    for name, model in (("colour", colour), ("grey", grey)):
        save_model(model, bundled / f"{name}.safetensors")
        (bundled / f"{name}.json").write_text(json.dumps({"task": "denoise", "config": model.config}))
    monkeypatch.setattr(pretrained, "BUNDLED_DIR", bundled)
    monkeypatch.setattr(pretrained, "DEFAULT_MODEL", "colour")
    monkeypatch.setattr(pretrained, "DEFAULT_GREY_MODEL", "grey")
    rng = np.random.default_rng(0)
    photos = {"colour.png": rng.random((40, 48, 3)), "red-free.png": rng.random((40, 48, 1))}
    for name, image in photos.items():
        write_image(tmp_path / "in" / name, image, bit_depth=16)
    upscaler = ["--upscale-model", str(tiny_upscaler_file)] if command == "restore" else []
    result = runner.invoke(app, [command, str(tmp_path / "in"), "-o", str(tmp_path / "out"), *upscaler, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "grey photograph through a colour denoiser" not in result.output
    for name, model in (("colour.png", colour), ("red-free.png", grey)):
        expected = denoise(read_image(tmp_path / "in" / name, rgb=False), model, device="cpu")
        if command == "restore":
            expected = upscale(expected, tiny_upscaler_file, device="cpu")
        written = read_image(tmp_path / "out" / name, rgb=False)
        assert written.shape == expected.shape
        assert np.abs(written - expected.clip(0, 1)).max() < 2 / 65535
    # The Python API chooses the same way.
    red_free = read_image(tmp_path / "in" / "red-free.png", rgb=False)
    np.testing.assert_array_equal(denoise(red_free, device="cpu"), denoise(red_free, grey, device="cpu"))


@pytest.mark.parametrize("ensemble", [False, True])
def test_restore_is_upscale_of_denoise(
    photos: Path, tiny_model_file: Path, tiny_upscaler_file: Path, tmp_path: Path, ensemble: bool
):
    out = tmp_path / "out"
    models = ["--denoise-model", str(tiny_model_file), "--upscale-model", str(tiny_upscaler_file)]
    args = ["restore", str(photos), "-o", str(out), *models, "--device", "cpu"] + (["--ensemble"] if ensemble else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "2 of 3 images written, 1 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a (1).png", "b.tif"]  # no intermediate files
    denoised = denoise(read_image(photos / "b.tif"), tiny_model_file, device="cpu", ensemble=ensemble)
    expected = upscale(denoised, tiny_upscaler_file, device="cpu", ensemble=ensemble)
    assert np.abs(read_image(out / "b.tif") - expected.clip(0, 1)).max() < 2 / 65535
    # Its own metadata says how it was made, the ensemble included (its output differs from a single pass's).
    ensemble_note = "(x8 flip-and-turn ensemble) " if ensemble else ""
    assert read_description(out / "b.tif").startswith(f"denoised and upscaled x2 {ensemble_note}by fundus-restore ")


def test_restore_feeds_an_upscaler_the_denoiser_its_card_was_trained_behind(
    photos: Path, tiny_model_file: Path, tiny_upscaler_file: Path, tmp_path: Path
):
    card = {"task": "upscale", "recipe": {"lr_denoiser": str(tiny_model_file)}}
    tiny_upscaler_file.with_suffix(".json").write_text(json.dumps(card))
    out = tmp_path / "out"
    runner.invoke(app, ["restore", str(photos / "b.tif"), "-o", str(out), "--upscale-model", str(tiny_upscaler_file),
                        "--device", "cpu", "--no-noise-check"])
    expected = upscale(denoise(read_image(photos / "b.tif"), tiny_model_file, device="cpu"), tiny_upscaler_file, device="cpu")
    assert np.abs(read_image(out / "b.tif") - expected.clip(0, 1)).max() < 2 / 65535
    # A card naming a denoiser this machine lacks (trained elsewhere) says where the name came from.
    card["recipe"]["lr_denoiser"] = str(tmp_path / "elsewhere.safetensors")
    tiny_upscaler_file.with_suffix(".json").write_text(json.dumps(card))
    result = runner.invoke(app, ["restore", str(photos / "b.tif"), "-o", str(tmp_path / "out2"),
                                 "--upscale-model", str(tiny_upscaler_file), "--device", "cpu"])
    assert result.exit_code == 2 and "elsewhere.safetensors: no such weights file" in result.output
    assert "was trained behind, from its card; or give --denoise-model" in result.output


def test_restore_denoises_colour_photos_with_the_small_photo_default_and_grey_ones_with_the_grey(
    tiny_upscaler_file: Path, tmp_path: Path
):
    folder, log = tmp_path / "in", tmp_path / "run.csv"
    rng = np.random.default_rng(0)
    write_image(folder / "colour.png", rng.random((40, 50, 3)), bit_depth=8)
    write_image(folder / "red-free.png", rng.random((40, 50, 1)), bit_depth=8)
    args = ["restore", str(folder), "-o", str(tmp_path / "out"), "--upscale-model", str(tiny_upscaler_file),
            "--log", str(log), "--no-noise-check"]
    assert runner.invoke(app, args).exit_code == 0
    assert {Path(row["input"]).name: row["model"] for row in _log_rows(log)} == {
        "colour.png": "resunet-retina-green-blind-small + sr", "red-free.png": "resunet-retina-grey-blind + sr"
    }


def test_denoise_and_restore_run_cbm3d_told_each_photos_noise_level(tiny_upscaler_file: Path, tmp_path: Path):
    from skimage import data

    from fundus_restore.inference import estimated_noise_level
    from fundus_restore.models.cbm3d import cbm3d

    clean = data.retina()[460:524, 520:584].astype(np.float32) / 255
    folder = tmp_path / "in"
    write_image(folder / "noisy.png", np.clip(add_gaussian_noise(clean, 20, seed=0), 0, 1), bit_depth=8)
    write_image(folder / "tiny.png", clean[:8, :8], bit_depth=8)  # under BM3D's 9×9
    log = tmp_path / "run.csv"
    result = runner.invoke(app, ["denoise", str(folder), "-o", str(tmp_path / "out"), "-m", "cbm3d", "--log", str(log)])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "1 of 2 images written, 1 failed" in said
    assert "tiny.png: CBM3D needs at least 9×9 pixels, got 8×8" in said and "Traceback" not in said
    noisy = read_image(folder / "noisy.png")
    expected = cbm3d(noisy, estimated_noise_level(noisy)).clip(0, 1)
    assert np.abs(read_image(tmp_path / "out" / "noisy.png") - expected).max() <= 1.01 / 255
    row = next(row for row in _log_rows(log) if row["status"] == "written")
    assert row["model"] == "cbm3d" and abs(float(row["noise_sigma"]) - 20) < 2
    # restore: the same denoiser, then the upscaler.
    result = runner.invoke(app, ["restore", str(folder / "noisy.png"), "-o", str(tmp_path / "restored"),
                                 "--denoise-model", "cbm3d", "--upscale-model", str(tiny_upscaler_file), "--sigma", "20"])
    assert result.exit_code == 0
    assert "model cbm3d + sr, noise sigma 20.00" in read_description(tmp_path / "restored" / "noisy.png")
    assert read_image(tmp_path / "restored" / "noisy.png").shape == (128, 128, 3)
    assert "cbm3d\tclassical denoiser" in runner.invoke(app, ["list-models"]).output


def test_train_with_a_missing_vgg_weights_file_says_so_in_one_line(photos: Path, tmp_path: Path):
    config = tmp_path / "srgan.yaml"
    config.write_text(
        "model: {architecture: srresnet, kwargs: {scale: 2, blocks: 1, width: 8}}\n"
        f"data: {{train: ['{photos}'], scale: 2, patch_size: 16, workers: 0}}\n"
        f"output: '{tmp_path / 'run'}'\nperceptual: {{features: vgg19}}\nadversarial: {{weight: 1.0e-3}}\n"
    )
    result = runner.invoke(app, ["train", str(config), "--vgg-weights", str(tmp_path / "vgg19.pth")])
    assert result.exit_code == 1
    assert "vgg19.pth: no such VGG19 weights file" in result.output and "Traceback" not in result.output


def test_train_takes_its_paths_as_options_in_place_of_the_configs_placeholders(tiny_model_file: Path, tmp_path: Path):
    photos, held_out = tmp_path / "train photos", tmp_path / "validation photos"
    rng = np.random.default_rng(0)
    for folder, prefix in ((photos, "t"), (held_out, "v")):
        for index in range(2):
            write_image(folder / f"{prefix}{index}.png", rng.random((48, 48, 3)), bit_depth=8)
    config = tmp_path / "finetune.yaml"
    config.write_text(
        "model: {init_weights: placeholder/GD_Color_Blind.mat}\noutput: placeholder/run\nsteps: 2\nbatch_size: 2\n"
        "data: {train: [placeholder/photos], patch_size: 16, patches_per_image: 2, images_per_group: 1, workers: 0}\n"
        "validation: {holdout: 1, among: [placeholder/photos], crop: 32}\n"
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--data", str(photos), "--data", str(held_out),
                                 "--validate-on", str(held_out), "--init-weights", str(tiny_model_file), "-o", str(run)])
    assert result.exit_code == 0, result.output
    card = json.loads((run / "model.json").read_text())
    assert card["recipe"]["init_weights"] == str(tiny_model_file)
    assert card["training_data"]["sources"] == [str(photos), str(held_out)]
    assert len(card["training_data"]["images"]) == 3
    assert [name[0] for name in card["training_data"]["validation_images"]] == ["v"]  # held out from --validate-on


def test_a_sigma_far_from_the_photos_noise_is_warned_about_and_one_on_the_wrong_scale_refused(tmp_path: Path):
    rows, cols = np.mgrid[:96, :96] / 96
    clean = np.dstack([0.3 + 0.4 * rows, 0.2 + 0.3 * cols, 0.1 + 0.2 * rows * cols])
    photo = write_image(tmp_path / "in" / "noisy.png", add_gaussian_noise(clean, 25, seed=0), bit_depth=8)
    torch.manual_seed(0)
    told_file = save_model(create_model("resunet", widths=[4, 8], blocks=1, noise_map=True), tmp_path / "told.safetensors")
    for sigma, far in (("25", False), ("20", False), ("0.1", True), ("150", True)):
        result = runner.invoke(app, ["denoise", str(photo), "-o", str(tmp_path / sigma), "-m", str(told_file), "--sigma", sigma])
        assert result.exit_code == 0, result.output
        warned = f"--sigma {sigma} is far from the photo's estimated noise sigma, about 2" in result.output
        assert warned == far, result.output
    quiet = runner.invoke(app, ["denoise", str(photo), "-o", str(tmp_path / "quiet"), "-m", str(told_file),
                                "--sigma", "0.1", "--no-noise-check"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    # The Python API takes sigma on the image's [0, 1] scale: 25 there is a mistake, not a level.
    for wrong in (25.0, -0.1):
        with pytest.raises(ValueError, match=r"sigma is on the image's \[0, 1\] scale"):
            denoise(read_image(photo), str(told_file), sigma=wrong, device="cpu")


def test_search_loss_takes_the_same_path_options_as_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fundus_restore import search
    from fundus_restore.train import TrainingError

    seen = {}

    def stop_after_reading(config: Path, out: Path, **options: object) -> None:
        seen.update(options["overrides"], resume=options["resume"])
        raise TrainingError("stopped by the test")

    monkeypatch.setattr(search, "search_loss_weights", stop_after_reading)
    result = runner.invoke(app, ["search-loss", "configs/dncnn-finetune-green.yaml", "-o", str(tmp_path / "search"),
                                 "--data", "photos", "--data", "more", "--validate-on", "photos",
                                 "--init-weights", "GD_Color_Blind.mat", "--set", "steps=50", "--resume"])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    assert seen == {"steps": 50, "data.train": ["photos", "more"], "validation.among": ["photos"],
                    "model.init_weights": "GD_Color_Blind.mat", "resume": True}


def test_sigma_is_told_to_a_denoiser_that_takes_it_and_refused_for_a_blind_one(
    photos: Path, tiny_model_file: Path, tmp_path: Path
):
    photo = photos / "a (1).png"
    result = runner.invoke(app, ["denoise", str(photo), "-o", str(tmp_path / "blind"), "--model", str(tiny_model_file),
                                 "--sigma", "15"])
    assert result.exit_code == 2 and "tiny is blind: --sigma is for a denoiser told the noise level" in result.output
    assert not (tmp_path / "blind").exists()
    torch.manual_seed(0)
    told = create_model("resunet", widths=[4, 8], blocks=1, noise_map=True)
    torch.nn.init.normal_(told.tail.weight, 0, 0.1)
    told_file = save_model(told, tmp_path / "told.safetensors")
    for sigma in ("5", "40"):
        args = ["denoise", str(photo), "-o", str(tmp_path / sigma), "--model", str(told_file), "--sigma", sigma]
        assert runner.invoke(app, [*args, "--log", str(tmp_path / "told.csv")]).exit_code == 0
    assert [row["noise_sigma"] for row in _log_rows(tmp_path / "told.csv")] == ["5.00", "40.00"]
    image = read_image(photo)
    for sigma in (5, 40):
        expected = np.clip(denoise(image, load_model(told_file), sigma=sigma / 255, device="cpu"), 0, 1)
        assert np.abs(read_image(tmp_path / str(sigma) / "a (1).png") - expected).max() <= 0.5 / 255 + 1e-6
    assert np.abs(read_image(tmp_path / "5" / "a (1).png") - read_image(tmp_path / "40" / "a (1).png")).max() > 0
