"""Frozen, typed model specifications.

A `ModelSpec` is everything needed to build the reference model: the language
decoder (`TextSpec`), its MoE layout (`MoESpec`), the CLIP vision tower
(`VisionSpec`) and the projector. Specs are parsed from / written to the
released `config.json` layout by `medmoe_edge.hfconfig`; presets live in
`medmoe_edge.presets`.

Section numbers (§) refer to ../shared/reference/medmoe-spec.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import ConfigError


class Variant(str, Enum):
    """The two released Med-MoE language backbones (§1.3)."""

    PHI = "phi"  # microsoft/phi-2 base: parallel attn+FFN, one LayerNorm, GELU(tanh) FFN with biases
    STABLELM = "stablelm"  # stablelm-2-1_6b base: sequential residual, two LayerNorms, SwiGLU without biases

    @property
    def model_type(self) -> str:
        """The `model_type` string of the released config.json (§4.1)."""
        return {Variant.PHI: "moe_llava_phi", Variant.STABLELM: "moe_llava_stablelm"}[self]

    @property
    def architecture(self) -> str:
        return {Variant.PHI: "MoELLaVAPhiForCausalLM", Variant.STABLELM: "MoELLaVAStablelmForCausalLM"}[self]


class Generation(str, Enum):
    """Checkpoint generation (§0): which MoE implementation produced the state dict."""

    MEDMOE = "medmoe"  # gate with bias + always-on meta expert (Jun–Oct 2024 code); supported
    TINYMED_V1 = "tinymed-v1"  # stock DeepSpeed MoE, no gate bias, no meta expert; refused


@dataclass(frozen=True)
class MoESpec:
    """MoE layout of the decoder (§2.1, §2.7).

    Attributes:
        layers: indices of the decoder layers whose FFN is an MoE block (even layers in the releases).
        num_experts: routed experts per MoE layer (4 in the releases).
        top_k: 1 (the released "top1 + meta expert") or 2 (deterministic second argmax, see §2.3.4).
        use_residual: DeepSpeed residual-MoE form with a learned 2-way coefficient (§2.3.6).
    """

    layers: tuple[int, ...]
    num_experts: int = 4
    top_k: int = 1
    use_residual: bool = False

    def __post_init__(self) -> None:
        if self.top_k not in (1, 2):
            raise ConfigError(f"top_k_experts={self.top_k} is not supported: Med-MoE defines only 1 or 2 (§2.1)")
        if self.num_experts < self.top_k:
            raise ConfigError(f"num_experts={self.num_experts} is smaller than top_k_experts={self.top_k}")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ConfigError(f"moe_layers_idx {list(self.layers)} must be distinct non-negative layer indices")


@dataclass(frozen=True)
class TextSpec:
    """Language decoder hyper-parameters (§1.3)."""

    variant: Variant
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    partial_rotary_factor: float  # Phi 0.4, StableLM rope_pct 0.25
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    head_dim: int = field(init=False)
    rotary_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        head_dim = self.hidden_size // self.num_heads
        # HF Phi: int(partial_rotary_factor * head_dim); StableLM-epoch: int(head_dim * rope_pct).
        rotary_dim = int(self.partial_rotary_factor * head_dim)
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ConfigError(f"rotary dims {rotary_dim} (factor {self.partial_rotary_factor} × head_dim {head_dim}) must be even and in 1..head_dim")
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "rotary_dim", rotary_dim)

    @property
    def ffn_params(self) -> int:
        """Parameters of one FFN (dense layer, routed expert or meta expert)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.variant is Variant.PHI:
            return h * i + i + i * h + h  # fc1 + bias, fc2 + bias
        return 3 * h * i  # gate, up, down; no biases


@dataclass(frozen=True)
class VisionSpec:
    """CLIP ViT vision tower (§1.1): the HF `CLIPVisionModel` config fields we use."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3
    select_layer: int = -2  # mm_vision_select_layer: hidden_states[-2] = input of the last layer
    num_patches: int = field(init=False)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.hidden_act not in ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported (quick_gelu, gelu, gelu_new)")
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ConfigError(f"mm_vision_select_layer {self.select_layer} is out of range for {self.num_layers} layers")
        object.__setattr__(self, "num_patches", (self.image_size // self.patch_size) ** 2)

    @property
    def layers_used(self) -> int:
        """Encoder layers that must run: `hidden_states` has num_layers+1 entries (embeddings first)."""
        return self.select_layer % (self.num_layers + 1)


@dataclass(frozen=True)
class ModelSpec:
    """A whole Med-MoE model: decoder, MoE layout, vision tower, projector."""

    text: TextSpec
    moe: MoESpec
    vision: VisionSpec
    mm_hidden_size: int  # vision hidden size seen by the projector
    projector_type: str = "mlp2x_gelu"
    select_feature: str = "patch"  # CLS dropped

    def __post_init__(self) -> None:
        if any(i >= self.text.num_layers for i in self.moe.layers):
            raise ConfigError(f"moe_layers_idx {list(self.moe.layers)} refers to layers beyond num_hidden_layers={self.text.num_layers}")
        if self.projector_type != "mlp2x_gelu":
            raise ConfigError(f"image_projector_type {self.projector_type!r} is not supported; Med-MoE uses 'mlp2x_gelu'")
        if self.select_feature != "patch":
            raise ConfigError(f"mm_vision_select_feature {self.select_feature!r} is not supported; Med-MoE uses 'patch'")
        if self.mm_hidden_size != self.vision.hidden_size:
            raise ConfigError(f"mm_hidden_size {self.mm_hidden_size} does not match the vision tower's hidden_size {self.vision.hidden_size}")

    @property
    def variant(self) -> Variant:
        return self.text.variant

    @property
    def image_tokens(self) -> int:
        """Rows spliced in place of `<image>` (576 for ViT-L/14-336)."""
        return self.vision.num_patches
