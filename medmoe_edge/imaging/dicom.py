"""Read one frame of a DICOM file as an 8-bit RGB array.

The rendering follows the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2):

1. decode the stored values of one frame (pydicom's pixel decoders);
2. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence
   (``apply_modality_lut``), e.g. stored values -> Hounsfield units for CT;
3. VOI LUT: a VOI LUT Sequence if present, else the first Window
   Center/Width pair (``apply_voi_lut``); if neither exists, the min/max of
   the modality values of the frame is used as the window;
4. linear map of that range to 0..255;
5. MONOCHROME1 ("high values are dark") is inverted here, once: pydicom's
   VOI/windowing functions never invert it themselves.

Colour images (RGB, YBR_*, PALETTE COLOR) become 8-bit RGB; colour samples
with more than 8 bits keep their 8 most significant bits.

Privacy: only the image-pixel module (group 0028), Modality, the functional
groups needed for per-frame rescale/window and the pixel data are parsed
(``dcmread(specific_tags=...)``), so patient and study attributes are never
even read into memory. Messages are written here from technical values only;
pydicom's exception texts, warnings and log records are never passed on,
because they can quote header values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medmoe_edge.errors import ImageError

__all__ = [
    "DicomFrame",
    "IntensityMapping",
    "has_dicom_magic",
    "linear_to_uint8",
    "read_dicom",
]

# "DICM" follows the 128-byte preamble of every conformant DICOM file (PS3.10 7.1).
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"

_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel, Float, Double Float
_MODALITY_TAG = 0x00080060
_SHARED_GROUPS_TAG = 0x52009229
_PER_FRAME_GROUPS_TAG = 0x52009230
_EXTENDED_OFFSET_TAGS = (0x7FE00001, 0x7FE00002)
# Group 0028 holds every technical attribute the pipeline needs: image pixel
# module, rescale, window, VOI/Modality LUTs, palettes. Nothing identifying.
_READ_TAGS = sorted(
    {tag for tag in DicomDictionary if tag >> 16 == 0x0028}
    | {_MODALITY_TAG, _SHARED_GROUPS_TAG, _PER_FRAME_GROUPS_TAG}
    | set(_EXTENDED_OFFSET_TAGS)
    | set(_PIXEL_DATA_TAGS)
)
_UNDEFINED_LENGTH = 0xFFFFFFFF

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# After decoding, JPEG 2000 decoders have already undone the ICT/RCT colour
# transform, so these are RGB samples.
_RGB_LIKE = ("RGB", "YBR_ICT", "YBR_RCT")
_YBR = ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420")
_PALETTE = "PALETTE COLOR"
_KNOWN_PHOTOMETRIC = _MONOCHROME + _RGB_LIKE + _YBR + (_PALETTE, "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK")

# pip distributions for pydicom's decoder plugin requirements; only names that
# differ from the import name need an entry.
_PIP_NAMES = {"gdcm": "python-gdcm"}


class IntensityMapping(str, Enum):
    """How the source samples were mapped to 8-bit values."""

    NONE = "none"  # already 8-bit
    MIN_MAX = "min-max"  # linear from the data's own min..max
    WINDOW = "window"  # DICOM Window Center/Width (first pair)
    VOI_LUT = "voi-lut"  # DICOM VOI LUT Sequence (first LUT)
    HIGH_BITS = "high-bits"  # colour samples > 8 bit: the 8 most significant bits
    PALETTE = "palette"  # DICOM palette colour lookup


@dataclass(frozen=True, eq=False)
class DicomFrame:
    """One rendered DICOM frame and the technical facts about it.

    Attributes:
        pixels: uint8 array of shape (rows, columns, 3), RGB.
        frame: index of the frame used, or None for a single-frame file.
        n_frames: number of frames in the file.
        modality: e.g. "CT", "MR"; None when absent or not a plain code.
        photometric_interpretation: as stored in the file, e.g. "MONOCHROME1".
        bits_stored: bits per sample as stored.
        transfer_syntax: transfer syntax name, e.g. "Explicit VR Little Endian".
        intensity_mapping: how samples were mapped to 0..255.
    """

    pixels: np.ndarray
    frame: int | None
    n_frames: int
    modality: str | None
    photometric_interpretation: str
    bits_stored: int
    transfer_syntax: str
    intensity_mapping: IntensityMapping


def has_dicom_magic(header: bytes) -> bool:
    """Return True when `header` (the file's first bytes) has the "DICM" marker at offset 128."""
    return header[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == DICOM_MAGIC


def linear_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map `low`..`high` linearly to 0..255 (rounded to nearest, clipped).

    Args:
        values: samples of any numeric dtype.
        low: value that becomes 0.
        high: value that becomes 255; if it does not exceed `low` (a constant
            image) every output is 0.

    Returns:
        uint8 array of the same shape.
    """
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) / (high - low) * 255.0
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0.0, 255.0).astype(np.uint8)


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging API
        return False


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records, which can quote header values."""
    logger = logging.getLogger("pydicom")
    drop = _DropAll()
    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)


def read_dicom(
    path: str | os.PathLike[str] | Dataset,
    *,
    frame: int | None = None,
    max_pixels: int,
    force: bool = False,
) -> DicomFrame:
    """Read and render one frame of a DICOM file.

    Args:
        path: the DICOM file, or a dataset already read with pydicom (only its technical
            elements are used, as for a file).
        frame: frame index for multi-frame files; default the middle frame
            ``n_frames // 2``. 0 is accepted for single-frame files.
        max_pixels: refuse frames with more than this many pixels
            (Rows * Columns), checked before any pixel is decoded.
        force: parse files without the "DICM" marker (no preamble).

    Returns:
        The rendered frame.

    Raises:
        ImageError: unreadable or corrupt file, no pixel data, no installed
            decoder for its transfer syntax, frame out of range, too many pixels.
    """
    name = "DICOM dataset" if isinstance(path, Dataset) else Path(path).name
    with _quiet_pydicom():
        try:
            ds = path if isinstance(path, Dataset) else _read_dataset(path, name, force)
            transfer_syntax = _transfer_syntax(ds, name)
            ts_name = _ts_name(transfer_syntax)
            info = _pixel_info(ds, name)
            n_frames = info["number_of_frames"]
            rows, columns = info["rows"], info["columns"]
            if rows * columns > max_pixels:
                raise ImageError(
                    f"DICOM file '{name}' has {columns}x{rows} = {rows * columns} pixels per frame, more "
                    f"than the limit of {max_pixels}; downscale it or raise max_pixels."
                )
            index = _frame_index(frame, n_frames, name)
            _check_pixel_data_length(ds, name)
            arr, photometric = _decode(ds, index, transfer_syntax, ts_name, name)
            _apply_functional_groups(ds, index)
            stored_photometric = _clean_photometric(info.get("photometric_interpretation"))
            pixels, mapping = _render(arr, photometric, ds, name)
            modality = _clean_code(ds.get(_MODALITY_TAG))
        except ImageError:
            raise
        except Exception as exc:  # last line of defence: never let pydicom's text (header values) through
            raise ImageError(
                f"DICOM file '{name}' has a malformed header ({type(exc).__name__}); re-export it from "
                "the PACS or viewer."
            ) from None

    return DicomFrame(
        pixels=pixels,
        frame=index if n_frames > 1 else None,
        n_frames=n_frames,
        modality=modality,
        photometric_interpretation=stored_photometric,
        bits_stored=int(info.get("bits_stored", 0)),
        transfer_syntax=ts_name,
        intensity_mapping=mapping,
    )


def _read_dataset(path: str | os.PathLike[str], name: str, force: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, force=force, specific_tags=_READ_TAGS)
    except Exception as exc:  # pydicom raises many types on malformed input; its text may quote values
        raise ImageError(
            f"DICOM file '{name}' could not be parsed: it is truncated or not valid DICOM "
            f"({type(exc).__name__}); re-export it from the PACS or viewer."
        ) from None


def _transfer_syntax(ds: Dataset, name: str) -> UID:
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is not None:
        return UID(str(tsyntax))
    # A file without meta header (read with force): the encoding pydicom
    # detected while parsing tells us which native transfer syntax it uses.
    implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
    if implicit_vr is True and little_endian is True:
        tsyntax = ImplicitVRLittleEndian
    elif implicit_vr is False and little_endian is True:
        tsyntax = ExplicitVRLittleEndian
    elif implicit_vr is False and little_endian is False:
        tsyntax = ExplicitVRBigEndian
    else:
        raise ImageError(
            f"DICOM file '{name}' has no transfer syntax and its encoding cannot be detected; "
            "re-export it as a standard DICOM file (with file meta information)."
        )
    ds.file_meta.TransferSyntaxUID = tsyntax
    return tsyntax


def _ts_name(tsyntax: UID) -> str:
    label = tsyntax.name
    if label != str(tsyntax):
        return label  # a name from pydicom's UID dictionary
    # Unknown UIDs come back verbatim: print them only if they look like a UID,
    # since a malformed file could put any text there.
    return label if re.fullmatch(r"[0-9.]{1,64}", label) else "unknown"


def _pixel_info(ds: Dataset, name: str) -> dict[str, int | str]:
    if not any(tag in ds for tag in _PIXEL_DATA_TAGS):
        raise ImageError(
            f"DICOM file '{name}' has no pixel data (it is not an image, e.g. a report, RT plan or "
            "DICOMDIR, or the file is truncated or corrupt); pass an intact image DICOM instead."
        )
    try:
        info = as_pixel_options(ds)
        info["number_of_frames"] = int(info["number_of_frames"])
        info["rows"] = int(info["rows"])
        info["columns"] = int(info["columns"])
    except Exception:  # missing or non-numeric group 0028 values
        raise ImageError(
            f"DICOM file '{name}' lacks a valid Rows, Columns or Number of Frames; the header is "
            "corrupt, re-export the file."
        ) from None
    if min(info["rows"], info["columns"], info["number_of_frames"]) < 1:
        raise ImageError(f"DICOM file '{name}' declares an empty image (0 rows, columns or frames); re-export it.")
    return info


def _frame_index(frame: int | None, n_frames: int, name: str) -> int:
    if frame is None:
        # The middle slice of a volume is the most representative single view.
        return n_frames // 2
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < n_frames:
        raise ImageError(
            f"frame {frame!r} is out of range for DICOM file '{name}', which has {n_frames} "
            f"frame{'s' if n_frames != 1 else ''}; valid frames are 0..{n_frames - 1}."
        )
    return int(frame)


def _check_pixel_data_length(ds: Dataset, name: str) -> None:
    # pydicom silently reads up to end-of-file when the declared element
    # length is larger than what is left, so compare declared with actual.
    raw = ds.get_item(0x7FE00010)
    if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
        if raw.value is None or len(raw.value) != raw.length:
            raise ImageError(
                f"DICOM file '{name}' is truncated or corrupt: its pixel data element declares "
                f"{raw.length} bytes but {0 if raw.value is None else len(raw.value)} are present; "
                "re-export or re-copy the file."
            )


def _pip_hint(missing: list[str]) -> str:
    """Turn pydicom's 'plugin - requires a>=1 and b>=2' strings into pip commands."""
    commands = []
    for entry in missing:
        _, _, requirement = entry.partition("requires ")
        packages = []
        for part in requirement.split(" and "):
            package = re.split(r"[<>=!~ ]", part.strip(), maxsplit=1)[0]
            if package and package != "numpy":
                packages.append(_PIP_NAMES.get(package, package))
        if packages:
            commands.append("pip install " + " ".join(packages))
    return " or ".join(commands)


def _decode(ds: Dataset, index: int, tsyntax: UID, ts_name: str, name: str) -> tuple[np.ndarray, str]:
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageError(
            f"DICOM file '{name}' uses transfer syntax '{ts_name}', which pydicom cannot decode; "
            "re-export it uncompressed (Explicit VR Little Endian)."
        ) from None
    if not decoder.is_available:
        hint = _pip_hint(decoder.missing_dependencies)
        install = f"install one ({hint}) or " if hint else ""
        raise ImageError(
            f"DICOM file '{name}' uses transfer syntax '{ts_name}' but no decoder for it is installed; "
            f"{install}re-export it uncompressed."
        )
    try:
        arr, meta = decoder.as_array(ds, index=index, validate=True, raw=False, **as_pixel_options(ds))
    except Exception as exc:  # decoders raise many types; their text may quote values
        if decoder.is_native:
            raise ImageError(
                f"DICOM file '{name}' is corrupt: its pixel data does not match its image header (size, "
                f"bit depth or photometric interpretation; {type(exc).__name__}); re-export or re-copy the file."
            ) from None
        hint = _pip_hint(decoder.missing_dependencies)
        extra = f"; another decoder may succeed ({hint})" if hint else ""
        raise ImageError(
            f"DICOM file '{name}': the installed decoder ({', '.join(decoder.available_plugins)}) could not "
            f"decode its '{ts_name}' pixel data (corrupt data or an unsupported variant){extra}, "
            "or re-export it uncompressed."
        ) from None
    return arr, _clean_photometric(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))


