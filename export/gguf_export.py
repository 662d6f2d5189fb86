"""`medmoe-edge export --format gguf`: a checkpoint → a llama.cpp bundle (text GGUF + mmproj GGUF + manifest).

    model.gguf      the language model (`medmoe-phi2` / `medmoe-stablelm`, see gguf_text.py), in --quant
    mmproj.gguf     CLIP tower + projector for llama.cpp's multimodal library (see gguf_mmproj.py)
    config.json, clip-vision/*.json, tokenizer files, manifest.json   as every bundle (bundle.py)

Quantized types are made by llama.cpp's own `llama_model_quantize` from an F32 file, so they
need the patched llama-cpp-python (the architectures must be known to it). k-quants need
rows (a matrix's input size) divisible by 256; llama.cpp then picks another type for a
tensor that does not fit. Which type every tensor actually got is read back from the
file and reported (per tensor group in the manifest, and as `fallbacks`), never assumed.
The router (`ffn_gate_inp`), norms and biases stay F32 in every file.
"""

from __future__ import annotations

import ctypes
import re
from enum import Enum
from pathlib import Path

import torch

from medmoe_edge import __version__
from medmoe_edge.bundle import GraphSpec, Manifest, TensorGroup, checkpoint_sha256, file_entries, write_manifest
from medmoe_edge.checkpoint import load_model, reload_vision_tower
from medmoe_edge.ckpt_writer import atomic_dir
from medmoe_edge.errors import InputError, RuntimeUnavailable
from medmoe_edge.imaging import PreprocessMode
from medmoe_edge.prompt import SYSTEM, build_prompt
from medmoe_edge.runtimes.base import ArtifactKind

from .gguf_io import DTYPES
from .gguf_mmproj import write_mmproj_gguf
from .gguf_mmproj import check_supported as check_tower_supported
from .gguf_text import check_supported as check_text_supported
from .gguf_text import export_load_dtype, write_loaded_text_gguf
from medmoe_edge.support_files import copy_support_files, source_files

TEXT_FILE, MMPROJ_FILE = "model.gguf", "mmproj.gguf"


class GgufQuant(str, Enum):
    """`--quant` choices: the llama.cpp file type of the language model."""

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q4_K_M = "q4_k_m"
    Q4_0 = "q4_0"

    @property
    def ftype_name(self) -> str:
        """The `llama_ftype` constant in llama_cpp."""
        return {"f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16"}.get(self.value, f"LLAMA_FTYPE_MOSTLY_{self.value.upper()}")

    @property
    def needs_llamacpp(self) -> bool:
        return self not in (GgufQuant.F32, GgufQuant.F16)


def quantize(src: Path, dst: Path, quant: GgufQuant, overrides: dict[str, str] | None = None, threads: int = 0) -> None:
    """`llama_model_quantize(src → dst)` with optional per-tensor type overrides (regex → ggml type name).

    Overrides are how per-expert / per-layer precision plans are applied later
    (`tt_overrides`, e.g. {"blk\\.2\\.ffn_.*_exps": "q8_0"}).

    Raises:
        RuntimeUnavailable: llama_cpp missing or unpatched.
        InputError: unknown type name in `overrides`.
    """
    from medmoe_edge.runtimes.llamacpp_runtime import require_patched_llama_cpp

    lc = require_patched_llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, quant.ftype_name)
    params.nthread = threads
    keep = None
    if overrides:
        arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
        keep = [p.encode() for p in overrides]  # keep the bytes alive during the call
        types = _check_override_types(overrides)
        for i, pattern in enumerate(overrides):
            arr[i].pattern, arr[i].type = keep[i], types[i]
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, type(params.tt_overrides))
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise RuntimeUnavailable(f"llama.cpp could not quantize {src.name} to {quant.value} (return code {rc}); run with a patched build: bash scripts/build_llamacpp.sh")


