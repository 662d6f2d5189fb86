"""DICOM loading: rendering pipeline, frames, colour, corrupt files, privacy.

Uses only the files bundled with pydicom (never downloads). Expected pixel
values are derived in the tests from the raw pixel bytes and the DICOM
formulas, not from medmoe_edge's own code.
"""

from __future__ import annotations

import io
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medmoe_edge.errors import ImageError
from medmoe_edge.imaging import IntensityMapping, LoadedImage, load_image

# Header attributes that identify a patient, study or site. A test fails if
# any of their values ever shows up in an object, message, warning or log.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "InstitutionName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyID",
    "StationName",
)


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not bundled"
    return Path(path)


def pixels(loaded: LoadedImage) -> np.ndarray:
    return np.asarray(loaded.image, dtype=np.uint8)


def gray(loaded: LoadedImage) -> np.ndarray:
    """The single channel of a grayscale rendering (asserting R == G == B)."""
    arr = pixels(loaded).astype(np.int64)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
    return arr[..., 0]


def identifying_values(path: Path) -> list[str]:
    ds = pydicom.dcmread(path)
    values = [str(ds.get(k, "")) for k in IDENTIFYING_KEYWORDS]
    return [v for v in values if len(v) >= 4]  # short values ("M", "") would match by chance


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and "Dataset" not in message


# --- rendering -------------------------------------------------------------------------------------


def test_ct_small_min_max_of_hounsfield_units() -> None:
    path = data_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    # 16-bit signed, little endian, no window: HU = raw * slope + intercept,
    # then min..max of the image -> 0..255.
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(128, 128).astype(np.float64)
    assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (
        16,
        1,
        1.0,
        -1024.0,
    )
    hu = raw * 1.0 - 1024.0
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255.0)

    loaded = load_image(path)

    assert loaded.image.mode == "RGB" and loaded.image.size == (128, 128)
    values = gray(loaded)
    assert np.array_equal(values, expected)
    assert (values.min(), values.max()) == (0, 255)
    assert (loaded.source_format, loaded.modality, loaded.source_mode) == ("DICOM", "CT", "MONOCHROME2")
    assert (loaded.bits_stored, loaded.frame, loaded.n_frames) == (16, None, 1)
    assert loaded.transfer_syntax == "Explicit VR Little Endian"
    assert loaded.intensity_mapping is IntensityMapping.MIN_MAX


def test_mr_small_uses_the_window() -> None:
    path = data_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    raw = np.frombuffer(ds.PixelData, dtype="<i2").reshape(64, 64).astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (center, width) == (600.0, 1600.0)
    # PS3.3 C.11.2.1.2.1, LINEAR: below c-0.5-(w-1)/2 -> min, above c-0.5+(w-1)/2 -> max.
    c, w = center - 0.5, width - 1.0
    expected = np.clip((raw - c) / w + 0.5, 0.0, 1.0) * 255.0
    expected[raw <= c - w / 2] = 0.0
    expected[raw > c + w / 2] = 255.0
    expected = np.rint(expected)

    loaded = load_image(path)

    values = gray(loaded)
    diff = np.abs(values - expected)
    assert diff.max() <= 1  # float round-off at exact .5 steps only
    assert (diff == 0).mean() > 0.99
    assert values[raw > c + w / 2].min() == 255
    assert loaded.intensity_mapping is IntensityMapping.WINDOW
    assert (loaded.modality, loaded.image.size) == ("MR", (64, 64))


