"""The Med-MoE image tower and projector as an mmproj GGUF for llama.cpp's mtmd (`clip` arch, `mlp` projector).

Together with the text GGUF (`gguf_text.write_text_gguf`) this is what the llamacpp runtime loads:
mtmd (`libmtmd`, `tools/mtmd`) encodes an image with this file into `image_tokens` rows of the
text model's width, and those rows are decoded as embeddings in place of the `<image>` token.
docs/design/llamacpp-medmoe.md §6 is the design this file follows; in short:

* `clip.projector_type = "mlp"` runs `clip_graph_llava` (`tools/mtmd/models/llava.cpp`), which
  is CLIP ViT + `mm.2(gelu(mm.0(x)))`, Med-MoE's `mlp2x_gelu` projector (spec §1.2).
* Only the ViT layers Med-MoE uses are stored: `mm_vision_select_layer = -2` means the output of
  layer 23 of 24 (`VisionSpec.layers_used`), and our `VisionTower` holds exactly those layers.
  The file says `block_count = layers_used` **and** `clip.vision.feature_layer = [layers_used]`:
  without the explicit feature layer mtmd skips the last stored layer a second time (design §6.1,
  the "skip last layer twice" pitfall).
* No `v.post_ln.*`: mtmd would apply it to the selected features, and Med-MoE takes the hidden
  state before `post_layernorm` (design §6.1).
* CLS is dropped by mtmd (`patches = 1..P`). That is only right with the CLS-order fix to
  `llava.cpp` that `patches/llamacpp-0.3.36-medmoe.patch` carries (design §6.3); an unpatched
  llama.cpp feeds the projected CLS as an image row and shifts every patch's position.
* mtmd normalises pixels itself with `clip.vision.image_mean/std` written here, after its
  fixed-size preprocessor, which copies an image that already has `image_size` pixels per side
  unchanged (design §6.4). The runtime therefore hands mtmd our own preprocessed 8-bit image.

Numerical differences from the PyTorch reference that remain even in F32 (design §3.4, §6.1):

* the ViT's `quick_gelu` is ggml's `gelu_quick`, evaluated through an fp16 lookup table on CPU;
* the projector's activation is exact erf GELU (`ggml_gelu_erf`, computed with `erff` in fp32),
  as Med-MoE's `nn.GELU()` (spec §1.2): the file sets `clip.vision.projector.use_gelu_erf`, a key
  that our llama.cpp patch adds to mtmd (without it mtmd's `mlp` graph uses the tanh
  approximation through an fp16 table, up to ~4.7e-4 per element away).

Precision: dtype="f16" stores the weight matrices (patch embedding, attention, FFN, projector) as
F16, like the legacy llava converter; position and class embeddings, norms and biases stay F32
(added to F32 activations). The patch embedding is a Conv2d kernel [C, 3, p, p]: ggml_conv_2d runs
im2col in the kernel's type, F16 in f16 files (what every legacy llava mmproj does), F32 in f32
files (supported on CPU). `mm.2`'s rows are clip_n_mmproj_embd and must equal the text n_embd.

Tensor layout (numpy shape = torch shape; gguf-py stores it reversed as the ggml `ne`); the names
come from the TensorId table (`medmoe_edge.tensor_ids.TENSOR_NAMES`, components vision and
projector). Only the layers the model holds are written (exactly `layers_used`, model/vision.py);
post-layernorm and any unused last layer are not part of the model (§1.1):

    v.class_embd [C]   v.patch_embd.weight [C, 3, p, p]   v.position_embd.weight [P+1, C]
    v.pre_ln.{weight,bias} [C]
    v.blk.i.{attn_q,attn_k,attn_v,attn_out}.{weight [C, C], bias [C]}
    v.blk.i.{ln1,ln2}.{weight,bias} [C]
    v.blk.i.ffn_up.{weight [F, C], bias [F]}   (CLIP fc1)
    v.blk.i.ffn_down.{weight [C, F], bias [C]} (CLIP fc2)
    mm.0.{weight [H, C], bias [H]}   mm.2.{weight [H, H], bias [H]}

Section numbers (§) without "design" refer to ../shared/reference/medmoe-spec.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError, UnsupportedCheckpoint
from medmoe_edge.tensor_ids import released_state_dict

from .gguf_io import DTYPES, FILE_TYPE, PlannedTensor, TableTensor, plan_table, require_gguf, table_tensors, write_gguf

PROJECTOR_TYPE = "mlp"  # PROJECTOR_TYPE_MLP in tools/mtmd/clip-impl.h
# The projector's activation: exact erf GELU (Med-MoE's mlp2x_gelu is nn.GELU()). Read by the
# patched mtmd (KEY_PROJ_USE_GELU_ERF, patches/llamacpp-0.3.36-medmoe.patch); a stock mtmd ignores it.
PROJ_GELU_ERF_KEY = "clip.vision.projector.use_gelu_erf"

# CLIP activations (`VisionSpec.hidden_act`) and the mtmd key that selects the matching ggml op.
# No key means FFN_GELU_QUICK (clip.cpp load_hparams); "clip.use_gelu" means ggml_gelu (tanh).
_ACT_KEYS: dict[str, dict[str, bool]] = {
    "quick_gelu": {},  # OpenAI CLIP, and so Med-MoE's CLIP-L/14-336
    "gelu_new": {"clip.use_gelu": True},
    "gelu_pytorch_tanh": {"clip.use_gelu": True},
    # exact erf GELU: mtmd has no key for ggml_gelu_erf in the ViT, the tanh form is the closest
    # (|difference| <= ~4.7e-4 per element)
    "gelu": {"clip.use_gelu": True},
}


def check_supported(loaded: LoadedModel) -> None:
    spec, v, proc = loaded.spec, loaded.spec.vision, loaded.processor
    if v.hidden_act not in _ACT_KEYS:
        raise UnsupportedCheckpoint(f"vision hidden_act {v.hidden_act!r} has no mtmd equivalent")
    if proc.crop_size != (v.image_size, v.image_size):
        # mtmd's fixed-size preprocessor makes image_size x image_size inputs; our processor must too.
        raise UnsupportedCheckpoint(f"image processor crop {proc.crop_size} differs from the tower's {v.image_size}x{v.image_size} input")
    layers = len(loaded.model.vision.vision_model.encoder.layers)
    if layers != v.layers_used or layers < 1:
        raise UnsupportedCheckpoint(f"the vision tower holds {layers} layers but mm_vision_select_layer needs {v.layers_used} (mtmd needs at least one)")
    proj = loaded.model.lm.model.mm_projector.image_spatial_proj
    if len(proj) != 3 or proj[2].out_features != spec.text.hidden_size:
        raise UnsupportedCheckpoint("the projector is not mlp2x_gelu (Linear, GELU, Linear) onto the text hidden size")


def _write_metadata(w, loaded: LoadedModel, dtype: str) -> None:
    spec, v, proc = loaded.spec, loaded.spec.vision, loaded.processor
    w.add_name(f"Med-MoE {spec.variant.value} vision tower + projector")
    w.add_description("CLIP ViT (layers up to mm_vision_select_layer, no post-layernorm) and the mlp2x_gelu projector")
    w.add_file_type(FILE_TYPE[dtype])
    w.add_bool("clip.has_vision_encoder", True)  # GGML_ASSERT(has_vision) in clip.cpp
    w.add_bool("clip.has_llava_projector", True)  # informational; the loader ignores it
    w.add_string("clip.projector_type", PROJECTOR_TYPE)
    w.add_uint32("clip.vision.embedding_length", v.hidden_size)
    w.add_uint32("clip.vision.attention.head_count", v.num_heads)
    w.add_uint32("clip.vision.feed_forward_length", v.intermediate_size)
    w.add_uint32("clip.vision.block_count", v.layers_used)
    # Explicit feature layer = number of stored layers: run them all and take the last output
    # (index 0 would be the encoder input, as HF hidden_states). Design §6.1.
    w.add_array("clip.vision.feature_layer", [int(v.layers_used)])
    w.add_uint32("clip.vision.projection_dim", spec.text.hidden_size)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", float(v.layer_norm_eps))
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    # mtmd: pixel = (u8 / 255 - mean) / std in fp32, as our preprocessing (imaging.preprocess).
    w.add_array("clip.vision.image_mean", [float(x) for x in proc.mean])
    w.add_array("clip.vision.image_std", [float(x) for x in proc.std])
    for key, value in _ACT_KEYS[v.hidden_act].items():
        w.add_bool(key, value)
    # mlp2x_gelu's nn.GELU() is the exact erf form (spec §1.2); without this key mtmd's `mlp` graph
    # would use ggml_gelu, the tanh approximation through an fp16 table.
    w.add_bool(PROJ_GELU_ERF_KEY, True)


def write_mmproj_gguf(
    loaded: LoadedModel,
    out_path: str | Path,
    *,
    dtype: str = "f32",
    matrix_dtype: Callable[[TableTensor], str] | None = None,
    codes: Callable[[TableTensor], PlannedTensor | None] | None = None,
) -> None:
    """Write the image tower and projector of a loaded Med-MoE model as an mmproj GGUF.

    Args:
        loaded: `medmoe_edge.checkpoint.load_model(...)` of the checkpoint (any dtype; tensors are
            widened to fp32 before conversion).
        out_path: the .gguf file to write (replaced atomically: temp file + os.replace).
        dtype: "f32" (for parity checks) or "f16" (weight matrices F16; embeddings, norms, biases F32).
        matrix_dtype: "f32" or "f16" per weight matrix (a precision plan); default: `dtype` for all.
        codes: the already-quantized codes of a matrix (a quantization plan's projector), None for the rest.
    Raises:
        InputError: unknown dtype.
        UnsupportedCheckpoint: a tower or processor mtmd's llava graph cannot express.
        RuntimeUnavailable: gguf is not installed.
    """
    if dtype not in DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    require_gguf()
    check_supported(loaded)
    _text, mmproj = table_tensors(released_state_dict(loaded.model), loaded.spec)
    tensors = plan_table(mmproj, matrix_dtype or (lambda t: dtype), codes)
    write_gguf(out_path, "clip", lambda w: _write_metadata(w, loaded, dtype), tensors)


__all__ = ["DTYPES", "PROJECTOR_TYPE", "PROJ_GELU_ERF_KEY", "write_mmproj_gguf"]
