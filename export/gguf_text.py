"""The Med-MoE language model as a GGUF file for the patched llama.cpp (`medmoe-phi2` / `medmoe-stablelm`).

The two architectures exist only in llama.cpp built with `patches/llamacpp-0.3.36-medmoe.patch`
(`scripts/build_llamacpp.sh`); docs/design/llamacpp-medmoe.md §5 and §8 are the design this
file follows. Only the text decoder is written here; the image tower and projector go into a
separate mmproj file.

Layout (numpy shape = torch shape; gguf-py stores it reversed as the ggml `ne`). Every name comes
from the TensorId table (`medmoe_edge.tensor_ids.TENSOR_NAMES`), walked over the model's state dict;
a tensor the table does not name for GGUF is an error, never left out silently:

    token_embd.weight [V, H]      output_norm.{weight,bias} [H]      output.weight [V, H]
    blk.i.attn_norm.{weight,bias}, blk.i.attn_{q,k,v}.{weight,bias}, blk.i.attn_output.weight
    (+ .bias for Phi), blk.i.ffn_norm.{weight,bias} (StableLM only), and then
      dense layer i:  ffn_up, ffn_down (+ ffn_gate for StableLM; + biases for Phi)
      MoE layer i:    ffn_gate_inp.{weight,bias}   the frozen domain router, [E, H] / [E]
                      ffn_{up,down}_exps (+ ffn_gate_exps)   experts stacked to [E, out, in]
                      ffn_{up,down}_exps.bias      Phi only, [E, out]
                      ffn_{up,down}_shexp (+ ffn_gate_shexp, + biases for Phi)   the meta expert

Token embedding and output rows are the model's `n_vocab`, already truncated to len(tokenizer) by
`load_model` (spec §4.2.6). NEOX rope (rotate-half on the first rotary_dim dims) needs no q/k row
permutation, so attention weights are written as the checkpoint holds them.

Which layers are MoE is the per-layer `<arch>.expert_used_count` array (k on MoE layers, 0 on
dense ones, spec §2.1), so the file needs no new metadata key.

Precision: with dtype="f16" the matrices are stored as F16, but the router, every norm and
every bias stay F32. The router must see unrounded activations to pick the same expert as the
reference (spec §2.3.1 computes it in fp32), and llama.cpp's CPU `add_id`, which applies the
expert biases, accepts only F32 operands.

Section numbers (§) refer to ../shared/reference/medmoe-spec.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from medmoe_edge.checkpoint import LoadedModel, checkpoint_infos, load_model, resolve_model_dir
from medmoe_edge.errors import InputError, UnsupportedCheckpoint
from medmoe_edge.spec import ModelSpec, Variant
from medmoe_edge.tensor_ids import released_state_dict

from .gguf_io import DTYPES, FILE_TYPE, PlannedTensor, TableTensor, plan_table, require_gguf, table_tensors, write_gguf

ARCH = {Variant.PHI: "medmoe-phi2", Variant.STABLELM: "medmoe-stablelm"}

# gguf-py constants, spelled out so that this module imports without gguf installed.
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_GATING_SOFTMAX = 1  # LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def _tokenizer_pre(variant: Variant, pre_tokenizer: dict | None) -> str:
    """`tokenizer.ggml.pre`: the pre-tokenizer regex llama.cpp applies before BPE.

    The released tokenizers are phi-2's GPT-2 BPE ("phi-2") and stablelm-2's Arcade100k ("stablelm2",
    a Split regex in its tokenizer.json). The tokenizers of random and demo checkpoints are GPT-2
    byte-level BPE (`medmoe_edge.tokenizer.train_bpe`) for both variants, so a StableLM-shaped
    model with such a tokenizer gets the GPT-2 regex, which is what HF applies to it.
    """
    gpt2_regex = bool(pre_tokenizer) and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True)
    if variant is Variant.PHI:
        if pre_tokenizer is not None and not gpt2_regex:
            raise UnsupportedCheckpoint(f"the Phi tokenizer's pre-tokenizer {pre_tokenizer.get('type')!r} is not GPT-2 byte-level BPE: llama.cpp's 'phi-2' pre-tokenizer would split text differently")
        return "phi-2"
    return "gpt-2" if gpt2_regex else "stablelm2"


def _vocab(hf, variant: Variant, n_vocab: int) -> _Vocab:
    """Tokens, types and merges for llama.cpp's `gpt2` (byte-level BPE) tokenizer model."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedCheckpoint("GGUF export needs a fast (tokenizer.json) tokenizer; this checkpoint has a slow one")
    tj = json.loads(backend.to_str())
    if tj["model"]["type"] != "BPE":
        raise UnsupportedCheckpoint(f"GGUF export supports byte-level BPE tokenizers only, not {tj['model']['type']}")
    # tokenizers writes merges as "a b" (older) or ["a", "b"] (newer); GGUF stores "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    if not merges:
        raise UnsupportedCheckpoint("the tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer needs at least one")

    by_id = {i: tok for tok, i in hf.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise UnsupportedCheckpoint(f"the tokenizer has token id {max(by_id)} but the model only {n_vocab} embedding rows")
    added = hf.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(_TOKEN_CONTROL if added[i].special else _TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_TOKEN_NORMAL)
    return _Vocab(tokens, types, merges, _tokenizer_pre(variant, tj.get("pre_tokenizer")))


def check_supported(spec: ModelSpec) -> None:
    if spec.moe.use_residual:
        # §2.3.6 residual MoE mixes routed and meta outputs with a learned coefficient: no llama.cpp graph for it.
        raise UnsupportedCheckpoint("GGUF export does not support use_residual=True (coefficient-mixed residual MoE); use the torch or ONNX runtimes")


def _write_metadata(w, spec: ModelSpec, vocab: _Vocab, tokenizer, dtype: str) -> None:
    gguf = require_gguf()
    t, moe = spec.text, spec.moe
    arch = ARCH[spec.variant]
    key = lambda k: k.format(arch=arch)  # noqa: E731
    LLM, Attn, Rope = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope

    w.add_name(f"Med-MoE {spec.variant.value}")
    w.add_file_type(FILE_TYPE[dtype])
    w.add_uint32(key(LLM.CONTEXT_LENGTH), t.max_position_embeddings)
    w.add_uint32(key(LLM.EMBEDDING_LENGTH), t.hidden_size)
    w.add_uint32(key(LLM.BLOCK_COUNT), t.num_layers)
    w.add_uint32(key(LLM.FEED_FORWARD_LENGTH), t.intermediate_size)
    w.add_uint32(key(Attn.HEAD_COUNT), t.num_heads)
    w.add_uint32(key(Attn.HEAD_COUNT_KV), t.num_kv_heads)
    w.add_float32(key(Attn.LAYERNORM_EPS), t.norm_eps)
    # §1.3 partial rotary: Phi rotates 32 of 80 head dims, StableLM 16 of 64 (NEOX pairs i, i+rot/2).
    w.add_uint32(key(Rope.DIMENSION_COUNT), t.rotary_dim)
    w.add_float32(key(Rope.FREQ_BASE), t.rope_theta)

    # §2.1 / §2.3: E experts, top-k on the MoE layers and 0 (dense FFN) elsewhere.
    moe_layers = set(moe.layers)
    w.add_uint32(key(LLM.EXPERT_COUNT), moe.num_experts)
    w.add_key_value(
        key(LLM.EXPERT_USED_COUNT),
        [moe.top_k if i in moe_layers else 0 for i in range(t.num_layers)],
        gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.UINT32,
    )
    w.add_uint32(key(LLM.EXPERT_FEED_FORWARD_LENGTH), t.intermediate_size)  # experts are FFN copies (§2.5)
    w.add_uint32(key(LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH), t.intermediate_size)  # and so is the meta expert
    w.add_uint32(key(LLM.EXPERT_SHARED_COUNT), 1)
    w.add_uint32(key(LLM.EXPERT_GATING_FUNC), _GATING_SOFTMAX)  # softmax over all E experts (§2.3.2)
    # §2.3.3: top-1 weights the expert by its raw probability p[e1] (no renormalisation). Top-2 is
    # renormalised over the pair (§2.3.4); we pick the plain second argmax, as the reference model does.
    w.add_bool(key(LLM.EXPERT_WEIGHTS_NORM), moe.top_k == 2)

    hf = tokenizer.hf
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    bos = hf.bos_token_id if hf.bos_token_id is not None else tokenizer.eos_id
    w.add_bos_token_id(int(bos))
    w.add_eos_token_id(int(tokenizer.eos_id))
    w.add_pad_token_id(int(tokenizer.pad_id))
    if hf.unk_token_id is not None:
        w.add_unk_token_id(int(hf.unk_token_id))
    # Neither Med-MoE tokenizer adds BOS/EOS to prompts (§5.3).
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def export_load_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype to load the checkpoint in: its own when every tensor is bf16 (or fp16), else fp32.

    Loading a bf16 release in bf16 is exact (each tensor is widened to fp32 only when written)
    and halves the memory an export needs (Phi: 12 GB instead of 24 GB).
    """
    # safetensors spells dtypes "BF16"/"F16", pickled checkpoints "bfloat16"/"float16"
    names = {"BF16": "bf16", "BFLOAT16": "bf16", "F16": "f16", "FLOAT16": "f16"}
    stored = {names.get(i.dtype.upper(), i.dtype) for i in checkpoint_infos(resolve_model_dir(model_dir))}
    if stored == {"bf16"}:
        return torch.bfloat16
    if stored == {"f16"}:
        return torch.float16
    return torch.float32


def write_text_gguf(model_dir: str | Path, out_path: str | Path, *, dtype: str = "f32") -> None:
    """Write the Med-MoE language model of a checkpoint as a llama.cpp GGUF file.

    Args:
        model_dir: checkpoint directory, hub id or "demo" (anything `medmoe_edge.checkpoint.load_model` takes).
        out_path: the .gguf file to write (replaced atomically).
        dtype: "f32" (exact; for parity checks) or "f16" (matrices F16; router, norms and biases F32).
    Raises:
        InputError: unknown dtype.
        UnsupportedCheckpoint: a model llama.cpp's medmoe archs cannot express (use_residual, non-BPE tokenizer).
        RuntimeUnavailable: gguf is not installed.
        CheckpointError: the checkpoint cannot be loaded.
    """
    if dtype not in DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    require_gguf()  # before minutes of loading
    write_loaded_text_gguf(load_model(model_dir, dtype=export_load_dtype(model_dir), device="cpu"), out_path, dtype=dtype)


def write_loaded_text_gguf(
    loaded: LoadedModel,
    out_path: str | Path,
    *,
    dtype: str = "f32",
    matrix_dtype: Callable[[TableTensor], str] | None = None,
    codes: Callable[[TableTensor], PlannedTensor | None] | None = None,
) -> None:
    """`write_text_gguf` for a model already loaded (any dtype; each tensor is widened to fp32 when written).

    Args:
        matrix_dtype: "f32" or "f16" per weight matrix (a precision plan); default: `dtype` for all.
        codes: the already-quantized codes of a matrix (a quantization plan's), None for the rest.
    """
    if dtype not in DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    spec = loaded.spec
    check_supported(spec)
    model = loaded.model
    vocab = _vocab(loaded.tokenizer.hf, spec.variant, model.n_vocab)
    text, _mmproj = table_tensors(released_state_dict(model), spec)
    tensors = plan_table(text, matrix_dtype or (lambda t: dtype), codes)
    write_gguf(out_path, ARCH[spec.variant], lambda w: _write_metadata(w, spec, vocab, loaded.tokenizer, dtype), tensors)