def _apply_functional_groups(ds: Dataset, index: int) -> None:
    """Copy the frame's rescale and window from enhanced multi-frame functional groups.

    Enhanced CT/MR/XA objects keep Rescale Slope/Intercept and Window
    Center/Width inside (Per-frame|Shared) Functional Groups instead of at the
    top level, where pydicom's LUT functions look. Per-frame values win over
    shared ones, which win over top-level ones (PS3.3 C.7.6.16).
    """
    sources = []
    shared = ds.get(_SHARED_GROUPS_TAG)
    if shared is not None and len(shared.value) > 0:
        sources.append(shared.value[0])
    per_frame = ds.get(_PER_FRAME_GROUPS_TAG)
    if per_frame is not None and index < len(per_frame.value):
        sources.append(per_frame.value[index])
    for group in sources:  # shared first, so per-frame overwrites it
        for seq_name, keywords in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            seq = group.get(seq_name)
            if not seq:
                continue
            for keyword in keywords:
                if keyword in seq[0]:
                    setattr(ds, keyword, seq[0][keyword].value)


def _render(arr: np.ndarray, photometric: str, ds: Dataset, name: str) -> tuple[np.ndarray, IntensityMapping]:
    try:
        if photometric in _MONOCHROME:
            if arr.ndim != 2:
                raise ValueError("monochrome frame is not 2-D")
            gray, mapping = _render_monochrome(arr, ds)
            if photometric == "MONOCHROME1":
                gray = 255 - gray  # the only inversion in the pipeline
            return np.repeat(gray[:, :, None], 3, axis=2), mapping
        if photometric == _PALETTE:
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return _high_bits(rgb, bits), IntensityMapping.PALETTE
        if photometric in _YBR:
            arr = convert_color_space(arr, photometric, "RGB")
            photometric = "RGB"
        if photometric in _RGB_LIKE and arr.ndim == 3 and arr.shape[2] == 3:
            bits = int(ds.get("BitsStored", 8))
            mapping = IntensityMapping.NONE if bits <= 8 else IntensityMapping.HIGH_BITS
            return _high_bits(arr, bits), mapping
    except ImageError:
        raise
    except Exception:  # malformed LUTs or windows; pydicom's text may quote values
        raise ImageError(
            f"DICOM file '{name}' has an invalid rescale, window, VOI or palette lookup table; "
            "re-export it from the PACS or viewer."
        ) from None
    raise ImageError(
        f"DICOM file '{name}' has photometric interpretation '{photometric}', which is not supported; "
        "re-export it as MONOCHROME2 or RGB."
    )


