from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from fundus_restore.io import (
    SUPPORTED_SUFFIXES,
    ImageFileError,
    ImageSource,
    find_images,
    image_bit_depth,
    list_images,
    read_description,
    read_header,
    read_image,
    read_mask,
    write_image,
)


def _levels(shape: tuple[int, ...], bit_depth: int, seed: int = 0) -> np.ndarray:
    """A random image whose values are exact ``bit_depth`` levels, so a lossless round trip is exact."""
    top = 2**bit_depth - 1
    return np.random.default_rng(seed).integers(0, top + 1, shape).astype(np.float32) / np.float32(top)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_round_trip_is_exact(tmp_path: Path, suffix: str, bit_depth: int) -> None:
    image = _levels((13, 17, 3), bit_depth)
    path = write_image(tmp_path / f"image{suffix}", image, bit_depth=bit_depth)
    assert read_header(path) == (13, 17, bit_depth)
    read = read_image(path)
    assert read.dtype == np.float32 and read.shape == (13, 17, 3)
    np.testing.assert_array_equal(read, image)


def test_write_clips_and_rounds(tmp_path: Path) -> None:
    image = np.array([[-0.5, 0.2 / 255, 0.7 / 255, 1.5]], dtype=np.float32)
    read = read_image(write_image(tmp_path / "clip.png", image), rgb=False)
    np.testing.assert_array_equal(read[..., 0] * 255, [[0, 0, 1, 255]])


def test_lzw_16_bit_rgb_tiff_as_drive_stores_it(tmp_path: Path) -> None:
    samples = np.random.default_rng(1).integers(0, 65536, (9, 11, 3), dtype=np.uint16)
    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, samples, photometric="rgb", compression="lzw")
    assert image_bit_depth(path) == 16
    np.testing.assert_array_equal(read_image(path), samples.astype(np.float32) / 65535)


def test_planar_tiff_gives_channels_last(tmp_path: Path) -> None:
    samples = np.random.default_rng(2).integers(0, 256, (3, 8, 10), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, samples, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(path) * 255, np.moveaxis(samples, 0, -1))


def test_grey_gives_one_or_three_channels(tmp_path: Path) -> None:
    grey = _levels((6, 7), 8)
    path = write_image(tmp_path / "grey.png", grey[..., None])
    single = read_image(path, rgb=False)
    assert single.shape == (6, 7, 1)
    np.testing.assert_array_equal(single[..., 0], grey)
    rgb = read_image(path)
    assert rgb.shape == (6, 7, 3)
    np.testing.assert_array_equal(rgb, np.repeat(single, 3, axis=-1))


@pytest.mark.parametrize("mode,channels", [("RGBA", 3), ("LA", 1)])
def test_alpha_is_dropped(tmp_path: Path, mode: str, channels: int) -> None:
    samples = np.random.default_rng(3).integers(0, 256, (5, 6, len(mode)), dtype=np.uint8)
    samples[..., -1] = 0  # fully transparent: the colour must survive regardless
    path = tmp_path / "alpha.png"
    Image.fromarray(samples, mode).save(path)
    read = read_image(path, rgb=False)
    np.testing.assert_array_equal(read * 255, samples[..., :channels])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 high × 64 wide, with a white block top-left; orientation 6 means
    # "rotate 90° clockwise to display", so the photo reads 64 high × 40 wide
    # with the block top-right.
    stored = np.zeros((40, 64, 3), dtype=np.uint8)
    stored[:16, :16] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    read = read_image(path)
    assert read.shape == (64, 40, 3)
    assert read[:16, -16:].mean() > 0.9
    assert read[:16, :16].mean() < 0.1


def test_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    image = _levels((4, 5, 3), 8)
    path = write_image(tmp_path / "a b" / "(00000053) copy.jpg", image)
    assert path.exists()
    assert np.abs(read_image(path) - image).mean() < 0.1  # JPEG is lossy
    assert list_images([path.parent]) == [path]


