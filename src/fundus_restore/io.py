"""Reading and writing fundus photographs as float32 arrays on [0, 1].

One decoder per format, chosen by the file's content: PNG through imagecodecs (Pillow
silently reduces 16-bit RGB PNG to 8 bits), TIFF through tifffile (16-bit RGB,
LZW as in DRIVE), JPEG/BMP/GIF through Pillow with the EXIF orientation applied.
Every failure to read a file is an ``ImageFileError`` whose one-line message
names the file and the problem.
"""

from __future__ import annotations

import io
import os
import struct
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif"})
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG output keeps full chroma resolution: thin vessels are a few pixels wide.
_JPEG_QUALITY = 95


class ImageFileError(ValueError):
    """An image file that cannot be read or written; the one-line message names the file and the problem."""


class _UnsupportedImage(ValueError):
    """A well-formed image file of a kind this package does not read (CMYK, several frames...)."""


def _file_error(path: Path, problem: str) -> ImageFileError:
    # Decoder messages can span lines; keep the error to one line. (A plain one-message
    # exception also pickles, e.g. out of DataLoader workers.)
    return ImageFileError(f"{path}: {' '.join(problem.split())}")


def _checked_path(path: str | Path) -> Path:
    """``path`` after the checks every reader shares: a supported type, an existing regular file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise _file_error(path, f"a broken link (to {os.readlink(path)})")
    if not path.exists():  # first: a mistyped folder has no image suffix either
        supported = path.suffix.lower() in SUPPORTED_SUFFIXES
        raise _file_error(path, "no such file" if supported else "no such file or folder")
    if path.is_dir():
        raise _file_error(path, "a folder, not an image file")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise _file_error(path, f"unsupported image type {path.suffix!r} (supported: {', '.join(sorted(SUPPORTED_SUFFIXES))})")
    if not path.is_file():
        raise _file_error(path, "not a regular file")
    return path


def _cannot_read(path: Path, exc: OSError) -> ImageFileError:
    return _file_error(path, f"cannot read file ({exc.strerror or exc})")


def _read_bytes(path: str | Path) -> tuple[Path, bytes]:
    """The file's bytes after the shared checks, refusing an empty file."""
    path = _checked_path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    if not data:
        raise _file_error(path, "empty file")
    return path, data


