"""Load an image file (PNG, JPEG, TIFF, BMP or DICOM) as an 8-bit RGB PIL image.

Every failure a user can cause is an `ImageError` with a one-line message that
says what is wrong and how to fix it. Limits on file size and pixel count are
checked before pixels are decoded, so a hostile or huge file cannot exhaust
memory.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medmoe_edge.errors import ImageError
from medmoe_edge.imaging.dicom import (
    DICOM_MAGIC_OFFSET,
    IntensityMapping,
    has_dicom_magic,
    linear_to_uint8,
    read_dicom,
)

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "LoadedImage",
    "as_loaded_image",
    "load_image",
    "to_rgb",
]

MAX_FILE_BYTES = 512 * 1024 * 1024  # 512 MiB
MAX_PIXELS = 100_000_000  # 100 megapixels per image / frame

# Pillow format names reported under another name. Pillow reports many camera JPEGs as "MPO"
# (multi-picture JPEG); their first picture is the photograph, the others are previews.
_PIL_NAMES = {"MPO": "JPEG", "DIB": "BMP"}
# Formats whose extra frames are previews or animation steps of one picture, not separate images:
# only their first frame is offered.
_FIRST_FRAME_ONLY = {"MPO"}
# Every raster format Pillow decodes is accepted; these are the ones the tests cover.
SUPPORTED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP", "DICOM")
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# Grayscale modes with more than 8 bits per sample.
_HIGH_DEPTH_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}


@dataclass(frozen=True)
class LoadedImage:
    """An image ready for preprocessing, plus technical facts about its source.

    Only technical, non-identifying information is kept: no DICOM patient,
    study or institution attribute, and no PNG/TIFF/EXIF metadata (the image
    is rebuilt from its pixels, so ``image.info`` is empty).

    Attributes:
        image: the pixels, always mode "RGB", 8 bits per channel, at the
            source's full resolution.
        source_format: "PNG", "JPEG", "TIFF", "BMP" or "DICOM".
        frame: frame (DICOM) or page (TIFF) index used, None for single-frame files.
        n_frames: number of frames/pages in the file (1 for ordinary images).
        source_mode: PIL mode of the file ("L", "I;16", "RGBA", ...) or, for
            DICOM, its Photometric Interpretation ("MONOCHROME2", ...).
        bits_stored: bits per sample in the file (8 for ordinary images).
        intensity_mapping: how samples were mapped to 0..255.
        modality: DICOM Modality code ("CT", "MR", ...), None otherwise.
        transfer_syntax: DICOM transfer syntax name, None otherwise.
    """

    image: Image.Image
    source_format: str
    frame: int | None
    n_frames: int
    source_mode: str
    bits_stored: int
    intensity_mapping: IntensityMapping
    modality: str | None = None
    transfer_syntax: str | None = None


def load_image(
    path: str | os.PathLike[str],
    *,
    frame: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> LoadedImage:
    """Load an image file as 8-bit RGB.

    The format is detected from the content, not the name: a DICOM file is
    recognised by the "DICM" marker at byte 128; every raster format Pillow
    decodes (PNG, JPEG, TIFF, BMP, GIF, WebP, ...) by Pillow's signature checks.
    A DICOM file without the 128-byte preamble is read only if its name ends
    in .dcm, .dicom or .dic.

    Conversions to RGB:
        * grayscale, palette and CMYK images: Pillow's ``convert("RGB")``;
        * RGBA / LA / transparent palette: the alpha channel is dropped (not
          composited), exactly as Med-MoE's training loader
          (``Image.open(...).convert("RGB")``) does;
        * 16-bit ("I;16"), 32-bit integer and float grayscale: linearly scaled
          so the image's own minimum becomes 0 and its maximum 255 (rounded);
          medical exports often use only 10-12 of the 16 bits, so a fixed
          ``>> 8`` would render them nearly black;
        * DICOM: see `medmoe_edge.imaging.dicom` (modality LUT, VOI LUT or
          window, MONOCHROME1 inversion).
    EXIF orientation is not applied, as in Med-MoE's training loader.

    Args:
        path: the image file.
        frame: which frame of a multi-frame DICOM (default: the middle one,
            ``n_frames // 2``) or of a multi-frame raster file (TIFF pages, GIF
            or APNG frames; default: 0).
            0 is accepted for single-frame files.
        max_pixels: refuse images (or frames) with more pixels than this,
            checked from the header before decoding.
        max_file_bytes: refuse files larger than this.

    Returns:
        The loaded image.

    Raises:
        ImageError: the path is missing, a directory, empty, too large, not a
            supported image, truncated or corrupt, has too many pixels, or the
            frame is out of range.
    """
    file_path = Path(path)
    name = file_path.name or str(file_path)
    header = _check_file(file_path, name, max_file_bytes)
    if has_dicom_magic(header):
        return _load_dicom(file_path, frame=frame, max_pixels=max_pixels, force=False)
    try:
        return _load_pil(file_path, name, frame=frame, max_pixels=max_pixels)
    except UnidentifiedImageError:
        pass
    if file_path.suffix.lower() in _DICOM_SUFFIXES:
        return _load_dicom(file_path, frame=frame, max_pixels=max_pixels, force=True)
    raise ImageError(
        f"'{name}' is not a supported image (neither a raster format Pillow decodes nor DICOM); convert it to PNG, "
        "or if it is a DICOM file without the 128-byte preamble, give it a .dcm extension."
    )


def as_loaded_image(image: object, *, frame: int | None = None, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """An image as callers of the Python API hold it, loaded as `load_image` loads a file.

    Args:
        image: a file path, a `LoadedImage`, a `PIL.Image.Image`, a numpy array ([H, W] grayscale
            or [H, W, 3|4] colour; 8-bit, or any other dtype, scaled min-max like 16-bit files)
            or a pydicom `Dataset` (only its technical elements are read, as for a file).
        frame: frame of a multi-frame image (see `load_image`).
    Raises:
        ImageError: an unsupported object, or the checks `load_image` makes.
    """
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, frame=frame, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return _decode_pil(image, "PIL image", frame=frame, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        return _decode_pil(_array_to_pil(image), "numpy image", frame=frame, max_pixels=max_pixels)
    from pydicom.dataset import Dataset

    if isinstance(image, Dataset):
        return _load_dicom(image, frame=frame, max_pixels=max_pixels, force=True)
    raise ImageError(f"an image must be a file path, a PIL.Image, a numpy array, a pydicom Dataset or a LoadedImage, not {type(image).__name__}")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))) or arr.size == 0:
        raise ImageError(f"a numpy image must be [H, W] grayscale or [H, W, 3|4] colour, got shape {list(arr.shape)}")
    if arr.dtype == np.uint8:
        return Image.fromarray(arr, "L" if arr.ndim == 2 else ("RGB" if arr.shape[2] == 3 else "RGBA"))
    if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise ImageError(f"a numpy image must hold finite numbers, got dtype {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = np.zeros(arr.shape, np.uint8) if hi <= lo else np.rint((arr.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return _array_to_pil(scaled)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB with the rules of `load_image`.

    Args:
        image: a PIL image of any mode.

    Returns:
        A new mode "RGB" image with empty ``info`` (no metadata carried over).

    Raises:
        ImageError: the mode cannot be converted, or float pixels are not finite.
    """
    mode = image.mode
    if mode in _HIGH_DEPTH_MODES:
        values = np.asarray(image)
        if values.size and not np.isfinite(values).all():
            raise ImageError(
                f"the {mode} image contains NaN or infinite values; re-export it with finite pixel values."
            )
        low = float(values.min()) if values.size else 0.0
        high = float(values.max()) if values.size else 0.0
        gray = linear_to_uint8(values, low, high)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    else:
        try:
            # RGBA->RGB drops alpha; "1", "L", "P", "CMYK", "YCbCr"... map via Pillow.
            rgb = np.asarray(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError):
            raise ImageError(
                f"images in colour mode '{mode}' are not supported; re-export it as RGB or grayscale PNG."
            ) from None
    # Rebuilding from the array drops all metadata (EXIF, text chunks, ICC).
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")


