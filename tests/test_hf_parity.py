"""The reference decoder and vision tower against transformers' own Phi, StableLM and CLIP.

With every routed expert's output projection zeroed, a Med-MoE layer reduces to its
meta expert, i.e. a dense layer; the whole decoder must then equal transformers'
`PhiForCausalLM` / `StableLmForCausalLM` (phi-2 / stablelm-2 semantics: parallel vs
sequential block, partial rotary, q/k/v biases, LayerNorm with bias).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.presets import Preset
from medmoe_edge.spec import Variant

from tiny_models import tiny_model


def _hf_decoder(m: MedMoE):
    t = m.spec.text
    common = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, partial_rotary_factor=t.partial_rotary_factor,
        rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
    )
    if t.variant is Variant.PHI:
        cfg = transformers.PhiConfig(hidden_act="gelu_new", layer_norm_eps=t.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, qk_layernorm=False, **common)
        hf = transformers.PhiForCausalLM(cfg)
    else:
        cfg = transformers.StableLmConfig(hidden_act="silu", layer_norm_eps=t.norm_eps, use_qkv_bias=True, use_parallel_residual=False, qk_layernorm=False, **common)
        hf = transformers.StableLmForCausalLM(cfg)
    hf.config._attn_implementation = "eager"
    sd = {}
    for k, v in m.lm.state_dict().items():
        if ".deepspeed_moe." in k or k.startswith("model.mm_projector."):
            continue
        sd[k.replace(".mlp.meta_moe.", ".mlp.")] = v
    if t.variant is Variant.PHI:
        sd["lm_head.bias"] = torch.zeros(t.vocab_size)  # §1.3: Med-MoE's Phi head has no bias
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in k or "inv_freq" in k for k in missing), missing
    return hf.eval()


@pytest.mark.parametrize("preset", [Preset.TINY_PHI, Preset.TINY_STABLELM], ids=lambda p: p.value)
def test_decoder_matches_transformers_when_experts_are_silent(preset):
    m = tiny_model(preset)
    with torch.no_grad():
        for layer in m.lm.model.layers:
            if hasattr(layer.mlp, "experts"):
                for ex in layer.mlp.experts:
                    out = ex.fc2 if m.spec.variant is Variant.PHI else ex.down_proj
                    out.weight.zero_()
                    if out.bias is not None:
                        out.bias.zero_()
    hf = _hf_decoder(m)
    ids = torch.randint(0, m.n_vocab, (2, 19), generator=torch.Generator().manual_seed(0))
    ours, _ = m.forward_embeds(m.embed_tokens(ids), torch.arange(19).expand(2, 19), torch.ones(2, 19, dtype=torch.int64), None)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5


def test_vision_tower_matches_transformers_clip_penultimate_layer():
    m = tiny_model(Preset.TINY_PHI)
    v = m.spec.vision
    cfg = transformers.CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
    )
    hf = transformers.CLIPVisionModel(cfg).eval()
    hf.config._attn_implementation = "eager"
    prefixed = next(iter(hf.state_dict())).startswith("vision_model.")  # transformers 4 vs 5 key layout
    sd = {(k if prefixed else k.removeprefix("vision_model.")): t for k, t in m.vision.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected
    # Only the last layer (unused by select_layer -2), post_layernorm and buffers are ours to skip.
    assert all(f"encoder.layers.{v.num_layers - 1}." in k or "post_layernorm" in k or "position_ids" in k for k in missing), missing
    px = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        theirs = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
    ours = m.vision(px)
    assert ours.shape == (2, v.num_patches, v.hidden_size)
    assert (ours - theirs).abs().max().item() < 1e-5