def _check_override_types(overrides: dict[str, str]) -> list[int]:
    """The ggml type ids of the override values, in order.

    Raises:
        InputError: a name that is not a ggml weight type.
    """
    import gguf

    ids = []
    for pattern, type_name in overrides.items():
        try:
            ids.append(int(gguf.GGMLQuantizationType[type_name.upper()]))
        except KeyError:
            known = ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64", "F64"))
            raise InputError(f"tensor type {type_name!r} for {pattern!r} is not a ggml type: use one of {known}") from None
    return ids


_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_tensor_group(name: str) -> str:
    """The manifest tensor group of a text-GGUF tensor (same names as the ONNX export's groups)."""
    if name.startswith("token_embd."):
        return "embed"
    if name.startswith("output_norm."):
        return "final_norm"
    if name.startswith("output."):
        return "lm_head"
    m = _BLK.match(name)
    if not m:
        return "other"
    i, rest = m.group(1), m.group(2)
    if rest.startswith(("attn_", "ffn_norm")):
        return f"layers.{i}.attn"  # attention and the layer norms, as in the ONNX groups
    if rest.startswith("ffn_gate_inp"):
        return f"layers.{i}.router"
    if "_exps" in rest:
        return f"layers.{i}.experts"  # stacked: one type for all experts of a layer (see docs/GGUF.md)
    if "_shexp" in rest:
        return f"layers.{i}.meta"
    return f"layers.{i}.ffn"


def read_tensor_types(path: Path) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(name, ggml type name, parameters, numpy shape) of every tensor in a GGUF file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out.append((t.name, t.tensor_type.name.lower(), int(t.n_elements), shape))
    return out


def mmproj_tensor_group(name: str) -> str:
    """The manifest tensor group of an mmproj tensor: the projector (`mm.*`) or the vision tower."""
    return "projector" if name.startswith("mm.") else "vision"


def _groups(tensors: list[tuple[str, str, int, tuple[int, ...]]], group_of) -> tuple[TensorGroup, ...]:
    """One TensorGroup per (group, type): a group holding several types (F32 biases next to
    quantized matrices) is listed once per type."""
    acc: dict[tuple[str, str], int] = {}
    for name, ttype, n, _ in tensors:
        key = (group_of(name), ttype)
        acc[key] = acc.get(key, 0) + n
    return tuple(TensorGroup(g, t, n) for (g, t), n in acc.items())


def _fallbacks(tensors: list[tuple[str, str, int, tuple[int, ...]]], quant: GgufQuant, overrides: dict[str, str] | None) -> dict[str, str]:
    """Weight matrices that did not get the type asked for: the override whose pattern matches
    first (as llama.cpp applies them), else one of `quant`'s types. The router and all biases
    (2-D for stacked experts) are F32 on purpose and never counted."""
    if not quant.needs_llamacpp:
        return {}
    wanted = {"q4_k_m": ("q4_k", "q6_k", "q5_k"), "q5_k_m": ("q5_k", "q6_k"), "q6_k": ("q6_k",), "q8_0": ("q8_0",), "q4_0": ("q4_0", "q4_1", "q6_k")}[quant.value]
    patterns = [(re.compile(p), t.lower()) for p, t in (overrides or {}).items()]
    out = {}
    for name, ttype, _, shape in tensors:
        if len(shape) < 2 or not name.endswith(".weight") or "ffn_gate_inp" in name:
            continue
        asked = next(((t,) for p, t in patterns if p.search(name)), wanted)
        if ttype not in asked:
            out[name] = ttype
    return out


