"""Raster image loading, error messages, and preprocessing parity with transformers."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from medmoe_edge.errors import ConfigError, ImageError, InputError
from medmoe_edge.imaging import (
    ImageProcessorSpec,
    IntensityMapping,
    PreprocessMode,
    load_image,
    preprocess,
)

RNG_SEED = 1234


def random_rgb(width: int, height: int, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message


# --- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".tif", "TIFF"), (".bmp", "BMP")])
def test_lossless_rgb_round_trip(tmp_path: Path, suffix: str, fmt: str) -> None:
    source = random_rgb(37, 23)
    path = tmp_path / f"rgb{suffix}"
    Image.fromarray(source).save(path)

    loaded = load_image(path)

    assert (loaded.source_format, loaded.image.mode, loaded.image.size) == (fmt, "RGB", (37, 23))
    assert np.array_equal(pixels(loaded.image), source)
    assert (loaded.frame, loaded.n_frames, loaded.bits_stored) == (None, 1, 8)
    assert loaded.intensity_mapping is IntensityMapping.NONE
    assert loaded.modality is None and loaded.transfer_syntax is None


def test_grayscale_png_becomes_equal_channels(tmp_path: Path) -> None:
    source = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "gray.png"
    Image.fromarray(source).save(path)

    loaded = load_image(path)

    assert loaded.source_mode == "L"
    for channel in range(3):
        assert np.array_equal(pixels(loaded.image)[..., channel], source)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_grayscale_scaled_by_its_min_and_max(tmp_path: Path, suffix: str) -> None:
    source = np.array([[1000, 2000], [4000, 5000]], dtype=np.uint16)
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(source).save(path)

    loaded = load_image(path)

    # (v - 1000) / 4000 * 255, rounded: 0, 63.75 -> 64, 191.25 -> 191, 255
    assert pixels(loaded.image)[..., 0].tolist() == [[0, 64], [191, 255]]
    assert pixels(loaded.image)[..., 2].tolist() == [[0, 64], [191, 255]]
    assert (loaded.source_mode, loaded.bits_stored) == ("I;16", 16)
    assert loaded.intensity_mapping is IntensityMapping.MIN_MAX


def test_jpeg_round_trip(tmp_path: Path) -> None:
    # A smooth gradient survives JPEG compression within a few levels.
    ramp = np.linspace(0, 255, 64, dtype=np.float64)
    source = np.stack([np.tile(ramp, (48, 1)), np.tile(ramp[::-1], (48, 1)), np.full((48, 64), 128.0)], axis=-1)
    source = source.astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(source).save(path, quality=95)

    loaded = load_image(path)

    assert (loaded.source_format, loaded.image.size) == ("JPEG", (64, 48))
    assert np.abs(pixels(loaded.image).astype(int) - source.astype(int)).max() <= 12
    assert np.abs(pixels(loaded.image).astype(int) - source.astype(int)).mean() < 2.0


def test_rgba_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    rgb = random_rgb(8, 8)
    alpha = np.zeros((8, 8, 1), dtype=np.uint8)  # fully transparent everywhere
    alpha[:4] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA").save(path)

    loaded = load_image(path)

    assert loaded.source_mode == "RGBA"
    assert np.array_equal(pixels(loaded.image), rgb)  # neither black nor white where alpha is 0


def test_palette_png(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    path = tmp_path / "palette.png"
    image.save(path)

    loaded = load_image(path)

    assert tuple(pixels(loaded.image)[0, 0]) == (10, 20, 30)
    assert tuple(pixels(loaded.image)[0, 1]) == (200, 100, 50)


def test_metadata_is_not_carried_over(tmp_path: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Patient Jane Doe")
    path = tmp_path / "tagged.png"
    Image.fromarray(random_rgb(4, 4)).save(path, pnginfo=info)

    loaded = load_image(path)

    assert loaded.image.info == {}
    assert "Jane" not in repr(loaded)


def test_multi_page_tiff_pages(tmp_path: Path) -> None:
    pages = [Image.new("RGB", (5, 4), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])

    first = load_image(path)
    last = load_image(path, frame=2)

    assert (first.frame, first.n_frames, tuple(pixels(first.image)[0, 0])) == (0, 3, (255, 0, 0))
    assert (last.frame, tuple(pixels(last.image)[0, 0])) == (2, (0, 0, 255))
    with pytest.raises(ImageError, match=r"frame 3 is out of range for 'pages.tif', which has 3 frames; .* 0\.\.2"):
        load_image(path, frame=3)


def test_frame_on_single_image(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    Image.fromarray(random_rgb(4, 4)).save(path)
    assert load_image(path, frame=0).frame is None
    with pytest.raises(ImageError, match=r"which has 1 frame; valid frames are 0\.\.0"):
        load_image(path, frame=1)


def test_png_named_dcm_is_read_as_png(tmp_path: Path) -> None:
    path = tmp_path / "actually_png.dcm"
    Image.fromarray(random_rgb(6, 5)).save(path, format="PNG")
    assert load_image(path).source_format == "PNG"


# --- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"image file not found: '.*nope\.png'; check the path") as info:
        load_image(tmp_path / "nope.png")
    assert_one_line(str(info.value))


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"is a directory, not an image file; pass the path of one image file"):
        load_image(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"'empty.png' is empty \(0 bytes\); re-copy or re-export it"):
        load_image(path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError, match=r"'notes.png' is not a supported image \(neither a raster format Pillow decodes nor DICOM\)") as e:
        load_image(path)
    assert_one_line(str(e.value))


def test_text_file_named_dcm(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("this is not a DICOM file either\n" * 20)
    with pytest.raises(ImageError, match=r"'notes.dcm' (has no pixel data|could not be parsed)"):
        load_image(path)


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated_file(tmp_path: Path, suffix: str, fmt: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(random_rgb(64, 64)).save(whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])

    message = rf"{fmt} image 'cut{suffix}' is truncated or corrupt and cannot be decoded"
    with pytest.raises(ImageError, match=message) as info:
        load_image(cut)
    assert_one_line(str(info.value))


@pytest.mark.parametrize(("fmt", "name"), [("GIF", "still.gif"), ("WEBP", "web.webp"), ("PPM", "raw.ppm"), ("TGA", "old.tga")])
def test_every_pillow_raster_format_is_accepted(tmp_path: Path, fmt: str, name: str) -> None:
    path = tmp_path / name
    rgb = random_rgb(8, 8)
    Image.fromarray(rgb).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    loaded = load_image(path)
    assert loaded.source_format == fmt and loaded.image.size == (8, 8) and loaded.n_frames == 1
    if fmt != "GIF":  # GIF is palette-quantised
        assert np.array_equal(np.asarray(loaded.image), rgb)


def test_multi_frame_gif_takes_a_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (0, 128, 255)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).n_frames == 3 and load_image(path).frame == 0
    assert np.asarray(load_image(path, frame=2).image).mean() > 200
    with pytest.raises(ImageError, match=r"frame 3 is out of range .*valid frames are 0\.\.2"):
        load_image(path, frame=3)


def test_api_image_objects_load_like_files(tmp_path: Path) -> None:
    from medmoe_edge.imaging import as_loaded_image

    rgb = random_rgb(10, 12)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    from_file = np.asarray(load_image(path).image)
    assert np.array_equal(np.asarray(as_loaded_image(Image.open(path)).image), from_file)
    assert np.array_equal(np.asarray(as_loaded_image(rgb).image), from_file)
    gray16 = np.arange(120, dtype=np.uint16).reshape(10, 12) * 300
    g = np.asarray(as_loaded_image(gray16).image)
    assert g.shape == (10, 12, 3) and g.min() == 0 and g.max() == 255
    with pytest.raises(ImageError, match=r"\[H, W\] grayscale or \[H, W, 3\|4\] colour, got shape \[2, 3, 4, 5\]"):
        as_loaded_image(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="not list"):
        as_loaded_image([1, 2, 3])


def test_file_larger_than_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(random_rgb(32, 32)).save(path)
    size = path.stat().st_size
    with pytest.raises(ImageError, match=rf"is {size} bytes, larger than the limit of {size - 1} bytes"):
        load_image(path, max_file_bytes=size - 1)
    assert load_image(path, max_file_bytes=size).image.size == (32, 32)


def test_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.fromarray(random_rgb(64, 16)).save(path)
    with pytest.raises(ImageError, match=r"'wide.png' is 64x16 = 1024 pixels, more than the limit of 1023"):
        load_image(path, max_pixels=1023)
    assert load_image(path, max_pixels=1024).image.size == (64, 16)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but which holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def test_pixel_limit_checked_before_decoding(tmp_path: Path) -> None:
    # 108 Mpx claimed, no pixel data: only a header check can give this message
    # (decoding would fail as "truncated").
    path = png_header_only(tmp_path / "huge.png", 12_000, 9_000)
    with pytest.raises(ImageError, match=r"is 12000x9000 = 108000000 pixels, more than the limit of 100000000"):
        load_image(path)


def test_decompression_bomb(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "bomb.png", 20_000, 10_000)
    with pytest.raises(ImageError, match=r"more pixels than Pillow's decompression-bomb limit"):
        load_image(path)


# --- preprocessing parity with transformers ----------------------------------------------------------


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """LLaVA's llava/mm_utils.py expand2square, verbatim in behaviour."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def hf_processor(spec: ImageProcessorSpec):  # noqa: ANN201 - transformers type
    # The PIL backend explicitly: CLIPImageProcessor would switch to the
    # torchvision backend (different resize) wherever torchvision is installed.
    from transformers import CLIPImageProcessorPil

    size = (
        {"height": spec.shortest_edge, "width": spec.shortest_edge}
        if spec.resize_to_square
        else {"shortest_edge": spec.shortest_edge}
    )
    return CLIPImageProcessorPil(
        size=size,
        crop_size={"height": spec.crop_size[0], "width": spec.crop_size[1]},
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        resample=spec.resample,
        rescale_factor=spec.rescale_factor,
    )