def _check_file(path: Path, name: str, max_file_bytes: int) -> bytes:
    """Check existence, kind and size; return the first bytes for format sniffing."""
    if not path.exists():
        raise ImageError(f"image file not found: '{path}'; check the path and spelling.")
    if path.is_dir():
        raise ImageError(f"'{path}' is a directory, not an image file; pass the path of one image file.")
    try:
        size = path.stat().st_size
        if size == 0:
            raise ImageError(f"image file '{name}' is empty (0 bytes); re-copy or re-export it.")
        if size > max_file_bytes:
            raise ImageError(
                f"image file '{name}' is {size} bytes, larger than the limit of {max_file_bytes} bytes; "
                "downscale or re-export it, or raise max_file_bytes."
            )
        with path.open("rb") as handle:
            return handle.read(DICOM_MAGIC_OFFSET + 4)
    except PermissionError:
        raise ImageError(f"image file '{name}' cannot be read (permission denied); fix its permissions.") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ImageError(f"image file '{name}' cannot be read ({reason}); check the file.") from None


def _load_dicom(path: Path | object, *, frame: int | None, max_pixels: int, force: bool) -> LoadedImage:
    result = read_dicom(path, frame=frame, max_pixels=max_pixels, force=force)
    return LoadedImage(
        image=Image.fromarray(result.pixels, mode="RGB"),
        source_format="DICOM",
        frame=result.frame,
        n_frames=result.n_frames,
        source_mode=result.photometric_interpretation,
        bits_stored=result.bits_stored,
        intensity_mapping=result.intensity_mapping,
        modality=result.modality,
        transfer_syntax=result.transfer_syntax,
    )