def _palette_colours(indices: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``palette`` (N×3) looked up at ``indices``, grey (H×W) when every colour the image
    uses is grey: a grey GIF or palette TIFF is a grey photograph."""
    colours = palette[indices]
    used = palette[np.unique(indices)]
    return colours[..., 0] if (used == used[:, :1]).all() else colours


def _tiff_palette(colormap: np.ndarray) -> np.ndarray:
    """A TIFF colormap (3×N, 16-bit) as N×3 samples, 8-bit where it holds 8-bit colours
    scaled by 257 (the standard) or by 256 (as Pillow writes them)."""
    for factor in (257, 256):
        if not (colormap % factor).any():
            return (colormap // factor).astype(np.uint8).T
    return colormap.astype(np.uint16).T


def _decode_tiff(data: bytes) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if len(tif.series) > 1:
            raise _UnsupportedImage(f"holds {len(tif.series)} images; only single-image TIFFs are read")
        series = tif.series[0]
        page = tif.pages[0]
        array = series.asarray()
        # Planar TIFFs store samples first; bring them last like every other format.
        if series.axes.endswith("SYX"):
            array = np.moveaxis(array, -3, -1)
        photometric = page.photometric
        if photometric == tifffile.PHOTOMETRIC.PALETTE:
            return _palette_colours(array, _tiff_palette(page.colormap))
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            if array.dtype == np.bool_:
                return ~array
            if not np.issubdtype(array.dtype, np.unsignedinteger):
                raise _UnsupportedImage(f"white-is-zero samples of type {array.dtype}")
            return np.iinfo(array.dtype).max - array
        if photometric == tifffile.PHOTOMETRIC.SEPARATED:
            raise _UnsupportedImage("CMYK samples; save the photograph as RGB")
    return array


def _decode_pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as opened:
        frames = getattr(opened, "n_frames", 1)
        if frames > 1:
            raise _UnsupportedImage(f"holds {frames} frames; only single images are read")
        opened.load()
        image = ImageOps.exif_transpose(opened)
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P" and not image.has_transparency_data:
        palette = np.asarray(image.getpalette(), dtype=np.uint8).reshape(-1, 3)
        return _palette_colours(np.asarray(image), palette)
    elif image.mode in ("I;16", "I;16L", "I;16B"):
        return np.asarray(image).astype(np.uint16)
    elif image.mode not in ("L", "LA", "RGB", "RGBA"):
        # Palette with transparency, CMYK, YCbCr...: expand to RGB, keeping transparency as alpha (dropped later).
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    return np.asarray(image)


_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF


def _decoder_of(head: bytes) -> str:
    """Which decoder reads a file starting with ``head``: by its content, not its name, so
    that a PNG named .jpg is read as the PNG it is (Pillow would cut 16 bits to 8)."""
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(_TIFF_SIGNATURES):
        return "tiff"
    return "pillow"


def _decode(path: Path, data: bytes) -> np.ndarray:
    """Raw samples (H×W or H×W×C, file dtype) of an image file."""
    decode = {"png": imagecodecs.png_decode, "tiff": _decode_tiff, "pillow": _decode_pillow}[_decoder_of(data[:8])]
    try:
        return decode(data)
    except _UnsupportedImage as exc:
        raise _file_error(path, str(exc)) from exc
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer, not the file
        raise _file_error(path, "truncated or corrupt image (no image format recognised in its content)") from exc
    except Exception as exc:  # decoders raise many types (OSError, ValueError, PngError, ...) for bad content
        raise _file_error(path, f"truncated or corrupt image ({exc})") from exc


def _drop_alpha(path: Path, array: np.ndarray) -> np.ndarray:
    """H×W×1 or H×W×3 from grey, grey+alpha, RGB or RGBA samples."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise _file_error(path, f"array of shape {array.shape} is not a grey or RGB image (with optional alpha)")
    return array[..., :3] if array.shape[-1] >= 3 else array[..., :1]


def _to_unit_float(path: Path, array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / np.float32(255)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / np.float32(65535)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):  # float TIFF: values as written, e.g. unclipped noisy images
        try:  # on the [0, 1] scale: 0-255 floats would be read as far too bright (any unclipped noise is read)
            return checked_float_image(array, "float image", any_negatives=True).astype(np.float32, copy=False)
        except ValueError as error:
            raise _file_error(path, str(error)) from None
    raise _file_error(path, f"unsupported sample type {array.dtype} (8- or 16-bit images, or float TIFF)")


# Unclipped noise takes a [0, 1] image a little past 1 (sigma 55: about 2 at 5 sigma); 0-255 values go far past.
_UNIT_SCALE_LIMIT = 4.0
# Below 0 it takes a few dark pixels (sigma 100 of 255: 3 % below -0.5, about 1.3 sigma under a black
# surround of 30 %); an image on [-1, 1] has its surround and every dark pixel there.
_NEGATIVE_LIMIT = -0.5
_NEGATIVE_SHARE_LIMIT = 0.05


def checked_float_image(
    image: np.ndarray, what: str = "image", data_range: float = 1.0, *, any_negatives: bool = False
) -> np.ndarray:
    """``image`` as an array, refused with a ValueError naming ``what`` unless it holds finite
    floats on about [0, ``data_range``]: integers (uint8 photos) and 0-255 floats would be read
    as far too bright, [-1, 1] floats as far too dark, and NaN would spread, giving silently
    wrong results. ``any_negatives`` leaves out the [-1, 1] check, for a file written with
    unclipped noise of any sigma."""
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range:g}")
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float {what} on the [0, {data_range:g}] scale, got dtype {image.dtype} "
                         "(convert with skimage.util.img_as_float32)")
    if not np.isfinite(image).all():
        raise ValueError(f"the {what} contains NaN or infinite values")
    peak = image.max(initial=0.0)
    if peak > _UNIT_SCALE_LIMIT * data_range:
        raise ValueError(f"{what} values reach {peak:g}: expected the [0, {data_range:g}] scale (divide 0-255 values by 255)")
    negative_share = 0 if any_negatives else np.count_nonzero(image < _NEGATIVE_LIMIT * data_range) / max(image.size, 1)
    if negative_share > _NEGATIVE_SHARE_LIMIT:
        raise ValueError(f"{negative_share:.0%} of the {what}'s values are below {_NEGATIVE_LIMIT * data_range:g}: "
                         f"expected the [0, {data_range:g}] scale (map [-1, 1] values with (x + 1) / 2)")
    return image