def _high_bits(arr: np.ndarray, bits: int) -> np.ndarray:
    # Keeping the top 8 bits maps both x*256 and x*257 16-bit encodings of an
    # 8-bit colour back to x, which a rescale by 255/65535 would not.
    if bits <= 8:
        return np.clip(arr, 0, 255).astype(np.uint8)
    return (arr.astype(np.uint64) >> np.uint64(bits - 8)).clip(0, 255).astype(np.uint8)


def _render_monochrome(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, IntensityMapping]:
    values = apply_modality_lut(arr, ds)
    voi_seq = ds.get("VOILUTSequence")
    # Same validity tests as pydicom's apply_voi_lut, so we know which it applies.
    has_voi_lut = bool(voi_seq) and all(voi_seq[0].get(k) is not None for k in ("LUTDescriptor", "LUTData"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None

    if has_voi_lut:
        # A LUT maps integer inputs; round rescaled values onto that domain.
        descriptor = voi_seq[0].LUTDescriptor
        entries = int(descriptor[0]) or 2**16
        first = int(descriptor[1])
        lut_values = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds, index=0)
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0)
        # The LUT's own output range, not its nominal bit depth: many files
        # declare 16-bit entries but use only 12 bits.
        return linear_to_uint8(out, float(lut_values.min()), float(lut_values.max())), IntensityMapping.VOI_LUT
    if has_window:
        out = apply_voi_lut(values, ds, index=0)  # first window when several are given
        low, high = _window_output_range(ds)
        return linear_to_uint8(out, low, high), IntensityMapping.WINDOW
    return linear_to_uint8(values, float(np.min(values)), float(np.max(values))), IntensityMapping.MIN_MAX


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """The (y_min, y_max) range pydicom's ``apply_windowing`` maps a window onto.

    Mirrors pydicom 3.0 ``apply_windowing``: the modality LUT's output range,
    i.e. the stored-value range after Rescale Slope/Intercept, or 0..2^n-1 for
    a Modality LUT Sequence.
    """
    bits_stored = int(ds.BitsStored)
    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        return 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits_stored - 1)
    else:
        low, high = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _clean_photometric(value: object) -> str:
    """A standard photometric interpretation, or "non-standard"; never arbitrary header text."""
    text = str(getattr(value, "value", value) or "").strip()
    return text if text in _KNOWN_PHOTOMETRIC else "non-standard"


def _clean_code(element: object) -> str | None:
    """Modality as a plain code string ("CT"), or None; never arbitrary header text."""
    value = getattr(element, "value", None)
    if isinstance(value, str) and re.fullmatch(r"[A-Z0-9_]{1,16}", value.strip()):
        return value.strip()
    return None