def test_jpeg_and_bmp_and_gif_read(tmp_path: Path) -> None:
    samples = np.random.default_rng(4).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(samples).save(tmp_path / "x.bmp")
    Image.fromarray(samples[..., 0]).save(tmp_path / "x.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "x.bmp") * 255, samples)
    np.testing.assert_array_equal(read_image(tmp_path / "x.gif", rgb=False)[..., 0] * 255, samples[..., 0])
    assert image_bit_depth(tmp_path / "x.bmp") == 8


def test_read_mask_is_true_above_half_intensity(tmp_path: Path) -> None:
    mask = np.zeros((5, 6), dtype=np.uint8)
    mask[1:3, 2:5] = 255
    mask[4, 0] = 1  # a stray dim value is background, not mask
    mask[0, 0] = 200
    Image.fromarray(mask).save(tmp_path / "mask.gif")
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.gif"), mask > 127)


def test_write_makes_no_partial_file_on_failure(tmp_path: Path) -> None:
    with pytest.raises(ImageFileError, match="JPEG"):
        write_image(tmp_path / "out" / "x.jpg", np.zeros((4, 4, 3)), bit_depth=16)
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "x.png", np.full((4, 4), np.nan))
    assert list(tmp_path.rglob("*")) == []


def test_an_interrupted_write_leaves_no_partial_file_and_long_names_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fundus_restore.io as image_io

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the command line turns into an exit) before the rename

    with monkeypatch.context() as patched:
        patched.setattr(image_io.os, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            write_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
    assert list(tmp_path.iterdir()) == []
    # A name at the filesystem's 255-byte limit: the partial file's own name is short.
    long_name = "c" * 251 + ".png"
    assert read_image(write_image(tmp_path / long_name, np.zeros((4, 4, 3)))).shape == (4, 4, 3)


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    write_image(path, np.zeros((3, 3)))
    write_image(path, np.ones((3, 3)))
    np.testing.assert_array_equal(read_image(path, rgb=False), np.ones((3, 3, 1)))
    assert [p.name for p in tmp_path.iterdir()] == ["x.tif"]


@pytest.mark.parametrize("name", ["view.png", "view.tif", "view.jpg"])
def test_a_non_contiguous_image_is_written(tmp_path: Path, name: str) -> None:
    image = np.random.default_rng(0).random((3, 12, 10)).astype(np.float32).transpose(1, 2, 0)
    assert not image.flags.c_contiguous  # as a resize along the first axis leaves it
    tolerance = 0.1 if name.endswith(".jpg") else 0.5 / 255
    np.testing.assert_allclose(read_image(write_image(tmp_path / name, image)), image, atol=tolerance)


def test_list_images_expands_folders_and_keeps_files(tmp_path: Path) -> None:
    for name in ["b.png", "a.TIF", "notes.txt", ".hidden.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    explicit = tmp_path / "elsewhere.jpg"
    assert list_images([tmp_path, explicit]) == [tmp_path / "a.TIF", tmp_path / "b.png", explicit]
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"} == set(SUPPORTED_SUFFIXES)


def test_find_images_recursive_gives_each_photo_its_path_under_the_folder(tmp_path: Path) -> None:
    for name in ["b.png", "eye 1/a.png", "eye 1/deeper/c.TIF", "eye 2/notes.txt", ".thumbs/d.png", "out/e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path], recursive=True, exclude=tmp_path / "out")
    assert [str(source.relative) for source in found] == ["b.png", "eye 1/a.png", "eye 1/deeper/c.TIF"]
    assert all(source.path == tmp_path / source.relative for source in found)
    assert [str(source.relative) for source in find_images([tmp_path])] == ["b.png"]
    assert find_images([tmp_path / "eye 1/a.png"]) == [ImageSource(tmp_path / "eye 1/a.png", Path("a.png"))]


def test_list_images_reads_drives_layout(tmp_path: Path) -> None:
    for folder, name in [("images", "21_training.tif"), ("mask", "21_training_mask.gif"), ("1st_manual", "21_manual1.gif")]:
        (tmp_path / "training" / folder).mkdir(parents=True)
        (tmp_path / "training" / folder / name).write_bytes(b"x")
    assert list_images([tmp_path / "training"]) == [tmp_path / "training/images/21_training.tif"]


def test_a_folder_named_images_in_an_archive_is_walked_like_any_other(tmp_path: Path) -> None:
    # Only DRIVE's layout (images/ beside mask/ or 1st_manual/) expands to images/.
    for name in ["top.png", "images/i.png", "patient/v.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path], recursive=True)
    assert [str(source.relative) for source in found] == ["images/i.png", "patient/v.png", "top.png"]


def test_a_broken_link_is_listed_and_refused_by_name(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", np.zeros((4, 4)))
    (tmp_path / "broken.png").symlink_to(tmp_path / "gone.png")
    assert list_images([tmp_path]) == [tmp_path / "a.png", tmp_path / "broken.png"]
    with pytest.raises(ImageFileError, match=r"broken\.png: a broken link \(to .*gone\.png\)$"):
        read_image(tmp_path / "broken.png")


def test_a_read_only_destination_gives_the_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # On a read-only filesystem the partial file cannot be made, nor removed.
    monkeypatch.setattr(Path, "open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(ImageFileError, match=r"x\.png: cannot write file \(Read-only file system\)$"):
        write_image(tmp_path / "x.png", np.zeros((4, 4)))


def test_tiff_colour_types_are_read_as_the_colours_they_hold(tmp_path: Path) -> None:
    rgb = (_levels((24, 24, 3), 8) * 255).astype(np.uint8)
    grey = rgb[..., 1]
    # Palette TIFFs (Pillow scales its 8-bit palette by 256, the standard by 257).
    few_colours = Image.fromarray(rgb).quantize(16)
    few_colours.save(tmp_path / "palette.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.tif"), np.asarray(few_colours.convert("RGB")) / np.float32(255))
    Image.fromarray(grey).convert("P").save(tmp_path / "grey-palette.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "grey-palette.tif", rgb=False), grey[..., None] / np.float32(255))
    # White-is-zero grey.
    tifffile.imwrite(tmp_path / "miniswhite.tif", 255 - grey, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "miniswhite.tif", rgb=False), grey[..., None] / np.float32(255))
    # CMYK, and several photographs in one file, are refused rather than misread.
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    with pytest.raises(ImageFileError, match=r"cmyk\.tif: CMYK samples; save the photograph as RGB$"):
        read_image(tmp_path / "cmyk.tif")
    tifffile.imwrite(tmp_path / "two.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "two.tif", rgb, photometric="rgb", append=True)
    with pytest.raises(ImageFileError, match=r"two\.tif: holds 2 images; only single-image TIFFs are read$"):
        read_image(tmp_path / "two.tif")


def test_a_grey_gif_stays_grey_and_an_animated_one_is_refused(tmp_path: Path) -> None:
    grey = (_levels((24, 24), 8) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.gif")
    np.testing.assert_array_equal(read_image(tmp_path / "grey.gif", rgb=False), grey[..., None] / np.float32(255))
    frames = [Image.fromarray(grey), Image.fromarray(255 - grey)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageFileError, match=r"anim\.gif: holds 2 frames; only single images are read$"):
        read_image(tmp_path / "anim.gif")


def test_a_file_is_read_by_its_content_whatever_its_suffix(tmp_path: Path) -> None:
    image = _levels((20, 30), 16)
    write_image(tmp_path / "x.png", image, bit_depth=16)
    (tmp_path / "x.png").rename(tmp_path / "png-named.jpg")
    assert read_header(tmp_path / "png-named.jpg").bit_depth == 16
    np.testing.assert_array_equal(read_image(tmp_path / "png-named.jpg", rgb=False)[..., 0], image)
    write_image(tmp_path / "y.jpg", np.full((8, 8, 3), 0.5))
    (tmp_path / "y.jpg").rename(tmp_path / "jpeg-named.png")
    np.testing.assert_allclose(read_image(tmp_path / "jpeg-named.png"), 0.5, atol=2 / 255)


def _truncated_png(path: Path) -> None:
    write_image(path, _levels((32, 32, 3), 8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _five_channel_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((6, 6, 5), dtype=np.uint8), photometric="minisblack", planarconfig="contig")


def _volume_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((2, 4, 6, 6, 3), dtype=np.uint8), photometric="rgb")


def _nan_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.full((6, 6), np.nan, dtype=np.float32))


@pytest.mark.parametrize(
    "name,make,problem",
    [
        ("missing.png", None, "no such file$"),
        ("missing-folder", None, "no such file or folder$"),  # a mistyped folder, not an 'unsupported type'
        ("empty.png", lambda p: p.write_bytes(b""), "empty file"),
        ("truncated (1).png", _truncated_png, "truncated or corrupt"),
        ("text.png", lambda p: p.write_text("not an image\n"), "truncated or corrupt"),
        ("text.jpg", lambda p: p.write_text("not an image\n"), "truncated or corrupt"),
        ("text.tif", lambda p: p.write_text("not an image\n"), "truncated or corrupt"),
        ("five channels.tif", _five_channel_tiff, "not a grey or RGB image"),
        ("volume.tif", _volume_tiff, "not a grey or RGB image"),
        ("nan.tif", _nan_tiff, "the float image contains NaN or infinite values"),
        ("0-255.tif", lambda p: tifffile.imwrite(p, np.full((6, 6, 3), 200.0, np.float32), photometric="rgb"),
         r"float image values reach 200: expected the \[0, 1\] scale"),
        ("int32.tif", lambda p: tifffile.imwrite(p, np.zeros((6, 6), np.int32)), "unsupported sample type int32"),
        ("image.webp", lambda p: p.write_bytes(b"RIFF"), "unsupported image type"),
        ("folder.png", lambda p: p.mkdir(), "a folder, not an image file"),
        ("folder", lambda p: p.mkdir(), "a folder, not an image file"),
    ],
)
def test_bad_files_raise_one_line_error_naming_the_file(tmp_path: Path, name: str, make, problem: str) -> None:
    path = tmp_path / name
    if make is not None:
        make(path)
    with pytest.raises(ImageFileError, match=problem) as error:
        read_image(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "object at 0x" not in message
    assert str(pickle.loads(pickle.dumps(error.value))) == message  # survives DataLoader workers


@pytest.mark.parametrize("name,content", [("empty.tif", b""), ("text.png", b"hello world, not a png"), ("text.tif", b"hello")])
def test_bit_depth_of_bad_file_raises(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageFileError, match=str(path).replace("(", r"\(")):
        image_bit_depth(path)


@pytest.mark.shared
def test_reads_drive_tiff_and_gif_mask(drive_dir: Path) -> None:
    image = read_image(drive_dir / "training" / "images" / "21_training.tif")
    mask = read_mask(drive_dir / "training" / "mask" / "21_training_mask.gif")
    assert image.shape == (584, 565, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert mask.shape == (584, 565) and mask.dtype == bool
    assert 0.6 < mask.mean() < 0.75  # the disc covers about 68% of the frame
    assert image[mask].mean() > 5 * image[~mask].mean()
    assert image_bit_depth(drive_dir / "training" / "images" / "21_training.tif") == 8


@pytest.mark.shared
def test_reads_heimed_name_with_parentheses(heimed_dir: Path) -> None:
    image = read_image(heimed_dir / "(00000053).jpg")
    assert image.shape == (1958, 2196, 3)


def test_float_tiff_keeps_values_outside_the_unit_range(tmp_path: Path) -> None:
    image = np.random.default_rng(1).normal(0.5, 0.4, (9, 7, 3)).astype(np.float32)
    path = write_image(tmp_path / "noisy.tif", image, bit_depth=32)
    np.testing.assert_array_equal(read_image(path), image)
    assert image_bit_depth(path) == 32
    # Unclipped noise of sigma 150 on a dark photo puts many values below -0.5: what degrade --no-clip writes is read back.
    darker = np.random.default_rng(1).normal(0.1, 150 / 255, (9, 7, 3)).astype(np.float32)
    assert (darker < -0.5).mean() > 0.05
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "darker.tif", darker, bit_depth=32)), darker)
    with pytest.raises(ImageFileError, match="only be written to TIFF"):
        write_image(tmp_path / "noisy.png", image, bit_depth=32)


def test_a_float64_tiff_reads_as_float32_and_keeps_its_depth(tmp_path: Path) -> None:
    image = np.random.default_rng(2).normal(0.5, 0.4, (9, 7, 3))  # numpy's default float, as tifffile writes it
    tifffile.imwrite(tmp_path / "float64.tif", image, photometric="rgb")
    read = read_image(tmp_path / "float64.tif")
    assert read.dtype == np.float32 and image_bit_depth(tmp_path / "float64.tif") == 32
    np.testing.assert_array_equal(read, image.astype(np.float32))


@pytest.mark.parametrize(("name", "bit_depth"), [("a.png", 8), ("a.png", 16), ("a.tif", 8), ("a.tif", 32), ("a.jpg", 8)])
def test_a_description_is_stored_in_each_format_and_leaves_the_pixels_alone(
    tmp_path: Path, name: str, bit_depth: int
) -> None:
    image = _levels((12, 10, 3), 8).astype(np.float32)
    plain = read_image(write_image(tmp_path / "plain" / name, image, bit_depth=bit_depth))
    text = "denoised by fundus-restore 0.1.0 (model m, noise sigma 15.00)"
    described = write_image(tmp_path / "described" / name, image, bit_depth=bit_depth, description=text)
    assert read_description(described) == text and read_description(tmp_path / "plain" / name) is None
    np.testing.assert_array_equal(read_image(described), plain)
    if bit_depth != 32:  # Pillow decodes the file too (checking the PNG chunks' CRCs); float TIFF it cannot
        assert np.asarray(Image.open(described)).shape[:2] == (12, 10)
    with pytest.raises(ValueError, match="printable ASCII"):
        write_image(tmp_path / name, image, description="σ 15")


def test_mask_with_a_dim_background_is_not_all_true(tmp_path: Path) -> None:
    # Like DRIVE's 2nd_manual GIFs: background (2, 4, 4), vessels white.
    samples = np.full((6, 6, 3), (2, 4, 4), dtype=np.uint8)
    samples[2:4, :] = 255
    Image.fromarray(samples).save(tmp_path / "map.gif")
    expected = np.zeros((6, 6), dtype=bool)
    expected[2:4, :] = True
    np.testing.assert_array_equal(read_mask(tmp_path / "map.gif"), expected)


def test_drive_second_grader_map_reads_as_thin_vessels(drive_dir: Path) -> None:
    second = read_mask(drive_dir / "test" / "2nd_manual" / "01_manual2.gif")
    assert 0.05 < second.mean() < 0.2


def test_write_image_refuses_integer_samples_instead_of_clipping_them_to_white(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 image .* expected floats on \[0, 1\]"):
        write_image(tmp_path / "a.png", np.full((4, 4, 3), 200, dtype=np.uint8))
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("module", ["metrics", "inference", "fov", "vessels", "degrade"])
def test_an_8_bit_or_0_255_array_is_refused_where_a_unit_float_image_is_expected(module: str) -> None:
    from fundus_restore import degrade, fov, inference, metrics, vessels

    rng = np.random.default_rng(0)
    unit = rng.random((48, 48, 3), dtype=np.float32)
    call = {
        "metrics": lambda image: metrics.psnr(image, image),
        "inference": lambda image: inference.denoise(image, "dncnn-small-demo", device="cpu"),
        "fov": fov.fov_mask,
        "vessels": lambda image: vessels.segment_vessels(image, scale=1.0),
        "degrade": degrade.add_gaussian_noise,
    }[module]
    call(unit)  # the [0, 1] scale is taken
    if module == "metrics":  # and 0-255 values with their data_range
        assert metrics.psnr(unit * 255, unit * 255 + 1, data_range=255) == pytest.approx(48.13, abs=0.01)
    # Read from a camera file as uint8, or as 0-255 floats: silently far too bright before.
    with pytest.raises(ValueError, match=r"expected a float \w+ on the \[0, 1\] scale, got dtype uint8"):
        call((unit * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"values reach 25\d(\.\d+)?: expected the \[0, 1\] scale \(divide 0-255 values by 255\)"):
        call(unit * 255)
    # Normalised to [-1, 1], as many training pipelines do: silently far too dark before.
    with pytest.raises(ValueError, match=r"\d+% of the \w+'s values are below -0.5: expected the \[0, 1\] scale \(map \[-1, 1\] values with \(x \+ 1\) / 2\)"):
        call(unit * 2 - 1)


def test_heavy_unclipped_noise_on_a_black_surround_keeps_the_unit_scale() -> None:
    # sigma 100 of 255 on a photo whose black surround is 30 % of it: 3 % of values fall below -0.5.
    from fundus_restore.io import checked_float_image

    photo = np.full((200, 200, 3), 0.4, dtype=np.float32)
    photo[:60] = 0.0
    noisy = photo + np.random.default_rng(0).normal(0, 100 / 255, photo.shape).astype(np.float32)
    assert checked_float_image(noisy) is noisy
