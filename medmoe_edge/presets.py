"""Model presets: the two released variants at real dimensions, and tiny test sizes.

Real-dimension presets reproduce the released shapes (§1.3, §2.6, §6) so that
`medmoe-edge init-random` can benchmark and size-plan without the real weights.
The tiny presets keep every structural feature (partial rotary, q/k/v biases,
interleaved MoE layers, 4 experts + meta) at sizes a unit test runs in milliseconds.
"""

from __future__ import annotations

from enum import Enum

from .spec import ModelSpec, MoESpec, TextSpec, Variant, VisionSpec

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), §1.1.
CLIP_L14_336 = VisionSpec(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16)
# A CLIP-shaped tower small enough for unit tests: 32-px images, 16 patches.
CLIP_TINY = VisionSpec(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)


class Preset(str, Enum):
    """Closed set of model presets (`--preset`)."""

    PHI = "phi"
    STABLELM = "stablelm"
    TINY_PHI = "tiny-phi"
    TINY_STABLELM = "tiny-stablelm"


def _phi(h: int, inter: int, layers: int, heads: int, vocab: int, vision: VisionSpec) -> ModelSpec:
    text = TextSpec(Variant.PHI, vocab, h, inter, layers, heads, heads, partial_rotary_factor=0.4, max_position_embeddings=2048)
    return ModelSpec(text, MoESpec(layers=tuple(range(layers))[::2]), vision, mm_hidden_size=vision.hidden_size)


def _stablelm(h: int, inter: int, layers: int, heads: int, vocab: int, vision: VisionSpec) -> ModelSpec:
    text = TextSpec(Variant.STABLELM, vocab, h, inter, layers, heads, heads, partial_rotary_factor=0.25, max_position_embeddings=4096)
    return ModelSpec(text, MoESpec(layers=tuple(range(layers))[::2]), vision, mm_hidden_size=vision.hidden_size)


PRESETS: dict[Preset, ModelSpec] = {
    # §1.3 / §6: H 2560, 32 layers, FFN 10240, vocab 51200; MoE on even layers.
    Preset.PHI: _phi(2560, 10240, 32, 32, 51200, CLIP_L14_336),
    # H 2048, 24 layers, FFN 5632, vocab 100352.
    Preset.STABLELM: _stablelm(2048, 5632, 24, 32, 100352, CLIP_L14_336),
    # head_dim 20 → 8 rotary dims (the real 32/80 ratio); 4 layers → MoE on 0 and 2.
    Preset.TINY_PHI: _phi(80, 160, 4, 4, 512, CLIP_TINY),
    # head_dim 16 → 4 rotary dims (the real 16/64 ratio).
    Preset.TINY_STABLELM: _stablelm(64, 128, 4, 4, 512, CLIP_TINY),
}

# Released checkpoints were saved in bf16 (§4.1 torch_dtype); tiny ones stay fp32 for exact tests.
DEFAULT_DTYPE: dict[Preset, str] = {Preset.PHI: "bfloat16", Preset.STABLELM: "bfloat16", Preset.TINY_PHI: "float32", Preset.TINY_STABLELM: "float32"}

# The built-in demo model (`medmoe-edge train-demo`): the Phi variant's structure at a size
# that trains on 2 CPU cores in minutes. Hidden and FFN sizes are multiples of 256 so that
# llama.cpp's k-quants apply to every decoder matrix; head_dim 32 → 12 rotary dims (0.4).
# Its own CLIP-style tower sees 64-px images in 8-px patches: 64 image rows per prompt
# (the released models' 336-px / 576-row path is unchanged).
CLIP_DEMO = VisionSpec(image_size=64, patch_size=8, hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4)
DEMO_VOCAB = 1024
DEMO = _phi(256, 512, 4, 8, DEMO_VOCAB, CLIP_DEMO)