def test_mr_small_compressed_and_big_endian_variants_render_identically() -> None:
    reference = pixels(load_image(data_file("MR_small.dcm")))
    for name in ("MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(pixels(load_image(data_file(name))), reference), name


def test_monochrome1_is_inverted_exactly_once(tmp_path: Path) -> None:
    # No MONOCHROME1 file is bundled with pydicom: relabel MR_small (window path)
    # and CT_small (min/max path).
    for name in ("MR_small.dcm", "CT_small.dcm"):
        ds = pydicom.dcmread(data_file(name))
        ds.PhotometricInterpretation = "MONOCHROME1"
        inverted_path = tmp_path / f"m1_{name}"
        ds.save_as(inverted_path)

        normal = gray(load_image(data_file(name)))
        inverted = load_image(inverted_path)

        assert np.array_equal(gray(inverted), 255 - normal), name
        assert inverted.source_mode == "MONOCHROME1"


def test_window_in_shared_functional_groups(tmp_path: Path) -> None:
    # Enhanced multi-frame objects keep the window in functional groups.
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    voi = Dataset()
    voi.WindowCenter = ds.WindowCenter
    voi.WindowWidth = ds.WindowWidth
    group = Dataset()
    group.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    del ds.WindowCenter, ds.WindowWidth
    moved = tmp_path / "shared_window.dcm"
    ds.save_as(moved)

    loaded = load_image(moved)

    assert loaded.intensity_mapping is IntensityMapping.WINDOW
    assert np.array_equal(pixels(loaded), pixels(load_image(data_file("MR_small.dcm"))))


# --- multi-frame -----------------------------------------------------------------------------------


def test_multi_frame_defaults_to_middle_frame() -> None:
    path = data_file("rtdose.dcm")  # 15 frames, 32-bit unsigned, Implicit VR Little Endian
    ds = pydicom.dcmread(path)
    frames = np.frombuffer(ds.PixelData, dtype="<u4").reshape(15, 10, 10).astype(np.float64)
    middle = frames[7]
    expected = np.rint((middle - middle.min()) / (middle.max() - middle.min()) * 255.0)

    loaded = load_image(path)
    first = load_image(path, frame=0)

    assert (loaded.frame, loaded.n_frames) == (7, 15)
    assert np.array_equal(gray(loaded), expected)
    assert first.frame == 0
    assert not np.array_equal(pixels(first), pixels(loaded))


def test_rle_rgb_two_frames() -> None:
    path = data_file("SC_rgb_rle_2frame.dcm")
    reference = pydicom.dcmread(path).pixel_array  # (2, 100, 100, 3) uint8

    loaded = load_image(path)

    assert (loaded.frame, loaded.n_frames, loaded.source_mode) == (1, 2, "RGB")
    assert np.array_equal(pixels(loaded), reference[1])
    assert np.array_equal(pixels(load_image(path, frame=0)), reference[0])


@pytest.mark.parametrize("frame", [15, -1, 100])
def test_frame_out_of_range(frame: int) -> None:
    with pytest.raises(ImageError, match=r"frame .* out of range .* 15 frames; valid frames are 0\.\.14") as info:
        load_image(data_file("rtdose.dcm"), frame=frame)
    assert_one_line(str(info.value))


def test_single_frame_accepts_frame_zero_only() -> None:
    assert load_image(data_file("CT_small.dcm"), frame=0).frame is None
    with pytest.raises(ImageError, match=r"has 1 frame; valid frames are 0\.\.0"):
        load_image(data_file("CT_small.dcm"), frame=1)


# --- colour ----------------------------------------------------------------------------------------


def test_ybr_full_422_is_converted_to_rgb_once() -> None:
    # The same picture stored as YBR_FULL_422 (uncompressed) and as RGB (RLE):
    # chroma subsampling costs a few levels; a missing or doubled YBR->RGB
    # conversion would differ by ~100.
    ybr = load_image(data_file("SC_ybr_full_422_uncompressed.dcm"))
    rgb = load_image(data_file("SC_rgb_rle.dcm"))

    diff = np.abs(pixels(ybr).astype(np.int64) - pixels(rgb).astype(np.int64))
    assert ybr.source_mode == "YBR_FULL_422"
    assert diff.max() <= 8
    assert diff.mean() < 1.0
    assert tuple(pixels(rgb)[0, 0]) == (255, 0, 0)


def test_ybr_jpeg_multi_frame() -> None:
    path = data_file("examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422, JPEG baseline
    loaded = load_image(path)
    reference = pydicom.dcmread(path).pixel_array[15]  # pydicom's YBR -> RGB

    assert (loaded.frame, loaded.n_frames, loaded.image.size) == (15, 30, (320, 240))
    assert np.array_equal(pixels(loaded), reference)
    assert not np.array_equal(pixels(load_image(path, frame=0)), pixels(loaded))


def test_16_bit_rgb_keeps_the_high_byte() -> None:
    sixteen = load_image(data_file("SC_rgb_rle_16bit.dcm"))
    eight = load_image(data_file("SC_rgb_rle.dcm"))

    assert sixteen.bits_stored == 16 and sixteen.intensity_mapping is IntensityMapping.HIGH_BITS
    assert np.array_equal(pixels(sixteen), pixels(eight))


def test_palette_colour() -> None:
    path = data_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    index = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(ds.Rows, ds.Columns)
    luts = [
        np.frombuffer(getattr(ds, f"{c}PaletteColorLookupTableData"), dtype="<u2") for c in ("Red", "Green", "Blue")
    ]
    expected = np.stack([lut[index] >> 8 for lut in luts], axis=-1)

    loaded = load_image(path)

    assert loaded.intensity_mapping is IntensityMapping.PALETTE
    assert np.array_equal(pixels(loaded), expected)


# --- detection -------------------------------------------------------------------------------------


def test_dicom_detected_by_content_not_name(tmp_path: Path) -> None:
    disguised = tmp_path / "scan.png"
    shutil.copyfile(data_file("CT_small.dcm"), disguised)

    loaded = load_image(disguised)

    assert loaded.source_format == "DICOM"
    assert np.array_equal(pixels(loaded), pixels(load_image(data_file("CT_small.dcm"))))


def test_dicom_without_preamble_needs_dcm_extension(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=False, implicit_vr=False, little_endian=True)
    assert buffer.getvalue()[128:132] != b"DICM"
    (tmp_path / "bare.dcm").write_bytes(buffer.getvalue())
    (tmp_path / "bare.bin").write_bytes(buffer.getvalue())

    loaded = load_image(tmp_path / "bare.dcm")

    assert loaded.transfer_syntax == "Explicit VR Little Endian"
    assert np.array_equal(pixels(loaded), pixels(load_image(data_file("MR_small.dcm"))))
    with pytest.raises(ImageError, match=r"not a supported image .* give it a \.dcm extension"):
        load_image(tmp_path / "bare.bin")


# --- errors ----------------------------------------------------------------------------------------


def truncated_ct(tmp_path: Path) -> Path:
    data = data_file("CT_small.dcm").read_bytes()
    path = tmp_path / "ct_half.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def ct_with_pixel_length(tmp_path: Path, length: int) -> Path:
    data = bytearray(data_file("CT_small.dcm").read_bytes())
    at = data.find(b"\xe0\x7f\x10\x00OW\x00\x00")  # (7FE0,0010) OW, 4-byte length follows
    assert at > 0
    data[at + 8 : at + 12] = length.to_bytes(4, "little")
    path = tmp_path / f"ct_len_{length}.dcm"
    path.write_bytes(bytes(data))
    return path


def corrupt_patient_name_length(tmp_path: Path) -> Path:
    data = bytearray(data_file("CT_small.dcm").read_bytes())
    at = data.find(b"\x10\x00\x10\x00PN")  # (0010,0010) PN, 2-byte length follows
    assert at > 0
    data[at + 6 : at + 8] = b"\xff\xff"
    path = tmp_path / "ct_bad_name_length.dcm"
    path.write_bytes(bytes(data))
    return path


def test_truncated_dicom(tmp_path: Path) -> None:
    message = r"truncated or corrupt: its pixel data element declares 32768 bytes"
    with pytest.raises(ImageError, match=message) as info:
        load_image(truncated_ct(tmp_path))
    assert_one_line(str(info.value))


def test_pixel_data_length_beyond_end_of_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"declares 2147483632 bytes but \d+ are present; re-export"):
        load_image(ct_with_pixel_length(tmp_path, 0x7FFFFFF0))


def test_pixel_data_shorter_than_image(tmp_path: Path) -> None:
    # Length consistent with the file, but too short for 128x128x16 bit.
    with pytest.raises(ImageError, match=r"is corrupt: its pixel data does not match its image header"):
        load_image(ct_with_pixel_length(tmp_path, 1000))


def test_header_only_dicom(tmp_path: Path) -> None:
    path = tmp_path / "header_only.dcm"
    path.write_bytes(data_file("CT_small.dcm").read_bytes()[:400])
    with pytest.raises(ImageError, match=r"no pixel data .* or the file is truncated"):
        load_image(path)


def test_garbage_after_dicm_marker(tmp_path: Path) -> None:
    # pydicom parses garbage leniently; what matters is that no image is found.
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\xab" * 300)
    with pytest.raises(ImageError, match=r"'garbage.dcm' has no pixel data .* truncated or corrupt"):
        load_image(path)


def test_corrupt_element_length_before_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "bad_name_length.dcm"
    path.write_bytes(corrupt_patient_name_length(tmp_path).read_bytes())
    with pytest.raises(ImageError, match=r"has no pixel data .* truncated or corrupt"):
        load_image(path)


def test_unknown_transfer_syntax(tmp_path: Path) -> None:
    data = data_file("CT_small.dcm").read_bytes()
    path = tmp_path / "unknown_ts.dcm"
    path.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.9.9.9\x00"))
    with pytest.raises(ImageError, match=r"transfer syntax '1\.2\.840\.10008\.9\.9\.9', which pydicom cannot decode"):
        load_image(path)


def test_dicom_without_pixel_data() -> None:
    with pytest.raises(ImageError, match=r"'rtplan.dcm' has no pixel data"):
        load_image(data_file("rtplan.dcm"))


def test_missing_decoder_names_transfer_syntax_and_package() -> None:
    with pytest.raises(
        ImageError,
        match=r"'JPEG-LS Lossless Image Compression' but no decoder for it is installed; install one "
        r"\(pip install python-gdcm or pip install pylibjpeg pylibjpeg-libjpeg or pip install pyjpegls\)",
    ) as info:
        load_image(data_file("MR_small_jpeg_ls_lossless.dcm"))
    assert_one_line(str(info.value))


def test_decoder_failure_suggests_another() -> None:
    # Pillow is installed but cannot decode 12-bit JPEG Extended.
    with pytest.raises(ImageError, match=r"installed decoder \(pillow\) could not decode .*pip install python-gdcm"):
        load_image(data_file("JPEG-lossy.dcm"))


def test_max_pixels_checked_from_rows_and_columns() -> None:
    with pytest.raises(ImageError, match=r"128x128 = 16384 pixels per frame, more than the limit of 16383"):
        load_image(data_file("CT_small.dcm"), max_pixels=128 * 128 - 1)
    assert load_image(data_file("CT_small.dcm"), max_pixels=128 * 128).image.size == (128, 128)


# --- privacy ---------------------------------------------------------------------------------------


def corrupted_copies(tmp_path: Path) -> list[Path]:
    header_only = tmp_path / "ct_header_only.dcm"
    header_only.write_bytes(data_file("CT_small.dcm").read_bytes()[:1200])
    bad_photometric = tmp_path / "ct_bad_photometric.dcm"
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.PhotometricInterpretation = str(ds.PatientName)  # a hostile file may put anything anywhere
    ds.save_as(bad_photometric)
    return [
        truncated_ct(tmp_path),
        ct_with_pixel_length(tmp_path, 0x7FFFFFF0),
        ct_with_pixel_length(tmp_path, 1000),
        header_only,
        bad_photometric,
        corrupt_patient_name_length(tmp_path),
    ]


def test_no_identifying_value_leaks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = data_file("CT_small.dcm")
    secrets = identifying_values(path)
    assert "CompressedSamples^CT1" in secrets and "JFK IMAGING CENTER" in secrets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # writing the hostile copy warns; that is the test's doing
        bad_files = corrupted_copies(tmp_path)

    caplog.clear()
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_image(path)
        texts += [repr(loaded), str(loaded), repr(loaded.__dict__)]
        for bad in bad_files:
            with pytest.raises(ImageError) as info:
                load_image(bad)
            assert_one_line(str(info.value))
            texts += [str(info.value), repr(info.value)]
    texts += [str(w.message) for w in caught]
    texts.append(caplog.text)

    assert len(texts) >= 15
    for secret in secrets + ["CompressedSamples", "JFK"]:
        for text in texts:
            assert secret not in text


def test_hostile_modality_text_is_not_returned(tmp_path: Path) -> None:
    ds = pydicom.dcmread(data_file("MR_small.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that this is not a valid CS value
        ds.Modality = "DOE^JANE"
    path = tmp_path / "hostile_modality.dcm"
    ds.save_as(path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_image(path)

    assert loaded.modality is None
    assert "DOE" not in repr(loaded)
    assert not any("DOE" in str(w.message) for w in caught)


def test_a_pydicom_dataset_loads_like_its_file() -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    from medmoe_edge.imaging import as_loaded_image

    path = get_testdata_file("CT_small.dcm")
    a, b = load_image(path), as_loaded_image(pydicom.dcmread(path))
    assert b.source_format == "DICOM" and b.modality == a.modality
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
