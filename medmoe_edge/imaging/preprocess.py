"""Turn an RGB image into the vision tower's pixel tensor, like CLIPImageProcessor.

Implemented with Pillow and NumPy only, so inference does not import
transformers. CROP mode reproduces transformers' ``CLIPImageProcessor`` (PIL
backend) exactly: the same PIL resize on uint8 pixels, the same crop offsets
and zero padding, the same float64 rescale then float32 normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from PIL import Image

from medmoe_edge.errors import ConfigError, InputError
from medmoe_edge.imaging.io import to_rgb

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageProcessorSpec",
    "PreprocessMode",
    "expand_to_square",
    "preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' CLIPImageProcessor class defaults, used for keys a
# preprocessor_config.json leaves out (as transformers itself would).
_DEFAULT_SIZE = 224
_BICUBIC = 3
_PIL_RESAMPLE = range(0, 6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
_STEP_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize")


class PreprocessMode(str, Enum):
    """How a non-square image is made square."""

    PAD = "pad"  # Med-MoE/LLaVA training ("image_aspect_ratio: pad"): pad with the mean colour, keep everything
    CROP = "crop"  # CLIPImageProcessor as is: resize the shortest edge, centre-crop (cuts the long side)


@dataclass(frozen=True)
class ImageProcessorSpec:
    """The parameters of a CLIP image processor.

    Attributes:
        shortest_edge: resize target for the shorter image side.
        crop_size: (height, width) of the centre crop, i.e. of the output.
        mean: per-channel normalisation mean (on 0..1 values).
        std: per-channel normalisation standard deviation.
        resample: PIL resampling filter (3 = bicubic, as CLIP).
        rescale_factor: multiplier taking uint8 values to 0..1.
        resize_to_square: resize to shortest_edge x shortest_edge ignoring the
            aspect ratio; set when a config gives ``size`` as {"height", "width"}.
    """

    shortest_edge: int
    crop_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = _BICUBIC
    rescale_factor: float = 1 / 255
    resize_to_square: bool = False

    def __post_init__(self) -> None:
        # Normalise containers (lists from JSON) so equality and hashing work,
        # and refuse values that would fail later inside the pipeline.
        object.__setattr__(self, "shortest_edge", _positive_int(self.shortest_edge, "shortest_edge"))
        crop = tuple(self.crop_size) if isinstance(self.crop_size, (tuple, list)) else ()
        if len(crop) != 2:
            raise ConfigError(f"crop_size must be (height, width), got {self.crop_size!r}.")
        object.__setattr__(self, "crop_size", tuple(_positive_int(v, "crop_size") for v in crop))
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        std = _triple(self.std, "std")
        if min(std) <= 0:
            raise ConfigError(f"std values must be positive, got {std!r}.")
        object.__setattr__(self, "std", std)
        if isinstance(self.resample, bool) or not isinstance(self.resample, int) or self.resample not in _PIL_RESAMPLE:
            raise ConfigError(f"resample must be a PIL filter id 0..5 (3 = bicubic), got {self.resample!r}.")
        factor = _number(self.rescale_factor, "rescale_factor")
        if factor <= 0:
            raise ConfigError(f"rescale_factor must be positive, got {factor!r}.")
        object.__setattr__(self, "rescale_factor", factor)
        object.__setattr__(self, "resize_to_square", bool(self.resize_to_square))

    @classmethod
    def clip(cls, image_size: int) -> ImageProcessorSpec:
        """The OpenAI CLIP processor for a square input of `image_size` pixels.

        Args:
            image_size: e.g. 336 for CLIP ViT-L/14-336.

        Returns:
            A spec with shortest_edge = crop = image_size and CLIP mean/std.

        Raises:
            ConfigError: image_size is not a positive integer.
        """
        return cls(
            shortest_edge=image_size,
            crop_size=(image_size, image_size),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
        )

    @classmethod
    def from_preprocessor_config(cls, cfg: dict[str, Any]) -> ImageProcessorSpec:
        """Parse a Hugging Face ``preprocessor_config.json`` of a CLIP image processor.

        Keys that are absent take CLIPImageProcessor's defaults (size and crop
        224, OpenAI CLIP mean/std, bicubic, 1/255), as transformers would.

        Args:
            cfg: the parsed JSON. ``size`` may be an int, {"shortest_edge": n}
                or {"height": n, "width": n}; ``crop_size`` an int or
                {"height", "width"}.

        Returns:
            The spec.

        Raises:
            ConfigError: not a CLIP image processor, a processing step switched
                off, or a value of the wrong type or range.
        """
        if not isinstance(cfg, dict):
            raise ConfigError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}.")
        kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type")
        if kind is not None and not (isinstance(kind, str) and kind.startswith("CLIP")):
            raise ConfigError(
                f"image processor '{kind}' is not supported; medmoe-edge needs a CLIPImageProcessor config."
            )
        for flag in _STEP_FLAGS:
            if cfg.get(flag, True) is not True:
                raise ConfigError(
                    f"preprocessor config has {flag}={cfg[flag]!r}; medmoe-edge only supports CLIP "
                    "processors that resize, centre-crop, rescale and normalise (set it to true)."
                )
        shortest_edge, square = _parse_size(cfg.get("size", {"shortest_edge": _DEFAULT_SIZE}))
        crop = _parse_crop(cfg.get("crop_size", _DEFAULT_SIZE))
        return cls(
            shortest_edge=shortest_edge,
            crop_size=crop,
            mean=_broadcast(cfg.get("image_mean", OPENAI_CLIP_MEAN), "image_mean"),
            std=_broadcast(cfg.get("image_std", OPENAI_CLIP_STD), "image_std"),
            resample=cfg.get("resample", _BICUBIC),
            rescale_factor=cfg.get("rescale_factor", 1 / 255),
            resize_to_square=square,
        )

    def to_preprocessor_config(self) -> dict[str, Any]:
        """Return a ``preprocessor_config.json`` dict that transformers' CLIPImageProcessor loads.

        Returns:
            A JSON-serialisable dict; `from_preprocessor_config` of it equals self.
        """
        size: dict[str, int] = (
            {"height": self.shortest_edge, "width": self.shortest_edge}
            if self.resize_to_square
            else {"shortest_edge": self.shortest_edge}
        )
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": size,
            "resample": self.resample,
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """PAD-mode background colour: LLaVA's ``tuple(int(x * 255) for x in image_mean)``."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad to a square of side max(width, height), the image centred (LLaVA's ``expand2square``).

    Args:
        image: an RGB image.
        fill: background colour.

    Returns:
        `image` itself when already square, else a new square image.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess(image: Image.Image, spec: ImageProcessorSpec, mode: PreprocessMode) -> torch.Tensor:
    """Convert an image to normalised pixels for the vision tower.

    Args:
        image: a PIL image; other modes than RGB are converted with the rules
            of `load_image` (alpha dropped, 16-bit scaled by min/max).
        spec: processor parameters.
        mode: PAD (pad to square with the mean colour first; Med-MoE training)
            or CROP (CLIPImageProcessor unchanged).

    Returns:
        float32 tensor of shape [3, crop_height, crop_width].

    Raises:
        InputError: `mode` is not a PreprocessMode value.
        ImageError: the image mode cannot be converted to RGB.
        TypeError: `image` is not a PIL image.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess expects a PIL.Image.Image, got {type(image).__name__}")
    try:
        mode = PreprocessMode(mode)
    except ValueError:
        choices = ", ".join(m.value for m in PreprocessMode)
        raise InputError(f"unknown preprocess mode {mode!r}; use one of: {choices}.") from None

    rgb = image if image.mode == "RGB" else to_rgb(image)
    if mode is PreprocessMode.PAD:
        rgb = expand_to_square(rgb, spec.pad_fill)
    resized = rgb.resize(_resize_target(rgb.size, spec), resample=spec.resample)
    pixels = _center_crop(np.asarray(resized, dtype=np.uint8), spec.crop_size)
    # Same arithmetic as transformers: rescale in float64, cast to float32,
    # then normalise in float32.
    scaled = (pixels.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    normalised = (scaled - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1), dtype=np.float32))


def _resize_target(size: tuple[int, int], spec: ImageProcessorSpec) -> tuple[int, int]:
    """(width, height) after resizing, as transformers' get_resize_output_image_size(default_to_square=False)."""
    if spec.resize_to_square:
        return spec.shortest_edge, spec.shortest_edge
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _center_crop(pixels: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """Centre-crop an (H, W, C) array as transformers' center_crop, zero-padding if it is too small."""
    height, width = pixels.shape[:2]
    crop_h, crop_w = crop_size
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    # Too small: transformers pastes it into a zero canvas at ceil offsets, then crops.
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    canvas = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad = math.ceil((new_h - height) / 2)
    left_pad = math.ceil((new_w - width) / 2)
    canvas[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top += top_pad
    left += left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _number(value: object, name: str) -> float:
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    return float(value)


def _triple(value: object, name: str) -> tuple[float, float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"{name} must have 3 values (R, G, B), got {value!r}.")
    return tuple(_number(v, name) for v in value)  # type: ignore[return-value]


def _broadcast(value: object, name: str) -> tuple[float, float, float]:
    # transformers accepts one number for all channels.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    return _triple(value, name)


def _parse_size(size: object) -> tuple[int, bool]:
    """(shortest_edge, resize_to_square) from a config's ``size``."""
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive_int(size, "size"), False  # transformers: int + default_to_square=False -> shortest edge
    if isinstance(size, dict):
        keys = set(size)
        if keys == {"shortest_edge"}:
            return _positive_int(size["shortest_edge"], "size.shortest_edge"), False
        if keys == {"height", "width"}:
            height = _positive_int(size["height"], "size.height")
            width = _positive_int(size["width"], "size.width")
            if height != width:
                raise ConfigError(
                    f"size {height}x{width} is not square; medmoe-edge supports square CLIP inputs only."
                )
            return height, True
    raise ConfigError(
        f"unsupported size {size!r} in preprocessor config; use an integer, "
        '{"shortest_edge": n} or {"height": n, "width": n}.'
    )


def _parse_crop(crop: object) -> tuple[int, int]:
    if isinstance(crop, int) and not isinstance(crop, bool):
        side = _positive_int(crop, "crop_size")
        return side, side
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return _positive_int(crop["height"], "crop_size.height"), _positive_int(crop["width"], "crop_size.width")
    raise ConfigError(
        f'unsupported crop_size {crop!r} in preprocessor config; use an integer or {{"height": n, "width": n}}.'
    )