def _load_pil(path: Path, name: str, *, frame: int | None, max_pixels: int) -> LoadedImage:
    """Open with Pillow. Raises UnidentifiedImageError if Pillow does not recognise the file."""
    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's DecompressionBombWarning
        # (its threshold, ~89 Mpx, is below our default limit).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            handle = Image.open(path)  # reads the header only
        except UnidentifiedImageError:
            raise
        except Image.DecompressionBombError:
            raise ImageError(
                f"image '{name}' has more pixels than Pillow's decompression-bomb limit "
                f"({2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels); downscale it before loading."
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise ImageError(f"image '{name}' has a corrupt header; re-export or re-copy it.") from None
        with handle as image:
            return _decode_pil(image, name, frame=frame, max_pixels=max_pixels)


def _decode_pil(image: Image.Image, name: str, *, frame: int | None, max_pixels: int) -> LoadedImage:
    fmt = _PIL_NAMES.get(image.format or "", image.format or "PIL")
    n_frames = 1 if image.format in _FIRST_FRAME_ONLY else int(getattr(image, "n_frames", 1))
    index = 0 if frame is None else frame
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n_frames:
        raise ImageError(
            f"frame {frame!r} is out of range for '{name}', which has {n_frames} "
            f"frame{'s' if n_frames != 1 else ''}; valid frames are 0..{n_frames - 1}."
        )
    try:
        if index:
            image.seek(int(index))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"image '{name}' is {width}x{height} = {width * height} pixels, more than the limit of "
                f"{max_pixels}; downscale it or raise max_pixels."
            )
        # Decode now, inside the try: Pillow decodes lazily, and a truncated
        # file only fails here (LOAD_TRUNCATED_IMAGES stays off on purpose).
        image.load()
        mode = image.mode
        rgb = to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(
            f"image '{name}' has too many pixels for Pillow's decompression-bomb limit; downscale it."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError):
        raise ImageError(
            f"{fmt} image '{name}' is truncated or corrupt and cannot be decoded; re-export or re-copy it."
        ) from None
    bits = _HIGH_DEPTH_MODES.get(mode, 1 if mode == "1" else 8)
    mapping = IntensityMapping.MIN_MAX if mode in _HIGH_DEPTH_MODES else IntensityMapping.NONE
    return LoadedImage(
        image=rgb,
        source_format=fmt,
        frame=index if n_frames > 1 else None,
        n_frames=n_frames,
        source_mode=mode,
        bits_stored=bits,
        intensity_mapping=mapping,
    )
