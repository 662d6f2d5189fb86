"""Read and write the released `config.json` layouts (§4.1) and HF CLIP vision configs (§1.1).

The Med-MoE config is a LLaVA/MoE-LLaVA config on top of the base LM's config; only
the fields listed in §2.7 and §4.1 affect inference. Everything is parsed into the
frozen specs of `medmoe_edge.spec`; anything unusable is a `ConfigError` naming the field.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .spec import MoESpec, TextSpec, Variant, VisionSpec

_MODEL_TYPES = {v.model_type: v for v in Variant}


def _req(cfg: dict[str, Any], *names: str, where: str = "config.json") -> Any:
    """First present key of `names` (HF configs of the two bases spell fields differently)."""
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    raise ConfigError(f"{where} has no {' / '.join(repr(n) for n in names)} field; is this a Med-MoE checkpoint?")


def variant_of(cfg: dict[str, Any]) -> Variant:
    """The variant named by `model_type`; a clear error for anything else."""
    mt = cfg.get("model_type")
    if mt not in _MODEL_TYPES:
        raise ConfigError(
            f"config.json model_type is {mt!r}; medmoe-edge loads Med-MoE checkpoints with model_type "
            f"{' or '.join(repr(k) for k in _MODEL_TYPES)}"
        )
    return _MODEL_TYPES[mt]


def text_spec_from_config(cfg: dict[str, Any]) -> TextSpec:
    """Decoder hyper-parameters from a Med-MoE config.json dict."""
    variant = variant_of(cfg)
    heads = int(_req(cfg, "num_attention_heads"))
    if variant is Variant.PHI:
        if cfg.get("qk_layernorm"):
            raise ConfigError("config.json sets qk_layernorm=true, which Med-MoE (phi-2 base) does not use")
        act = cfg.get("hidden_act", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"Phi-variant hidden_act {act!r} is not supported; Med-MoE uses 'gelu_new' (tanh GELU)")
        rotary = float(_req(cfg, "partial_rotary_factor"))
        eps = float(cfg.get("layer_norm_eps", 1e-5))
        max_pos = int(cfg.get("max_position_embeddings", 2048))
    else:
        if cfg.get("use_qkv_bias") is False:
            raise ConfigError("config.json sets use_qkv_bias=false; the StableLM Med-MoE variant has q/k/v biases")
        if cfg.get("use_parallel_residual"):
            raise ConfigError("config.json sets use_parallel_residual=true; the StableLM Med-MoE variant is sequential")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"StableLM-variant hidden_act {act!r} is not supported; Med-MoE uses 'silu' (SwiGLU)")
        rotary = float(_req(cfg, "rope_pct", "partial_rotary_factor"))
        eps = float(cfg.get("norm_eps", cfg.get("layer_norm_eps", 1e-5)))
        max_pos = int(cfg.get("max_position_embeddings", 4096))
    if cfg.get("rope_scaling"):
        raise ConfigError(f"config.json rope_scaling={cfg['rope_scaling']!r} is not supported (Med-MoE uses none)")
    return TextSpec(
        variant=variant,
        vocab_size=int(_req(cfg, "vocab_size")),
        hidden_size=int(_req(cfg, "hidden_size")),
        intermediate_size=int(_req(cfg, "intermediate_size")),
        num_layers=int(_req(cfg, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        partial_rotary_factor=rotary,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=eps,
        max_position_embeddings=max_pos,
    )


def moe_spec_from_config(cfg: dict[str, Any]) -> MoESpec:
    """MoE layout from the nested `moe` dict (§2.7: capacity fields are ignored, as the official code does)."""
    moe = cfg.get("moe")
    if not isinstance(moe, dict):
        raise ConfigError("config.json has no 'moe' dict; this is a dense LLaVA checkpoint, not Med-MoE")
    layers = tuple(int(i) for i in _req(moe, "moe_layers_idx", where="config.json 'moe'"))
    n_exp = moe.get("num_experts", 4)
    if isinstance(n_exp, list):
        if len(set(n_exp)) != 1 or len(n_exp) != len(layers):
            raise ConfigError(f"moe.num_experts {n_exp} must list one equal count per MoE layer")
        n_exp = n_exp[0]
    if int(moe.get("ep_size", 1)) != 1:
        raise ConfigError(f"moe.ep_size={moe['ep_size']} is not supported; Med-MoE checkpoints use ep_size 1")
    return MoESpec(
        layers=layers,
        num_experts=int(n_exp),
        top_k=int(moe.get("top_k_experts", 1)),
        use_residual=bool(moe.get("use_residual", False)),
    )


def text_config_dict(text: TextSpec, moe: MoESpec, *, mm_image_tower: str, mm_hidden_size: int, dtype: str, eos_id: int, pad_id: int) -> dict[str, Any]:
    """A config.json in the released layout (§4.1), as the official training code writes it."""
    moe_dict = {
        "moe_enable": True,
        "moe_mode": "sparse",
        "moe_layers_idx": list(moe.layers),
        "num_experts": [moe.num_experts] * len(moe.layers),
        "ep_size": 1,
        "top_k_experts": moe.top_k,
        "capacity_factor": 1.5,  # present in released configs, ignored at inference (§2.4)
        "eval_capacity_factor": 2.0,
        "min_capacity": 0,
        "use_residual": moe.use_residual,
        "router_aux_loss_coef": 0.0,
        "train_modules": ["fc1", "fc2", "wg"] if text.variant is Variant.PHI else ["gate_proj", "up_proj", "down_proj", "wg"],
    }
    common = {
        "architectures": [text.variant.architecture],
        "model_type": text.variant.model_type,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers,
        "num_attention_heads": text.num_heads,
        "num_key_value_heads": text.num_kv_heads,
        "rope_theta": text.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": text.max_position_embeddings,
        "tie_word_embeddings": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "mm_image_tower": mm_image_tower,
        "mm_hidden_size": mm_hidden_size,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_projector_type": "mlp2x_gelu",
        "video_projector_type": "linear",
        "mm_video_tower": None,
        "video_global_proj": False,
        "video_temproal_proj": False,
        "video_spatial_proj": False,
        "use_mm_proj": True,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": "4.37.0",
        "moe": moe_dict,
    }
    if text.variant is Variant.PHI:
        common.update(
            partial_rotary_factor=text.partial_rotary_factor,
            hidden_act="gelu_new",
            layer_norm_eps=text.norm_eps,
            qk_layernorm=False,
            resid_pdrop=0.1,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        )
    else:
        common.update(rope_pct=text.partial_rotary_factor, norm_eps=text.norm_eps, use_qkv_bias=True, hidden_act="silu")
    return common


def vision_spec_from_config(cfg: dict[str, Any], *, select_layer: int = -2) -> VisionSpec:
    """VisionSpec from an HF CLIPVisionModel config.json, or a full CLIPModel one (nested `vision_config`)."""
    vc = cfg.get("vision_config") if cfg.get("model_type") == "clip" else cfg
    if not isinstance(vc, dict) or vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise ConfigError(f"vision tower config has model_type {cfg.get('model_type')!r}; expected an HF CLIP model ('clip' or 'clip_vision_model')")
    where = "vision tower config.json"
    return VisionSpec(
        image_size=int(_req(vc, "image_size", where=where)),
        patch_size=int(_req(vc, "patch_size", where=where)),
        hidden_size=int(_req(vc, "hidden_size", where=where)),
        intermediate_size=int(_req(vc, "intermediate_size", where=where)),
        num_layers=int(_req(vc, "num_hidden_layers", where=where)),
        num_heads=int(_req(vc, "num_attention_heads", where=where)),
        hidden_act=str(vc.get("hidden_act", "quick_gelu")),
        layer_norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
        num_channels=int(vc.get("num_channels", 3)),
        select_layer=select_layer,
    )


def vision_config_dict(vision: VisionSpec) -> dict[str, Any]:
    """An HF `CLIPVisionModel` config.json for `vision` (loadable by transformers)."""
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.intermediate_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_heads,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_channels": vision.num_channels,
        "hidden_act": vision.hidden_act,
        "layer_norm_eps": vision.layer_norm_eps,
        "projection_dim": 768,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }
