from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fundus_restore import data
from fundus_restore.data import PatchSettings, PatchStream, split_images, validation_crops
from fundus_restore.degrade import downsample
from fundus_restore.io import ImageFileError


def fundus_like(size: int, seed: int) -> np.ndarray:
    """A textured bright disk on a black surround, 8-bit RGB."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    inside = (rows - size / 2 + 0.5) ** 2 + (cols - size / 2 + 0.5) ** 2 < (0.45 * size) ** 2
    texture = rng.uniform(0.25, 0.95, (size, size, 3))
    return (np.where(inside[..., None], texture, 0.0) * 255).round().astype(np.uint8)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for index in range(6):
        path = tmp_path / f"photo{index}.png"
        Image.fromarray(fundus_like(48, index)).save(path)
        paths.append(path)
    return paths


def read_png(path: Path, **_: object) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32) / 255


class RecordingReader:
    """Stands in for ``read_image`` and notes which files are read."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, path: Path, **_: object) -> np.ndarray:
        self.names.append(path.name)
        return read_png(path)


def small_stream(photos: list[Path], start_step: int = 0, **settings: object) -> PatchStream:
    defaults = {"patch_size": 16, "patches_per_image": 8, "images_per_group": 2}
    settings = PatchSettings(**{**defaults, **settings})
    return PatchStream(photos, batch_size=8, settings=settings, seed=3, start_step=start_step)


def assert_same_batch(first: data.PatchBatch, second: data.PatchBatch) -> None:
    for a, b in zip(first[:3], second[:3], strict=True):  # noisy, clean, sigma
        assert torch.equal(a, b)
    assert [tuple(entry) for entry in first.skipped] == [tuple(entry) for entry in second.skipped]  # a DataLoader makes lists


def test_batches_have_the_promised_shapes_and_ranges(photos: list[Path]) -> None:
    batch = small_stream(photos, sigma=(5.0, 50.0)).batch(0)
    assert batch.noisy.shape == batch.clean.shape == (8, 3, 16, 16)
    assert batch.noisy.dtype == batch.clean.dtype == torch.float32
    assert batch.clean.min() >= 0 and batch.clean.max() <= 1
    assert batch.sigma.shape == (8,)
    assert ((batch.sigma >= 5 / 255) & (batch.sigma <= 50 / 255)).all() and batch.sigma.unique().numel() > 1


def test_a_batch_depends_only_on_seed_and_step(photos: list[Path]) -> None:
    stream, twin = small_stream(photos), small_stream(photos)
    assert_same_batch(stream.batch(5), twin.batch(5))
    assert not torch.equal(stream.batch(5).noisy, stream.batch(6).noisy)
    other_seed = PatchStream(photos, batch_size=8, settings=stream.settings, seed=4)
    assert not torch.equal(stream.batch(5).noisy, other_seed.batch(5).noisy)
    # Iterating, and iterating from a later step (a resumed run), gives the same batches.
    iterated = list(islice(iter(stream), 6))
    for step, batch in enumerate(iterated):
        assert_same_batch(batch, twin.batch(step))
    assert_same_batch(next(iter(small_stream(photos, start_step=4))), iterated[4])


def test_dataloader_workers_deal_the_steps_in_order(photos: list[Path]) -> None:
    stream = small_stream(photos, start_step=3)  # an odd start: worker 0 begins with a lane-1 step
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    for step, batch in zip(range(3, 7), loader):
        assert_same_batch(batch, stream.batch(step, lanes=2))


def test_ranks_read_different_images(photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PatchSettings(16, patches_per_image=4, images_per_group=3)
    readers = [RecordingReader(), RecordingReader()]
    for rank, reader in enumerate(readers):
        monkeypatch.setattr(data, "read_image", reader)
        PatchStream(photos, batch_size=8, settings=settings, rank=rank, world_size=2).batch(0)
    assert len(readers[0].names) == len(readers[1].names) == 3
    assert not set(readers[0].names) & set(readers[1].names)


def test_memory_stays_bounded_and_every_image_is_visited(photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    reader = RecordingReader()
    monkeypatch.setattr(data, "read_image", reader)
    stream = small_stream(photos)  # 2 images × 8 patches per group = 2 batches of 8
    for step, _ in zip(range(30), stream):
        assert stream.cached_images <= 2
    assert len(reader.names) == 30  # 15 groups of 2 images: each read feeds 8 patches
    assert {p.name for p in photos} == set(reader.names[:6])  # one pass over all images before any repeats


def test_area_sampling_draws_photographs_in_proportion_to_their_pixels(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    large = photos[0].parent / "large.png"
    Image.fromarray(fundus_like(144, 9)).save(large)  # 9 times the area of a 48² photo
    mix = [photos[0], photos[1], large]  # by area, large is drawn 9 / 11 of the time
    counts = {}
    for sampling in ("image", "area"):
        reader = RecordingReader()
        monkeypatch.setattr(data, "read_image", reader)
        stream = small_stream(mix, sampling=sampling)
        for step in range(0, 600, 2):  # a group of 2 images feeds 2 batches
            stream.batch(step)
        counts[sampling] = reader.names.count("large.png") / len(reader.names)
    assert counts["image"] == pytest.approx(1 / 3, abs=0.01)  # a pass over all before repeats
    assert counts["area"] == pytest.approx(9 / 11, abs=0.05)
    assert_same_batch(small_stream(mix, sampling="area").batch(7), small_stream(mix, sampling="area").batch(7))


def test_flips_and_rotations_keep_noisy_and_clean_aligned(photos: list[Path]) -> None:
    source = read_png(photos[0])
    stream = PatchStream([photos[0]], batch_size=16, settings=PatchSettings(12, sigma=25.0, clip_probability=0.0), seed=1)
    batch = stream.batch(0)
    # The noise is all that separates them: misaligned textured patches would differ far more.
    residual = (batch.noisy - batch.clean).numpy()
    assert abs(residual.std() - 25 / 255) < 0.1 * 25 / 255
    # Every clean patch is a flipped/rotated window of the photograph, and several transforms occur.
    windows = np.lib.stride_tricks.sliding_window_view(source, (12, 12), axis=(0, 1)).transpose(0, 1, 3, 4, 2)
    transforms = set()
    for patch in batch.clean.numpy().transpose(0, 2, 3, 1):
        # Undo each of the 8 transforms in turn and look for the window it came from.
        undone = [np.rot90(patch[:, ::-1] if t >= 4 else patch, -(t % 4)) for t in range(8)]
        matches = [t for t in range(8) if (np.abs(windows - undone[t]).max(axis=(2, 3, 4)) < 1e-6).any()]
        assert matches, "a clean patch is not a window of the photograph"
        transforms.add(matches[0])
    assert len(transforms) > 2


def test_camera_protocol_gives_8bit_values_in_range(photos: list[Path]) -> None:
    noisy = small_stream(photos, clip_probability=1.0, sigma=50.0).batch(0).noisy
    assert noisy.min() >= 0 and noisy.max() <= 1
    levels = noisy * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    unclipped = small_stream(photos, clip_probability=0.0, sigma=50.0, border_fraction=1.0).batch(0).noisy
    assert unclipped.min() < 0 and not torch.allclose(unclipped * 255, (unclipped * 255).round(), atol=1e-4)


def test_patches_come_from_the_field_of_view_with_some_surround(tmp_path: Path) -> None:
    photo = tmp_path / "large.png"
    Image.fromarray(fundus_like(96, 0)).save(photo)  # about a fifth of the FOV crop is black corners

    def clean_patches(border_fraction: float) -> torch.Tensor:
        return PatchStream([photo], batch_size=64, settings=PatchSettings(8, border_fraction=border_fraction)).batch(0).clean

    # The central 2×2 block holds the patch centre whatever the flip or rotation.
    assert not (clean_patches(0.0)[:, :, 3:5, 3:5].amax(dim=(1, 2, 3)) == 0).any()
    assert (clean_patches(1.0)[:, :, 3:5, 3:5].amax(dim=(1, 2, 3)) == 0).any()
    has_surround = (clean_patches(0.2).amax(dim=1) == 0).any(dim=(1, 2))
    assert 0 < has_surround.float().mean() < 1


def test_split_holds_whole_images_out_deterministically(photos: list[Path]) -> None:
    train, validation = split_images(photos, holdout=2, seed=7)
    assert len(train) == 4 and len(validation) == 2 and not set(train) & set(validation)
    assert split_images(list(reversed(photos)), holdout=2, seed=7) == (train, validation)
    assert split_images(photos, holdout=2, seed=8)[1] != validation or split_images(photos, holdout=2, seed=9)[1] != validation
    # The same photograph listed twice (another spelling of its path) still lands on one side only.
    again = photos + [photos[0].parent / "." / photos[0].name]
    train, validation = split_images(again, holdout=3, seed=7)
    assert len(train) + len(validation) == 6 and not {p.resolve() for p in train} & {p.resolve() for p in validation}


def test_split_among_a_subset_or_by_name(photos: list[Path]) -> None:
    train, validation = split_images(photos, holdout=2, among=photos[:3], seed=0)
    assert set(validation) <= set(photos[:3]) and set(photos[3:]) <= set(train)
    train, validation = split_images(photos, names=["photo1.png", str(photos[4])])
    assert validation == [photos[1], photos[4]] and photos[1] not in train
    with pytest.raises(ValueError, match="'nope.png' is not among the training images"):
        split_images(photos, names=["nope.png"])
    with pytest.raises(ValueError, match="cannot hold out 7"):
        split_images(photos, holdout=7)


def test_super_resolution_pairs_are_the_target_shrunk_like_the_whole_photograph(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "read_image", read_png)
    batch = small_stream(photos, scale=2, sigma=0.0, clip_probability=0.0).batch(0)
    assert batch.noisy.shape == (8, 3, 8, 8) and batch.clean.shape == (8, 3, 16, 16)
    for low, high in zip(batch.noisy.numpy(), batch.clean.numpy()):
        shrunk = downsample(high.transpose(1, 2, 0), 2).transpose(2, 0, 1)
        # Inside, the kernel reads only the target's own pixels; at the edge it reads the margin cut with it.
        np.testing.assert_allclose(low[:, 2:-2, 2:-2], shrunk[:, 2:-2, 2:-2], atol=1e-5)
        assert np.abs(low - shrunk).max() > 1e-3  # the margin: not a shrink of the target alone
    with pytest.raises(ValueError, match="multiple of the scale"):
        PatchSettings(patch_size=18, scale=4)


def test_super_resolution_patches_can_be_shrunk_by_random_kernels(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "read_image", read_png)
    settings = {"scale": 2, "sigma": 0.0, "clip_probability": 0.0}
    batch = small_stream(photos, **settings, lr_kernels=("box", "bicubic")).batch(0)
    kernels = []
    for low, high in zip(batch.noisy.numpy(), batch.clean.numpy()):
        shrunk = {k: downsample(high.transpose(1, 2, 0), 2, k).transpose(2, 0, 1) for k in ("box", "bicubic")}
        errors = {k: np.abs(low[:, 2:-2, 2:-2] - small[:, 2:-2, 2:-2]).max() for k, small in shrunk.items()}
        kernels.append(min(errors, key=errors.get))
        assert min(errors.values()) < 1e-5  # each input is the target shrunk by one of the kernels
    assert set(kernels) == {"box", "bicubic"}
    # The same seed and step give the same kernels (batch k stays a pure function of (seed, k)).
    assert_same_batch(batch, small_stream(photos, **settings, lr_kernels=("box", "bicubic")).batch(0))
    with pytest.raises(ValueError, match="lr_kernels must be a non-empty list"):
        PatchSettings(patch_size=16, scale=4, lr_kernels=("nearest",))


def test_super_resolution_validation_crops_shrink_the_crop(photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "read_image", read_png)
    paper, camera = validation_crops(photos[:1], crop=24, sigma=0.0, scale=4)[:2]
    assert paper.clean.shape == (24, 24, 3) and paper.noisy.shape == (6, 6, 3)
    np.testing.assert_allclose(paper.noisy, downsample(paper.clean, 4), atol=1e-6)
    assert np.array_equal(camera.noisy, np.round(np.clip(camera.noisy, 0, 1) * 255) / 255)


def test_validation_crops_are_fixed(photos: list[Path]) -> None:
    crops = validation_crops(photos[:2], crop=24, sigma=25.0)
    again = validation_crops(photos[:2], crop=24, sigma=25.0)
    expected = [(p.name, r, protocol) for p in photos[:2] for r in ("centre", "rim") for protocol in ("paper", "camera")]
    assert [(c.name, c.region, c.protocol) for c in crops] == expected
    for crop, twin in zip(crops, again):
        assert crop.clean.shape == crop.noisy.shape == (24, 24, 3) and crop.mask.shape == (24, 24)
        assert np.array_equal(crop.noisy, twin.noisy) and crop.sigma == 25 / 255
    centre, rim = crops[0], crops[2]
    assert centre.mask.all() and 0 < rim.mask.mean() < 1  # FOV and surround both
    camera = crops[1].noisy
    assert camera.min() >= 0 and camera.max() <= 1
    assert not np.array_equal(crops[0].noisy, crops[4].noisy)  # each image its own noise
    # Vessel measures take the photograph's scale: a crop keeps its vessels' widths.
    whole = validation_crops(photos[:1], crop=None, sigma=25.0)[0]
    assert centre.vessel_scale == rim.vessel_scale == whole.vessel_scale == whole.clean.shape[1] / 565


def test_chosen_channels_keep_those_of_the_same_patches(photos: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    colour = small_stream(photos).batch(0)
    green = small_stream(photos, channels=(1,)).batch(0)
    assert green.noisy.shape == green.clean.shape == (8, 1, 16, 16)
    assert torch.equal(green.clean, colour.clean[:, 1:2])  # the same places, flips and turns
    monkeypatch.setattr(data, "read_image", read_png)
    crops = validation_crops(photos[:1], crop=24, channels=[1])
    whole = validation_crops(photos[:1], crop=24)
    assert all(c.clean.shape == (24, 24, 1) for c in crops)
    assert all(np.array_equal(c.clean, w.clean[..., 1:2]) for c, w in zip(crops, whole, strict=True))
    with pytest.raises(ValueError, match=r"channels must be .* RGB channels 0-2, got \[3\]"):
        small_stream(photos, channels=(3,))


def test_an_image_smaller_than_the_patch_is_named_before_any_batch(photos: list[Path]) -> None:
    # From its header, when the stream is made: a run stops before it starts.
    with pytest.raises(ImageFileError, match=r"photo0\.png: 48×48 pixels, smaller than the 64² a patch needs$"):
        small_stream(photos, patch_size=64)
    # A field of view smaller than the patch (44² in a 48² frame) is found when the photo is read:
    # it is skipped with a warning; with no usable photo left, the stream stops.
    with pytest.raises(ImageFileError, match=r"none of the 6 .* the last: .*photo\d\.png: its field of view crop is 44×44, smaller than 46²"):
        with pytest.warns(UserWarning, match=r"training goes on without it: .*photo\d\.png: its field of view crop is 44×44"):
            small_stream(photos, patch_size=46).batch(0)


def test_a_photo_that_fails_when_read_is_skipped_with_a_warning_naming_it(photos: list[Path]) -> None:
    intact = small_stream(photos).batch(0)
    photos[2].write_bytes(photos[2].read_bytes()[:200])  # header intact, pixels cut off
    with pytest.warns(UserWarning, match=r"training goes on without it: .*photo2\.png"):
        stream = small_stream(photos)
        batches = [stream.batch(step) for step in range(stream.batches_per_group * 3)]  # every photo comes up
    assert all(torch.isfinite(b.clean).all() and b.clean.shape == intact.clean.shape for b in batches)
    # The batch that met it says so, for the training process to leave it out of the model card.
    skipped = [entry for batch in batches for entry in batch.skipped]
    assert skipped and {path for path, _ in skipped} == {str(photos[2])}
    assert all("photo2.png" in problem for _, problem in skipped)


def test_shrink_cuts_patches_from_smaller_photographs(tmp_path: Path) -> None:
    # Columns alternating 0.3 / 0.7 inside a disc: a 2x antialiased shrink averages them away.
    size = 192
    rows, cols = np.mgrid[:size, :size]
    inside = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (0.48 * size) ** 2
    stripes = np.where(cols % 2 == 0, 0.3, 0.7)[..., None].repeat(3, axis=2)
    Image.fromarray((np.where(inside[..., None], stripes, 0.0) * 255).round().astype(np.uint8)).save(tmp_path / "s.png")
    settings = {"sigma": 0.0, "clip_probability": 0.0, "border_fraction": 0.0, "patch_size": 32}
    full = small_stream([tmp_path / "s.png"], **settings).batch(0).clean.numpy()
    shrunk = small_stream([tmp_path / "s.png"], shrink=(2,), **settings).batch(0).clean.numpy()

    def stripes_left(patches: np.ndarray) -> float:  # either way round: patches are flipped and turned
        return float(np.abs(np.diff(patches, axis=-1)).mean() + np.abs(np.diff(patches, axis=-2)).mean())

    assert stripes_left(full) > 0.3  # the stripes, a pixel wide
    assert stripes_left(shrunk) < 0.03 and abs(shrunk.mean() - 0.5) < 0.02
    # A factor that would leave the photo smaller than a patch keeps it as it is.
    np.testing.assert_array_equal(small_stream([tmp_path / "s.png"], shrink=(8,), **settings).batch(0).clean, full)
    with pytest.raises(ValueError, match="shrink must be a non-empty list of whole factors"):
        PatchSettings(shrink=(0,))
    with pytest.raises(ValueError, match="shrink changes the photo, not its vessel map"):
        PatchSettings(shrink=(1, 2), targets="vessels")


def test_gain_brightens_clean_patches_into_saturation_and_paper_noise_crosses_it(photos: list[Path]) -> None:
    plain = small_stream(photos, clip_probability=0.0).batch(0).clean.numpy()
    brightened = small_stream(photos, clip_probability=0.0, gain=(2.0, 2.0)).batch(0)
    clean = brightened.clean.numpy()
    assert plain.max() <= 0.95 + 1e-6  # the photos' texture stops at 0.95
    assert (clean == 1.0).mean() > 0.2 and clean.max() == 1.0  # doubled, then clipped at 1
    below = clean[clean < 1.0] * 255 / 2  # unsaturated pixels are twice an 8-bit value
    assert np.allclose(below, below.round(), atol=1e-3)
    assert (brightened.noisy.numpy() > 1.0).mean() > 0.05  # paper protocol: noise is not clipped


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="sigma"):
        PatchSettings(sigma=(30.0, 10.0))
    with pytest.raises(ValueError, match=r"sigma must be a value or a range \[low, high\], got \[5, 25, 50\]"):
        PatchSettings(sigma=[5, 25, 50])
    assert PatchSettings(sigma=np.float32(25)).sigma_range == (25.0, 25.0)  # a numpy number is a value
    with pytest.raises(ValueError, match="clip_probability"):
        PatchSettings(clip_probability=1.5)
    with pytest.raises(ValueError, match="gain"):
        PatchSettings(gain=(0.0, 1.2))
    with pytest.raises(ValueError, match="sampling"):
        PatchSettings(sampling="pixels")
    with pytest.raises(ValueError, match="channels"):
        PatchSettings(channels=())


@pytest.mark.shared
def test_drive_patches_are_mostly_retina(drive_dir: Path) -> None:
    images = sorted((drive_dir / "training" / "images").glob("*.tif"))[:2]
    batch = PatchStream(images, batch_size=16, settings=PatchSettings(80, sigma=25.0)).batch(0)
    assert batch.clean.shape == (16, 3, 80, 80)
    # Fundus patches are reddish: red above blue in most of them.
    red_over_blue = batch.clean[:, 0].mean(dim=(1, 2)) > batch.clean[:, 2].mean(dim=(1, 2))
    assert red_over_blue.float().mean() > 0.7
    centre, rim = validation_crops(images[:1], crop=256, protocols=("camera",))
    assert centre.clean.shape == rim.clean.shape == (256, 256, 3)
    assert centre.mask.all() and 0.2 < rim.mask.mean() < 0.8