def export_gguf(model: str | Path, out: Path, quant: GgufQuant = GgufQuant.F32, *, mmproj_dtype: str = "f32", vision_tower: Path | None = None, overrides: dict[str, str] | None = None) -> Manifest:
    """Export `model` to a llama.cpp bundle at `out`.

    Args:
        model: checkpoint directory, hub id or "demo".
        out: bundle directory to create (must not exist or be empty).
        quant: language-model file type.
        mmproj_dtype: "f32" or "f16" for the vision tower and projector.
        overrides: per-tensor type overrides for `llama_model_quantize` (regex → ggml type).
    Raises:
        InputError: `out` not empty, bad option.
        RuntimeUnavailable: gguf missing; llama_cpp missing/unpatched for quantized types.
        CheckpointError / UnsupportedCheckpoint: the checkpoint cannot be exported.
    """
    if mmproj_dtype not in DTYPES:
        raise InputError(f"--mmproj-dtype {mmproj_dtype!r} is not f32 or f16")
    if overrides:
        if not quant.needs_llamacpp:
            # llama.cpp applies tensor-type overrides only when the file type is a quantized one
            raise InputError(f"tensor type overrides need a quantized --quant (q8_0, q4_k_m, ...), not {quant.value}")
        _check_override_types(overrides)
    if quant.needs_llamacpp:
        from medmoe_edge.runtimes.llamacpp_runtime import require_patched_llama_cpp

        require_patched_llama_cpp()  # fail before spending minutes on the export
    # One load for both files, in the checkpoint's own dtype when it is all bf16/fp16: exact for the
    # language model and half the memory of fp32 (Phi: 12 GB instead of 24 GB). The CLIP tower is
    # stored apart from the checkpoint, in full precision, so it is read again in fp32.
    text_dtype = export_load_dtype(model)
    loaded = load_model(model, dtype=text_dtype, vision_tower=vision_tower)
    if text_dtype != torch.float32:
        reload_vision_tower(loaded, torch.float32)
    check_text_supported(loaded.spec)  # before writing anything
    check_tower_supported(loaded)
    with atomic_dir(out) as tmp:
        if quant.needs_llamacpp:
            f32 = tmp / ".model-f32.gguf"
            write_loaded_text_gguf(loaded, f32, dtype="f32")
            quantize(f32, tmp / TEXT_FILE, quant, overrides)
            f32.unlink()
        else:
            write_loaded_text_gguf(loaded, tmp / TEXT_FILE, dtype=quant.value)
        write_mmproj_gguf(loaded, tmp / MMPROJ_FILE, dtype=mmproj_dtype)
        roles = {TEXT_FILE: "text-model", MMPROJ_FILE: "mmproj"} | copy_support_files(loaded, tmp)
        text_tensors = read_tensor_types(tmp / TEXT_FILE)
        mm_tensors = read_tensor_types(tmp / MMPROJ_FILE)
        t, spec = loaded.spec.text, loaded.spec
        manifest = Manifest(
            format=ArtifactKind.GGUF,
            precision=quant.value,
            files=file_entries(tmp, roles),
            tensor_groups=_groups(text_tensors, gguf_tensor_group) + _groups(mm_tensors, mmproj_tensor_group),
            source={"path": str(loaded.checkpoint_dir.resolve()), "sha256": checkpoint_sha256(source_files(loaded)), "label": loaded.checkpoint_dir.name},
            toolchain=_toolchain(),
            graphs={"text": GraphSpec(TEXT_FILE, (), ()), "mmproj": GraphSpec(MMPROJ_FILE, (), ())},
            model={
                "variant": t.variant.value,
                "num_layers": t.num_layers,
                "hidden_size": t.hidden_size,
                "moe_layers": list(spec.moe.layers),
                "num_experts": spec.moe.num_experts,
                "top_k": spec.moe.top_k,
                "vocab_rows": loaded.model.n_vocab,
                "image_tokens": spec.image_tokens,
                "context_length": t.max_position_embeddings,
                "expert_layout": "stacked per layer (ffn_*_exps)",
            },
            preprocessing={"default_mode": PreprocessMode.PAD.value},
            prompt={"system": SYSTEM, "template": build_prompt("{question}"), "image_placeholder_id": -200},
            extra={"fallbacks": _fallbacks(text_tensors, quant, overrides), "tensor_overrides": overrides or {}, "mmproj_dtype": mmproj_dtype},
        )
        write_manifest(tmp, manifest)
    return manifest


def _toolchain() -> dict:
    import gguf

    tc: dict = {"medmoe_edge": __version__, "gguf": getattr(gguf, "__version__", "0.19.0")}
    try:
        import llama_cpp

        tc["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return tc


__all__ = ["GgufQuant", "MMPROJ_FILE", "TEXT_FILE", "export_gguf", "gguf_tensor_group", "quantize", "read_tensor_types"]