def hf_pixels(processor, image: Image.Image) -> torch.Tensor:  # noqa: ANN001
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


SIZES = [(50, 80), (337, 200), (336, 336), (20, 30), (1000, 700), (31, 7)]
SPECS = {
    "clip336": ImageProcessorSpec.clip(336),
    "clip32": ImageProcessorSpec.clip(32),
    # shortest edge below the crop: transformers zero-pads inside center_crop.
    "pad_in_crop": ImageProcessorSpec(
        shortest_edge=24, crop_size=(33, 27), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resample=2
    ),
    "square_resize": ImageProcessorSpec(
        shortest_edge=40, crop_size=(32, 32), mean=(0.48, 0.45, 0.4), std=(0.27, 0.26, 0.28), resize_to_square=True
    ),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_crop_mode_matches_transformers(spec_name: str, size: tuple[int, int]) -> None:
    spec = SPECS[spec_name]
    image = Image.fromarray(random_rgb(*size, seed=size[0] * 1000 + size[1]))

    ours = preprocess(image, spec, PreprocessMode.CROP)
    reference = hf_pixels(hf_processor(spec), image)

    assert ours.dtype == torch.float32
    assert tuple(ours.shape) == (3, *spec.crop_size)
    assert (ours - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pad_mode_matches_expand2square_then_transformers(spec_name: str, size: tuple[int, int]) -> None:
    spec = SPECS[spec_name]
    image = Image.fromarray(random_rgb(*size, seed=size[0] * 1000 + size[1] + 1))
    fill = tuple(int(x * 255) for x in spec.mean)

    ours = preprocess(image, spec, "pad")
    reference = hf_pixels(hf_processor(spec), expand2square(image, fill))

    assert tuple(ours.shape) == (3, *spec.crop_size)
    assert (ours - reference).abs().max().item() <= 1e-5


def test_pad_fill_is_clip_mean_colour() -> None:
    spec = ImageProcessorSpec.clip(336)
    assert spec.pad_fill == (122, 116, 104)
    # A 1-pixel-high image: nearly everything is padding, whose normalised
    # value is (fill/255 - mean) / std per channel.
    image = Image.new("RGB", (300, 1), (0, 0, 0))
    out = preprocess(image, spec, PreprocessMode.PAD)
    expected = [(f / 255 - m) / s for f, m, s in zip((122, 116, 104), spec.mean, spec.std)]
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_preprocess_converts_non_rgb_like_load_image() -> None:
    spec = ImageProcessorSpec.clip(32)
    gray = Image.fromarray(np.full((10, 12), 200, dtype=np.uint8))
    out = preprocess(gray, spec, PreprocessMode.CROP)
    expected = preprocess(Image.new("RGB", (12, 10), (200, 200, 200)), spec, PreprocessMode.CROP)
    assert torch.equal(out, expected)


def test_preprocess_rejects_unknown_mode() -> None:
    with pytest.raises(InputError, match=r"unknown preprocess mode 'stretch'; use one of: pad, crop"):
        preprocess(Image.new("RGB", (4, 4)), ImageProcessorSpec.clip(4), "stretch")  # type: ignore[arg-type]


# --- ImageProcessorSpec <-> preprocessor_config.json --------------------------------------------------


def test_clip_spec_values() -> None:
    spec = ImageProcessorSpec.clip(336)
    assert (spec.shortest_edge, spec.crop_size, spec.resample) == (336, (336, 336), 3)
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073)
    assert spec.std == (0.26862954, 0.26130258, 0.27577711)
    assert spec.rescale_factor == pytest.approx(1 / 255, abs=0)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_config_round_trip(spec_name: str) -> None:
    spec = SPECS[spec_name]
    cfg = json.loads(json.dumps(spec.to_preprocessor_config()))
    assert cfg["image_processor_type"] == "CLIPImageProcessor"
    assert ImageProcessorSpec.from_preprocessor_config(cfg) == spec


@pytest.mark.parametrize("spec_name", ["clip336", "pad_in_crop", "square_resize"])
def test_transformers_loads_the_written_config(tmp_path: Path, spec_name: str) -> None:
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    spec = SPECS[spec_name]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec.to_preprocessor_config()))
    loaded = CLIPImageProcessor.from_pretrained(tmp_path)
    assert (loaded.crop_size["height"], loaded.crop_size["width"]) == spec.crop_size
    assert tuple(loaded.image_mean) == spec.mean and tuple(loaded.image_std) == spec.std
    assert int(loaded.resample) == spec.resample

    pil_backend = CLIPImageProcessorPil.from_pretrained(tmp_path)
    image = Image.fromarray(random_rgb(90, 61))
    for mode in PreprocessMode:
        ours = preprocess(image, spec, mode)
        source = expand2square(image, spec.pad_fill) if mode is PreprocessMode.PAD else image
        assert (ours - hf_pixels(pil_backend, source)).abs().max().item() <= 1e-5


