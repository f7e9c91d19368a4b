from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fundus_restore import save_model
from fundus_restore.cli import app
from fundus_restore.degrade import NOISE_ESTIMATE_VERSION, bicubic_upsample, degrade_for_protocol
from fundus_restore.evaluate import (
    CLASSICAL_METHODS, DEFAULT_GREY_METHODS, INVENTED_VS_BICUBIC, SUMMARY_COLUMNS, Method, ScoreCache, build_methods,
    evaluate_images, summarise, summary_table, weights_fingerprint, write_tables,
)
from fundus_restore.inference import denoise
from fundus_restore.io import write_image
from fundus_restore.models import create_model


def _fundus_like(size: int, seed: int, lines: int = 5) -> np.ndarray:
    """A smooth bright disc with ``lines`` dark lines on a black surround."""
    rows, cols = np.mgrid[:size, :size] / size
    disc = (rows - 0.5) ** 2 + (cols - 0.5) ** 2 < 0.4**2
    image = np.stack([0.7 + 0.1 * rows, 0.35 + 0.1 * cols, 0.2 + 0 * rows], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(lines):
        image[rng.integers(10, size - 10), :] *= 0.8
    return (image * disc[..., None]).astype(np.float32)


@pytest.fixture
def clean_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "clean"
    for index in range(2):
        write_image(folder / f"eye {index}.png", _fundus_like(64, index))
    return folder


def test_rows_and_summary_cover_every_image_sigma_protocol_and_method(clean_dir: Path, tmp_path: Path):
    methods = build_methods(["noisy", "nlmeans"])
    paths = sorted(clean_dir.iterdir())
    rows = evaluate_images(paths, methods, sigmas=(15, 25), seed=0)
    assert len(rows) == 2 * 2 * 2 * 2
    summary = {(r["sigma"], r["protocol"], r["method"]): r for r in summarise(rows)}
    # Unclipped noise of sigma 25 on [0, 1]: PSNR = 20 log10(255 / 25) = 20.17 dB.
    assert summary[(25, "paper", "noisy")]["psnr"] == pytest.approx(20.17, abs=0.3)
    for sigma in (15, 25):
        for protocol in ("paper", "camera"):
            assert summary[(sigma, protocol, "nlmeans")]["psnr_fov"] > summary[(sigma, protocol, "noisy")]["psnr_fov"]
    markdown, summary_csv = write_tables(rows, tmp_path / "report")
    text = markdown.read_text()
    assert "| 25 | camera | nlmeans | 2 |" in text
    # Overall, inside the field of view, and per channel there, for PSNR and SSIM alike.
    assert "| σ | noise | method | images | " + " | ".join(SUMMARY_COLUMNS) + " |" in text
    assert {"psnr_fov_g", "ssim_fov_g"} <= set(SUMMARY_COLUMNS)
    with summary_csv.open() as handle:
        assert len(list(csv.DictReader(handle))) == 8


def test_photos_sharing_a_file_name_get_names_that_tell_them_apart(tmp_path: Path):
    from fundus_restore.evaluate import image_labels

    paths = [Path("visit 1/eye/x.png"), Path("visit 2/eye/x.png"), Path("visit 2/eye/y.png")]
    assert image_labels(paths) == ["visit 1/eye/x.png", "visit 2/eye/x.png", "y.png"]
    assert image_labels([Path("a/x.png"), Path("a/x.png")]) == ["x.png", "x.png"]  # one file given twice
    for index in range(2):  # two different photos, one name
        write_image(tmp_path / f"site {index}" / "eye.png", _fundus_like(64, index))
    examples: list = []
    rows = evaluate_images([tmp_path / "site 0" / "eye.png", tmp_path / "site 1" / "eye.png"], build_methods(["noisy"]),
                           protocols=("camera",), vessels=False, on_example=examples.append)
    # The report's figure finds the scores of the photo it shows by this name: not the other photo's.
    assert [row["image"] for row in rows] == ["site 0/eye.png", "site 1/eye.png"]
    assert examples[0].image == "site 0/eye.png"


def test_evaluate_command_writes_the_tables(clean_dir: Path, tmp_path: Path):
    model = save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "m.safetensors")
    report = tmp_path / "report"
    args = ["evaluate", "--clean", str(clean_dir), "--report", str(report), "--method", "noisy", "--method", str(model)]
    result = CliRunner().invoke(app, [*args, "--protocol", "camera", "--device", "cpu", "--no-vessels"])
    assert result.exit_code == 0, result.output
    assert {"results.md", "summary.csv", "per_image.csv"} <= {p.name for p in report.iterdir()}
    with (report / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == {"noisy", "m"} and {r["image"] for r in rows} == {"eye 0.png", "eye 1.png"}
    assert "thin_recall" not in rows[0]  # --no-vessels


def test_official_method_without_weights_is_skipped_by_default_and_refused_when_asked():
    from fundus_restore.pretrained import WeightsError

    assert [m.name for m in build_methods(["noisy", "cdncnn-b"])] == ["noisy"]
    with pytest.raises(WeightsError, match="official-weights"):
        build_methods(["cdncnn-b"], skip_missing=False)


def test_official_weights_must_be_the_imported_colour_cdncnn(tmp_path: Path):
    from fundus_restore.matconvnet import CONVERTED_BY
    from fundus_restore.pretrained import WeightsError

    # Any other model would be tabled as cdncnn-b.
    with pytest.raises(WeightsError, match="dncnn-retina-green.safetensors: not official DnCNN weights imported by"):
        build_methods(["cdncnn-b"], official_weights="dncnn-retina-green", skip_missing=False)
    grey = create_model("dncnn", channels=1, depth=3, width=8, batch_norm=False)
    imported_grey = save_model(grey, tmp_path / "grey.safetensors", extra_metadata={"converted_by": CONVERTED_BY})
    with pytest.raises(WeightsError, match=r"grey\.safetensors: official weights for 1-channel \(grey\) images"):
        build_methods(["cdncnn-b"], official_weights=imported_grey, skip_missing=False)


def test_drive_photos_are_scored_against_their_expert_vessel_maps(drive_dir: Path):
    from fundus_restore.evaluate import load_clean

    photo = drive_dir / "test" / "images" / "01_test.tif"
    clean, mask, expert, _ = load_clean(photo, crop_size=256)
    assert clean.shape == (256, 256, 3) and mask.shape == expert.shape == (256, 256)
    assert 0.05 < expert[mask].mean() < 0.3  # vessels cover about a tenth of the field of view
    rows = evaluate_images([photo], build_methods(["noisy", "nlmeans"]), protocols=("camera",), crop_size=256)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        assert 0 <= row["thin_recall"] <= 1 and 0 <= row["spurious_rate"] <= 1 and 0 <= row["cldice"] <= 1
    # Noise invents vessels; a denoiser removes most of them.
    assert by_method["nlmeans"]["spurious_rate"] < by_method["noisy"]["spurious_rate"]


def test_the_example_is_the_first_image_under_camera_noise_at_the_first_sigma(clean_dir: Path):
    examples = []
    paths = sorted(clean_dir.iterdir())
    evaluate_images(paths, build_methods(["noisy", "nlmeans"]), sigmas=(15, 25), vessels=False, on_example=examples.append)
    assert len(examples) == 1
    example = examples[0]
    assert (example.image, example.sigma, example.protocol) == ("eye 0.png", 15, "camera")
    assert set(example.restored) == {"noisy", "nlmeans"}
    np.testing.assert_array_equal(example.restored["noisy"], example.noisy)
    np.testing.assert_array_equal(example.noisy, degrade_for_protocol(example.clean, 15, "camera", seed=0))


def test_evaluate_command_writes_a_self_contained_html_report(clean_dir: Path, tmp_path: Path):
    report = tmp_path / "report"
    # Methods repeat (--method A --method B) or come as a list, as issue 3 writes it.
    args = ["evaluate", "--clean", str(clean_dir), "--report", str(report), "--methods", "noisy,nlmeans"]
    result = CliRunner().invoke(app, [*args, "--protocol", "camera", "--sigma", "25"])
    assert result.exit_code == 0, result.output
    page = (report / "report.html").read_text()
    assert "<table>" in page and "<td>nlmeans</td>" in page and "thin_recall" in page
    assert "camera" in page and "eye 0.png" in page  # the run settings
    assert page.count("src='data:image/png;base64,") >= 3
    assert {"comparison.png", "error_maps.png", "vessel_overlays.png"} <= {p.name for p in (report / "figures").iterdir()}
    # Rewritten with only the noisy input, which has no error maps: the earlier run's are gone, not left mixed in.
    result = CliRunner().invoke(app, [*args[:-1], "noisy", "--protocol", "camera", "--no-vessels"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (report / "figures").iterdir()} == {"comparison.png", "vessel_overlays.png"}


def test_grey_scores_the_green_channel_and_a_grey_file_is_always_grey(clean_dir: Path, tmp_path: Path):
    colour = sorted(clean_dir.iterdir())[0]
    red_free = write_image(tmp_path / "grey" / "red-free.png", _fundus_like(64, 0)[..., 1:2])
    methods = build_methods(["noisy", "cbm3d"])
    as_grey = evaluate_images([colour], methods, protocols=("paper",), grey=True)
    as_is = evaluate_images([red_free], methods, protocols=("paper",), grey=None)
    for rows in (as_grey, as_is):
        assert "psnr_fov" in rows[0] and "psnr_fov_g" not in rows[0]  # one channel, no R, G, B
        assert rows[1]["psnr_fov"] > rows[0]["psnr_fov"] + 5  # grey BM3D denoises
    # The same green channel, the same seeded noise: the same scores either way.
    assert as_grey[0]["psnr_fov"] == pytest.approx(as_is[0]["psnr_fov"], abs=0.05)
    # A folder of both: the R, G, B means are over its colour photos, and the summary says how many.
    both = evaluate_images([colour, red_free], methods[:1], protocols=("paper",), grey=None)
    mixed = summarise(both)[0]
    assert (mixed["images"], mixed["colour_images"]) == (2, 1) and mixed["psnr_fov_g"] == both[0]["psnr_fov_g"]
    assert summary_table([mixed])[0][3:5] == ["images", "colour_images"]
    assert "colour_images" not in summarise(as_is)[0]  # only where the photos differ
    # Grey scores are cached apart from the colour ones of the same photo.
    cache = ScoreCache(tmp_path / "scores.jsonl")
    colour_rows = evaluate_images([colour], methods[:1], protocols=("paper",), cache=cache)
    assert "psnr_fov_g" in colour_rows[0]
    assert "psnr_fov_g" not in evaluate_images([colour], methods[:1], protocols=("paper",), cache=cache, grey=True)[0]
    # The command: one grey table and a report whose figures show one channel.
    report = tmp_path / "report"
    args = ["evaluate", "--clean", str(colour), "--report", str(report), "--methods", "noisy,nlmeans", "--grey"]
    result = CliRunner().invoke(app, [*args, "--protocol", "camera"])
    assert result.exit_code == 0, result.output
    header = "| σ | noise | method | images | psnr | ssim | psnr_fov | ssim_fov | thin_recall"
    assert header in (report / "results.md").read_text()
    assert "grey: the green channel of colour photos" in (report / "report.html").read_text()
    assert {"comparison.png", "error_maps.png", "vessel_overlays.png"} <= {p.name for p in (report / "figures").iterdir()}
    # Without --method, BM3D and the colour and grey defaults.
    result = CliRunner().invoke(app, ["evaluate", "--clean", str(colour), "--report", str(tmp_path / "defaults"), "--grey",
                                      "--protocol", "camera", "--no-vessels", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with (tmp_path / "defaults" / "summary.csv").open() as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == list(DEFAULT_GREY_METHODS)


def test_score_cache_reuses_scores_and_recomputes_only_what_changed(clean_dir: Path, tmp_path: Path):
    calls: list[str] = []

    def counting(name: str, fingerprint: str) -> Method:
        def restore(noisy, sigma):
            calls.append(name)
            return np.clip(noisy, 0, 1)

        return Method(name, restore, fingerprint)

    paths = sorted(clean_dir.iterdir())
    cache_file = tmp_path / "scores.jsonl"
    first = evaluate_images(paths, [counting("clip", "v1")], protocols=("paper",), cache=ScoreCache(cache_file))
    assert len(calls) == 2
    calls.clear()
    again = evaluate_images(paths, [counting("clip", "v1")], protocols=("paper",), cache=ScoreCache(cache_file))
    assert calls == [] and json.dumps(again) == json.dumps(first)  # NaN-safe comparison
    # Another fingerprint (e.g. retrained weights) under the same name is measured anew.
    evaluate_images(paths, [counting("clip", "v2")], protocols=("paper",), cache=ScoreCache(cache_file))
    assert len(calls) == 2
    calls.clear()
    # The image shown in figures is restored even when its scores are cached.
    examples: list = []
    evaluate_images(paths, [counting("clip", "v1")], protocols=("paper",), cache=ScoreCache(cache_file),
                    on_example=examples.append)
    assert calls == ["clip"] and "clip" in examples[0].restored


def test_scores_against_an_expert_map_are_not_reused_for_the_same_photo_without_one(tmp_path: Path):
    from PIL import Image

    photo = _fundus_like(64, 0)
    drive_photo = tmp_path / "drive" / "test" / "images" / "01_test.png"
    write_image(drive_photo, photo)
    (tmp_path / "drive" / "test" / "1st_manual").mkdir()
    expert = np.zeros((64, 64), dtype=np.uint8)
    expert[:, 30:33] = 255  # one vertical vessel
    Image.fromarray(expert).save(tmp_path / "drive" / "test" / "1st_manual" / "01_manual1.gif")
    copied_photo = tmp_path / "copy" / "01_test.png"
    write_image(copied_photo, photo)  # the same content, outside DRIVE's layout
    calls: list[str] = []

    def clip(noisy, sigma):
        calls.append("clip")
        return np.clip(noisy, 0, 1)

    cache = ScoreCache(tmp_path / "scores.jsonl")
    for path in (drive_photo, copied_photo):
        evaluate_images([path], [Method("clip", clip, "v1")], protocols=("paper",), cache=cache)
    assert len(calls) == 2  # measured against the clean photo's segmentation, not the expert map's scores
    evaluate_images([copied_photo], [Method("clip", clip, "v1")], protocols=("paper",), cache=cache)
    assert len(calls) == 2


def test_model_fingerprint_changes_with_the_weights():
    model = create_model("dncnn", depth=3, width=8, batch_norm=False)
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert weights_fingerprint(model) != before


def test_a_model_told_the_noise_level_is_fingerprinted_with_the_estimate_it_is_told(tmp_path: Path):
    torch.manual_seed(0)
    told = save_model(create_model("resunet", widths=(8, 16), blocks=1, noise_map=True), tmp_path / "told.safetensors")
    (method,) = build_methods([str(told)])
    assert method.fingerprint.endswith(f" noise estimate v{NOISE_ESTIMATE_VERSION}")  # a better estimate is measured anew
    noisy = np.random.default_rng(0).random((24, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(method.restore(noisy, 25 / 255), denoise(noisy, str(told)))


def test_plus_x8_runs_a_network_with_the_flip_and_turn_ensemble(tmp_path: Path):
    torch.manual_seed(0)
    weights = save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "net.safetensors")
    plain, ensembled = build_methods([str(weights), f"{weights}+x8"])
    assert (plain.name, ensembled.name) == ("net", "net+x8")
    assert ensembled.fingerprint == plain.fingerprint + " x8"  # cached apart, the plain scores stay valid
    noisy = np.random.default_rng(0).random((24, 30, 3), dtype=np.float32)
    np.testing.assert_allclose(ensembled.restore(noisy, 25 / 255), denoise(noisy, str(weights), ensemble=True))
    with pytest.raises(ValueError, match="for networks"):
        build_methods(["cbm3d+x8"])


def test_files_with_the_same_stem_get_distinct_labels(tmp_path: Path):
    torch.manual_seed(0)
    first = save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "a" / "model.safetensors")
    second = save_model(create_model("dncnn", depth=3, width=8, batch_norm=False), tmp_path / "b" / "model.safetensors")
    labels = [m.name for m in build_methods([str(first), str(second), f"{second}+x8", "noisy"])]
    assert labels == [str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model"), str(tmp_path / "b" / "model") + "+x8", "noisy"]
    assert [m.name for m in build_methods([str(first), f"{first}+x8"])] == ["a/model", "a/model+x8"]  # a run's model
    with pytest.raises(ValueError, match="twice: noisy"):
        build_methods(["noisy", "cbm3d", "noisy"])


def test_super_resolution_evaluation_upscales_the_shrunk_photo(clean_dir: Path, tmp_path: Path):
    torch.manual_seed(0)
    upscaler = save_model(create_model("srresnet", scale=2, blocks=1, width=8), tmp_path / "sr.safetensors")
    methods = build_methods(["bicubic", str(upscaler)], scale=2)
    examples: list = []
    rows = evaluate_images(sorted(clean_dir.iterdir()), methods, sigmas=(0,), protocols=("paper",), scale=2,
                           vessels=False, on_example=examples.append)
    bicubic = [r for r in rows if r["method"] == "bicubic"]
    assert len(rows) == 4 and all(r["psnr"] > 20 for r in bicubic)
    # An untrained network is no upscaler: bicubic must win by far.
    assert all(b["psnr"] > r["psnr"] + 3 for b, r in zip(bicubic, [r for r in rows if r["method"] == "sr"]))
    example = examples[0]
    assert example.noisy.shape == example.clean.shape == example.restored["sr"].shape
    assert example.clean.shape[0] % 2 == example.clean.shape[1] % 2 == 0  # cropped to a multiple of the scale
    with pytest.raises(ValueError, match="does not upscale by 4"):
        build_methods([str(upscaler)], scale=4)


def test_a_pipeline_denoises_the_noisy_small_photo_then_upscales_it(clean_dir: Path, tmp_path: Path):
    bicubic, pipeline = build_methods(["bicubic", "nlmeans>bicubic"], scale=2)
    assert pipeline.name == "nlmeans>bicubic" and ">bicubic x2" in pipeline.fingerprint
    low = np.random.default_rng(0).random((24, 20, 3), dtype=np.float32)
    expected = bicubic_upsample(CLASSICAL_METHODS["nlmeans"](low, 25.0), 2)
    np.testing.assert_array_equal(pipeline.restore(low, 25.0), expected)
    rows = evaluate_images(sorted(clean_dir.iterdir()), [bicubic, pipeline], sigmas=(25,), protocols=("paper",),
                           scale=2, vessels=False)
    psnr = {name: np.mean([r["psnr_fov"] for r in rows if r["method"] == name]) for name in ("bicubic", pipeline.name)}
    assert psnr[pipeline.name] > psnr["bicubic"] + 3  # bicubic alone enlarges the noise
    with pytest.raises(ValueError, match="a pipeline is DENOISER>UPSCALER, with a scale above 1"):
        build_methods(["nlmeans>bicubic"])
    with pytest.raises(ValueError, match="a pipeline is DENOISER>UPSCALER"):
        build_methods(["noisy>nlmeans>bicubic"], scale=2)
    torch.manual_seed(0)
    upscaler = save_model(create_model("srresnet", scale=2, blocks=1, width=8), tmp_path / "sr.safetensors")
    with pytest.raises(ValueError, match="sr is not a denoiser"):
        build_methods([f"{upscaler}>bicubic"], scale=2)


def test_evaluate_command_with_scale_writes_a_super_resolution_table(clean_dir: Path, tmp_path: Path):
    report = tmp_path / "report"
    args = ["evaluate", "--clean", str(clean_dir), "--report", str(report), "--scale", "2", "--method", "bicubic"]
    result = CliRunner().invoke(app, [*args, "--no-vessels"])
    assert result.exit_code == 0, result.output
    text = (report / "results.md").read_text()
    assert text.startswith("# Super-resolution x2") and "| 0 | paper | bicubic | 2 |" in text
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "<h1>Super-resolution x2 evaluation</h1>" in page
    assert "<figcaption>Clean, bicubic (eye 0.png, σ 0, camera noise)" in page  # the panels it shows: no noisy one


def test_evaluate_on_noisy_small_photos_compares_restores_pipelines_by_default(clean_dir: Path, tmp_path: Path):
    report = tmp_path / "report"
    args = ["evaluate", "--clean", str(clean_dir), "--report", str(report), "--scale", "4", "--sigma", "10"]
    result = CliRunner().invoke(app, [*args, "--no-vessels", "--protocol", "camera"])
    assert result.exit_code == 0, result.output
    methods = [line.split(" | ")[2] for line in (report / "results.md").read_text().splitlines() if "| camera |" in line]
    assert methods == ["bicubic", "srresnet-x4-retina", "srgan-x4-retina", "cbm3d>srresnet-x4-retina",
                       "resunet-retina-green-blind-small>srresnet-x4-retina"]


def test_super_resolution_table_shows_the_vessels_each_upscaler_invents_against_bicubic(tmp_path: Path):
    write_image(tmp_path / "clean" / "smooth.png", _fundus_like(128, 0, lines=0))
    calls: list[str] = []

    def painting(low: np.ndarray, sigma: float) -> np.ndarray:
        """Bicubic with a dark line painted across the disc: a vessel bicubic cannot have."""
        calls.append("painter")
        upscaled = bicubic_upsample(low, 2)
        upscaled[64, 30:98] *= 0.6
        return upscaled

    methods = [*build_methods(["bicubic"], scale=2), Method("painter", painting, "v1")]
    cache_file = tmp_path / "scores.jsonl"

    def run() -> dict[str, dict]:
        rows = evaluate_images([tmp_path / "clean" / "smooth.png"], methods, sigmas=(0,), protocols=("paper",),
                               scale=2, cache=ScoreCache(cache_file))
        return {row["method"]: row for row in rows}

    first = run()
    assert first["bicubic"][INVENTED_VS_BICUBIC] == 0  # the reference row, by construction
    assert first["painter"][INVENTED_VS_BICUBIC] > 0.2
    header = write_tables(list(first.values()), tmp_path / "report")[0].read_text().splitlines()[2]
    assert f"| spurious_rate | {INVENTED_VS_BICUBIC} |" in header
    # An entry cached before the guard existed lacks its rate: it is measured again, not shown empty.
    entries = [json.loads(line) for line in cache_file.read_text().splitlines()]
    for entry in entries:
        del entry["scores"][INVENTED_VS_BICUBIC]
    cache_file.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    calls.clear()
    assert run()["painter"][INVENTED_VS_BICUBIC] == first["painter"][INVENTED_VS_BICUBIC] and calls == ["painter"]
    calls.clear()
    run()
    assert calls == []  # and cached again, with the rate


def test_super_resolution_can_be_scored_on_photos_shrunk_by_another_kernel(clean_dir: Path, tmp_path: Path):
    bicubic = build_methods(["bicubic"], scale=2)
    cache = ScoreCache(tmp_path / "scores.jsonl")

    def scored(kernel: str) -> float:
        rows = evaluate_images(sorted(clean_dir.iterdir()), bicubic, sigmas=(0,), protocols=("paper",), scale=2,
                               vessels=False, cache=cache, lr_kernel=kernel)
        return float(np.mean([row["psnr_fov"] for row in rows]))

    # Box averaging blurs less than antialiased bicubic shrinking, so the two inputs differ;
    # their scores are cached apart.
    assert scored("box") != scored("bicubic")
    assert len(cache.scores) == 2 * len(list(clean_dir.iterdir()))
    with pytest.raises(ValueError, match="unknown kernel 'nearest'"):
        evaluate_images(sorted(clean_dir.iterdir()), bicubic, scale=2, lr_kernel="nearest")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clean", "{tmp}/empty"], "no image files in --clean {tmp}/empty"),
        (["--clean", "{tmp}/gone.png"], "{tmp}/gone.png: no such file"),
        (["--clean", "{clean}", "--protocol", "studio"], "unknown noise protocol 'studio'; known: paper, camera"),
        (["--clean", "{clean}", "--segmenter", "frangi"], "unknown vessel segmenter 'frangi'; known: hessian, unet"),
        (["--clean", "{tmp}/tiny.png"], "{tmp}/tiny.png: 8×8 pixels, smaller than the 11² SSIM's window needs"),
        (["--clean", "{clean}", "--sigma", "25", "--sigma", "-5"], "a noise sigma must be at least 0, got 25, -5"),
        (["--clean", "{clean}", "--crop", "5"], "crop 5 is smaller than the 11² SSIM's window needs"),
        (["--clean", "{clean}", "--scale", "0"], "the scale must be a positive integer, got 0"),
        (["--clean", "{clean}", "--scale", "8", "--crop", "12"],
         "crop 12 (cut to a multiple of the scale, 8) is smaller than the 11² SSIM's window needs"),
        (["--clean", "{clean}", "--lr-kernel", "box"],
         "the kernel 'box' shrinks photos for super-resolution: it needs a scale above 1"),
        (["--clean", "{clean}", "--grey", "--segmenter", "unet"],
         "the learned segmenter (unet) takes colour photos: use the hessian segmenter to score grey"),
        (["--clean", "{clean}", "--scale", "2"],
         "noisy does not upscale: with --scale, use it as a pipeline's first stage (noisy>bicubic)"),
        (["--clean", "{clean}", "--method", " , "], "--method names no method"),
    ],
    ids=["empty selection", "missing file", "unknown protocol", "unknown segmenter", "too small for SSIM",
         "negative sigma", "crop too small", "scale 0", "crop too small once cut", "kernel without scale",
         "learned segmenter on grey", "denoiser as upscaler", "no method"],
)
def test_evaluate_command_refuses_bad_settings_and_photos_in_one_line(
    args: list[str], message: str, clean_dir: Path, tmp_path: Path
):
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "tiny.png", np.full((8, 8, 3), 0.5, np.float32))
    filled = [arg.format(tmp=tmp_path, clean=clean_dir) for arg in args]
    method = [] if "--method" in args else ["--method", "noisy"]
    result = CliRunner().invoke(app, ["evaluate", *filled, "--report", str(tmp_path / "report"), *method])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {message.format(tmp=tmp_path)}" and "Traceback" not in result.output


def test_a_report_folder_that_cannot_be_one_is_refused_before_any_method_runs(clean_dir: Path, tmp_path: Path):
    (tmp_path / "report").write_text("a file")
    args = ["evaluate", "--clean", str(clean_dir), "--report", str(tmp_path / "report"), "--method", "cbm3d"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output == f"error: --report {tmp_path / 'report'}: a file, not a folder\n"


def test_an_unknown_segmenter_is_refused_before_any_method_runs(clean_dir: Path):
    calls: list[str] = []

    def restore(noisy: np.ndarray, sigma: float) -> np.ndarray:
        calls.append("clip")
        return np.clip(noisy, 0, 1)

    with pytest.raises(ValueError, match="unknown vessel segmenter 'frangi'"):
        evaluate_images(sorted(clean_dir.iterdir()), [Method("clip", restore)], segmenter="frangi")
    assert calls == []


def test_evaluate_command_runs_with_its_defaults(tmp_path: Path):
    write_image(tmp_path / "clean" / "eye.png", _fundus_like(64, 0))
    result = CliRunner().invoke(app, ["evaluate", "--clean", str(tmp_path / "clean"), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "results.md").read_text()
    assert "| 25 | paper | noisy | 1 |" in text and "| 25 | camera | dncnn-retina-green | 1 |" in text


def test_a_crop_is_scored_for_vessels_at_its_photo_s_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Vessels keep their width in pixels when a photo is cropped, so the segmenter's sizes
    must follow the photo (``image_scale`` of its field of view), not the crop."""
    from fundus_restore import evaluate
    from fundus_restore.vessel_metrics import vessel_preservation
    from fundus_restore.vessels import image_scale

    path = tmp_path / "eye.png"
    write_image(path, _fundus_like(160, 0))
    whole, cropped = evaluate.load_clean(path), evaluate.load_clean(path, crop_size=64)
    assert cropped.photo.shape[:2] == (64, 64)
    assert cropped.vessel_scale == whole.vessel_scale == image_scale(whole.photo) != image_scale(cropped.photo)
    seen = []

    def spy(*args, scale, **kwargs):
        seen.append(scale)
        return vessel_preservation(*args, scale=scale, **kwargs)

    monkeypatch.setattr(evaluate, "vessel_preservation", spy)
    evaluate_images([path], build_methods(["noisy"]), protocols=("paper",), crop_size=64)
    assert seen == [whole.vessel_scale]


def test_methods_that_do_not_fit_the_scale_or_return_nan_are_refused(clean_dir: Path):
    with pytest.raises(ValueError, match="bicubic is an upscaler: it needs --scale 2 or more"):
        build_methods(["bicubic"])
    with pytest.raises(ValueError, match="cbm3d does not upscale"):
        build_methods(["cbm3d"], scale=4)
    broken = Method("broken", lambda noisy, sigma: np.where(noisy > 0.5, np.nan, noisy))
    photo = sorted(clean_dir.iterdir())[0]
    # A mean over the other photos would hide the failure, so the evaluation stops and names it.
    with pytest.raises(ValueError, match=f"{photo}: broken returned NaN or infinite values"):
        evaluate_images([photo], [broken], protocols=("paper",), vessels=False)


def test_a_pipeline_s_guard_compares_with_its_denoised_photo_enlarged(clean_dir: Path):
    """As restore --check: bicubic after a denoiser invents nothing against the denoised
    photo's own bicubic upscale (against the noisy photo's, its smoothing looked like change)."""
    methods = build_methods(["bicubic", "nlmeans>bicubic"], scale=2)
    rows = evaluate_images(sorted(clean_dir.iterdir()), methods, sigmas=(25,), protocols=("paper",), scale=2)
    assert [row[INVENTED_VS_BICUBIC] for row in rows] == [0.0] * len(rows)
