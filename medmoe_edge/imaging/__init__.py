"""Image input: load raster (PNG, JPEG, TIFF, ...) and DICOM files and preprocess them for the vision tower.

    >>> loaded = load_image("scan.dcm")                    # doctest: +SKIP
    >>> pixels = preprocess(loaded.image, ImageProcessorSpec.clip(336), PreprocessMode.PAD)  # doctest: +SKIP
    >>> pixels.shape                                       # doctest: +SKIP
    torch.Size([3, 336, 336])
"""

from __future__ import annotations

from medmoe_edge.imaging.dicom import IntensityMapping
from medmoe_edge.imaging.io import (
    MAX_FILE_BYTES,
    MAX_PIXELS,
    SUPPORTED_FORMATS,
    LoadedImage,
    as_loaded_image,
    load_image,
    to_rgb,
)
from medmoe_edge.imaging.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorSpec,
    PreprocessMode,
    expand_to_square,
    preprocess,
)

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SUPPORTED_FORMATS",
    "ImageProcessorSpec",
    "IntensityMapping",
    "LoadedImage",
    "PreprocessMode",
    "as_loaded_image",
    "expand_to_square",
    "load_image",
    "preprocess",
    "to_rgb",
]