def test_config_variants_parse() -> None:
    base = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    int_sizes = ImageProcessorSpec.from_preprocessor_config({**base, "size": 224, "crop_size": 224})
    assert (int_sizes.shortest_edge, int_sizes.crop_size, int_sizes.resize_to_square) == (224, (224, 224), False)
    square = ImageProcessorSpec.from_preprocessor_config({**base, "size": {"height": 384, "width": 384}})
    assert (square.shortest_edge, square.resize_to_square) == (384, True)
    defaults = ImageProcessorSpec.from_preprocessor_config({"feature_extractor_type": "CLIPFeatureExtractor"})
    assert defaults == ImageProcessorSpec.clip(224)
    scalar_mean = ImageProcessorSpec.from_preprocessor_config({"image_mean": 0.5, "image_std": 0.25})
    assert (scalar_mean.mean, scalar_mean.std) == ((0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"image_processor_type": "SiglipImageProcessor"}, r"'SiglipImageProcessor' is not supported"),
        ({"do_center_crop": False}, r"do_center_crop=False; medmoe-edge only supports"),
        ({"size": {"height": 336, "width": 224}}, r"size 336x224 is not square"),
        ({"size": {"shortest_edge": 336, "longest_edge": 500}}, r"unsupported size"),
        ({"size": -3}, r"size must be a positive integer, got -3"),
        ({"crop_size": "336"}, r"unsupported crop_size '336'"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean must have 3 values"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"std values must be positive"),
        ({"resample": 9}, r"resample must be a PIL filter id 0\.\.5"),
        ({"rescale_factor": "1/255"}, r"rescale_factor must be a finite number"),
        ([1, 2], r"preprocessor config must be a JSON object, got list"),
    ],
)
def test_bad_configs(cfg: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ImageProcessorSpec.from_preprocessor_config(cfg)  # type: ignore[arg-type]