def checked_bool_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """``mask`` as a bool array (True where non-zero), refused with a ValueError naming ``what``
    unless it holds two levels, 0 and 1, or for integers 0 and one other (0 and 255 from an
    8-bit file): a soft mask (a probability map, a resized mask's fringe) would otherwise
    count every pixel above 0 as inside."""
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    inside = array[array != 0]
    if np.issubdtype(array.dtype, np.integer):
        others = inside[inside != inside.flat[0]] if inside.size else inside
        if others.size:
            raise ValueError(f"the {what} holds more than two levels (e.g. 0, {inside.flat[0]} and {others.flat[0]}): "
                             "threshold it first (mask > 0)")
    else:
        soft = inside[inside != 1]
        if soft.size:
            raise ValueError(f"the {what} holds values other than 0 and 1 (e.g. {soft.flat[0]:g}): "
                             "threshold a soft mask first (mask > 0.5)")
    return array != 0


def channels_last(image: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """``image`` as H×W×C: with ``channel_axis=None`` an H×W grey image gains a channel
    axis; otherwise its channel axis moves last (a view, not a copy)."""
    array = np.asarray(image)
    if channel_axis is None:
        if array.ndim != 2:
            raise ValueError(f"channel_axis=None is for an H×W grey image, got an array of shape {array.shape}")
        return array[..., None]
    if array.ndim != 3:
        raise ValueError(
            f"expected an H×W×C image (or H×W with channel_axis=None), got an array of shape {array.shape}"
        )
    return np.moveaxis(array, channel_axis, -1)


def read_image(path: str | Path, *, rgb: bool = True) -> np.ndarray:
    """An image file as float32 H×W×C on [0, 1] (16-bit scaled by 65535).

    Alpha is dropped; grey images have C=1, or C=3 when ``rgb`` is true. EXIF
    orientation is applied for JPEG/BMP/GIF (where cameras record it).
    """
    path, data = _read_bytes(path)
    image = _to_unit_float(path, _drop_alpha(path, _decode(path, data)))
    if rgb and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file (e.g. DRIVE's GIF masks and vessel maps) as bool H×W: brighter than half is True.

    Not "any nonzero": DRIVE's second-grader maps paint their background (2, 4, 4),
    which "nonzero" would read as all vessel.
    """
    return read_image(path, rgb=False).max(axis=-1) > 0.5


class ImageHeader(NamedTuple):
    """What an image file's header says: size in pixels and bits per sample (8, 16, or 32 for float TIFF)."""

    height: int
    width: int
    bit_depth: int


def read_header(path: str | Path) -> ImageHeader:
    """Size and bits per sample of an image file from its header, without decoding the pixels
    or reading more of the file than the header (cheap enough to check a whole archive)."""
    path = _checked_path(path)
    try:
        file = path.open("rb")
    except OSError as exc:
        raise _cannot_read(path, exc) from exc
    with file:
        if not file.read(1):
            raise _file_error(path, "empty file")
        file.seek(0)
        try:
            return _parse_header(file)
        except Exception as exc:  # header parsers raise many types for bad content
            raise _file_error(path, f"cannot read image header ({exc})") from exc


def _parse_header(file: BinaryIO) -> ImageHeader:
    decoder = _decoder_of(file.read(8))
    file.seek(0)
    if decoder == "tiff":
        with tifffile.TiffFile(file) as tif:
            page = tif.pages[0]
            # Any float TIFF (float64 too, as numpy writes by default) is read and written as float32.
            bits = 32 if np.issubdtype(page.dtype, np.floating) else 16 if page.dtype == np.uint16 else 8
            return ImageHeader(page.imagelength, page.imagewidth, bits)
    if decoder == "png":
        # IHDR is always the first chunk: signature(8) length(4) "IHDR"(4) width(4) height(4) depth(1).
        data = file.read(25)
        if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 25:
            raise ValueError("not a PNG file")
        width, height = struct.unpack(">II", data[16:24])
        return ImageHeader(height, width, 16 if data[24] == 16 else 8)
    with Image.open(file) as opened:
        width, height = opened.size
        return ImageHeader(height, width, 8)  # JPEG, BMP and GIF hold 8-bit samples


def read_header_of_size(path: str | Path, min_size: int, needed_by: str) -> ImageHeader:
    """``read_header(path)``, refusing an image smaller than ``min_size``² on either side
    (``needed_by`` names what needs that size, for the message)."""
    header = read_header(path)
    if min(header.height, header.width) < min_size:
        raise _file_error(
            Path(path), f"{header.width}×{header.height} pixels, smaller than the {min_size}² {needed_by} needs"
        )
    return header


def image_bit_depth(path: str | Path) -> int:
    """Bits per sample of an image file from its header (no pixel decoding): 8, 16, or 32 (float TIFF)."""
    return read_header(path).bit_depth


# The PNG text keyword of a description (one of the PNG specification's own keywords).
_PNG_DESCRIPTION = b"Description"
_PNG_IHDR_END = 8 + 4 + 4 + 13 + 4  # signature, IHDR's length, type, 13 bytes of data and CRC


def _png_with_text(png: bytes, keyword: bytes, text: str) -> bytes:
    """``png`` with a tEXt chunk after its header (imagecodecs writes none)."""
    data = keyword + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    return png[:_PNG_IHDR_END] + chunk + png[_PNG_IHDR_END:]


def _encode(path: Path, samples: np.ndarray, description: str | None) -> bytes:
    """File bytes of H×W or H×W×3 uint8/uint16 samples, in the format the suffix names,
    with ``description`` (ASCII) in the format's own place for it."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        png = imagecodecs.png_encode(samples)
        return png if description is None else _png_with_text(png, _PNG_DESCRIPTION, description)
    if suffix in _TIFF_SUFFIXES:
        buffer = io.BytesIO()
        photometric = "rgb" if samples.ndim == 3 else "minisblack"
        tifffile.imwrite(buffer, samples, photometric=photometric, compression="zlib", description=description)
        return buffer.getvalue()
    if suffix in (".jpg", ".jpeg"):
        if samples.dtype != np.uint8:
            raise _file_error(path, "JPEG holds 8-bit samples only; write 16-bit images as PNG or TIFF")
        buffer = io.BytesIO()
        comment = {} if description is None else {"comment": description}
        Image.fromarray(samples).save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, **comment)
        return buffer.getvalue()
    raise _file_error(path, f"cannot write {suffix!r} files (write .png, .tif/.tiff or .jpg/.jpeg)")


def read_description(path: str | Path) -> str | None:
    """The description ``write_image`` stored in an image file (PNG text, TIFF
    ImageDescription, JPEG comment), or None when it holds none."""
    path, data = _read_bytes(path)
    try:
        if _decoder_of(data[:8]) == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                description = tif.pages[0].description
                # tifffile's own shape record is no description of ours.
                return None if not description or description.startswith('{"shape"') else description
        with Image.open(io.BytesIO(data)) as opened:
            found = opened.info.get(_PNG_DESCRIPTION.decode()) or opened.info.get("comment")
    except UnidentifiedImageError as exc:  # its message names an in-memory buffer, not the file
        raise _file_error(path, "cannot read image header (no image format recognised in its content)") from exc
    except Exception as exc:  # decoders raise many types for bad content
        raise _file_error(path, f"cannot read image header ({exc})") from exc
    return found.decode("latin-1") if isinstance(found, bytes) else found


def write_image(
    path: str | Path, image: np.ndarray, *, bit_depth: int = 8, description: str | None = None
) -> Path:
    """Write a [0, 1] image (H×W, H×W×1 or H×W×3) as an 8- or 16-bit PNG/TIFF, or 8-bit JPEG.

    Values are clipped to [0, 1] and rounded, except with ``bit_depth=32`` (TIFF
    only), which stores float32 samples as they are: the one way to keep a noisy
    image unclipped (the paper's protocol) in a file. ``description`` (printable ASCII,
    e.g. how the image was made) is stored where each format keeps one: PNG text,
    TIFF ImageDescription, JPEG comment (``read_description`` reads it back). Parent
    folders are created, and the file appears atomically: a failed write never leaves
    a partial file behind.
    """
    path = Path(path)
    if description is not None and not (description.isascii() and description.isprintable()):
        raise ValueError(f"a description must be printable ASCII (for every format), got {description!r}")
    if bit_depth not in (8, 16, 32):
        raise _file_error(path, f"bit depth must be 8, 16 or 32 (float TIFF), not {bit_depth}")
    if bit_depth == 32 and path.suffix.lower() not in _TIFF_SUFFIXES:
        raise _file_error(path, "32-bit float samples can only be written to TIFF (.tif/.tiff)")
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.floating):
        # 0-255 integers would silently clip to white: say so instead.
        raise ValueError(
            f"cannot write a {image.dtype} image to {path}: expected floats on [0, 1] "
            "(convert with skimage.util.img_as_float32)"
        )
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"cannot write an image of shape {image.shape} to {path}: expected H×W, H×W×1 or H×W×3")
    if not np.isfinite(image).all():
        raise ValueError(f"cannot write an image with NaN or infinite values to {path}")
    if bit_depth == 32:
        samples = image.astype(np.float32)
    else:
        top = 2**bit_depth - 1
        samples = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    # The encoders take C-ordered samples only; a resized or transposed view is not.
    data = _encode(path, np.ascontiguousarray(samples), description)
    try:
        write_file_atomically(path, data)
    except OSError as exc:
        raise _file_error(path, f"cannot write file ({exc.strerror or exc})") from exc
    return path


def write_file_atomically(path: Path, data: bytes) -> None:
    """``data`` written to ``path`` whole or not at all (parent folders created): a hidden
    partial file renamed into place, removed when the write fails, whose ``OSError`` is raised."""
    # A short name of its own: the file's name and more could pass the filesystem's limit.
    partial = path.with_name(f".fundus-restore-{uuid.uuid4().hex[:12]}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("xb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:  # Ctrl-C or SIGTERM mid-write too
        try:
            partial.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only filesystem, where the partial file was never made
            pass
        raise


class ImageSource(NamedTuple):
    """An image file and where it lies under the folder it was found in (for a file
    named directly, just its name): the path its outputs mirror."""

    path: Path
    relative: Path


def _is_image(path: Path) -> bool:
    # A broken link is listed, so that a batch reports it rather than skipping it unseen.
    is_file = path.is_file() or (path.is_symlink() and not path.exists())
    return is_file and path.suffix.lower() in SUPPORTED_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path, recursive: bool, exclude: Path | None) -> list[ImageSource]:
    """The images in ``folder`` (and, if ``recursive``, in every non-hidden folder beneath it
    but ``exclude``; links to folders are not followed, as they could loop), sorted by their
    path under ``folder``."""
    if not recursive:
        return [ImageSource(child, Path(child.name)) for child in sorted(folder.iterdir()) if _is_image(child)]
    excluded = None if exclude is None else exclude.resolve()
    found: list[ImageSource] = []
    for root, folders, files in os.walk(folder):
        # Pruned in place, so a hidden or excluded folder is never walked.
        folders[:] = [
            name for name in folders if not name.startswith(".") and Path(root, name).resolve() != excluded
        ]
        found.extend(
            ImageSource(Path(root, name), Path(root, name).relative_to(folder))
            for name in files
            if _is_image(Path(root, name))
        )
    return sorted(found, key=lambda source: source.relative.parts)


def _is_drive_split(folder: Path) -> bool:
    """A folder in DRIVE's layout: ``images/`` beside ``mask/`` or ``1st_manual/`` (not any
    archive that happens to hold a subfolder named images)."""
    return (folder / "images").is_dir() and ((folder / "mask").is_dir() or (folder / "1st_manual").is_dir())


def find_images(
    paths: Iterable[str | Path], *, recursive: bool = False, exclude: Path | None = None
) -> list[ImageSource]:
    """Image files named by ``paths``, each with its path under the folder it came from.

    Each folder expands to its supported images (sorted, hidden files skipped; with
    ``recursive``, also those in its subfolders, hidden ones and ``exclude`` left out,
    e.g. an output folder inside the input tree); explicit files are kept as given. A
    folder in DRIVE's layout (``training/`` or ``test/``, whose photographs lie in
    ``images/`` beside ``mask/`` and ``1st_manual/``) expands to its ``images/``.
    """
    found: list[ImageSource] = []
    for path in map(Path, paths):
        if _is_drive_split(path):
            path = path / "images"
        if path.is_dir():
            found.extend(_images_under(path, recursive, exclude))
        else:
            found.append(ImageSource(path, Path(path.name)))
    return found


def list_images(paths: Iterable[str | Path]) -> list[Path]:
    """The image files of :func:`find_images` (not recursive), without their relative paths."""
    return [source.path for source in find_images(paths)]
