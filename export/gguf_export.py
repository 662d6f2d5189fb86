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

A precision plan (`QuantPlan`) with rules is applied per GGUF tensor: in an f32/f16 file the
writer stores each matrix in its group's float type; in a quantized file each rule becomes a
`llama_model_quantize` type override for the tensors of the groups it matches. GGUF stacks the
experts of a layer into one tensor per projection (`ffn_*_exps`), so a plan must give the
experts of one layer the same precision per projection.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from medmoe_edge.bundle import GraphSpec
from medmoe_edge.checkpoint import LoadedModel, load_model, reload_vision_tower
from medmoe_edge.errors import InputError, RuntimeUnavailable
from medmoe_edge.exporter import ExportOption, ExportParts, Exporter, ExportRequest, stored_groups
from medmoe_edge.llamacpp_lib import BUILD_COMMAND, require_patched_llama_cpp
from medmoe_edge.quant_plan import QuantPlan
from medmoe_edge.tensor_ids import checkpoint_map, gguf_map, plan_rule, plan_spec, released_state_dict
from medmoe_edge.vocab import ArtifactKind, Precision, PrecisionKind

from .gguf_io import TableTensor, require_gguf, table_tensors
from .gguf_mmproj import check_supported as check_tower_supported
from .gguf_mmproj import write_mmproj_gguf
from .gguf_text import check_supported as check_text_supported
from .gguf_text import export_load_dtype, write_loaded_text_gguf

TEXT_FILE, MMPROJ_FILE = "model.gguf", "mmproj.gguf"
EXPERT_LAYOUT = "stacked per layer (ffn_*_exps)"  # ModelFacts.layout["expert_layout"]; docs/GGUF.md has the choice


@dataclass(frozen=True)
class FileType:
    """A `--quant` choice as llama.cpp knows it.

    Attributes:
        ftype: the `llama_ftype` constant in llama_cpp.
        types: the ggml types llama.cpp gives weight matrices in this file type (llama-quant.cpp
            `llama_tensor_get_type`); a matrix stored in another type is a reported fallback.
    """

    ftype: str
    types: tuple[str, ...]


FILE_TYPES: dict[Precision, FileType] = {
    Precision.FP32: FileType("LLAMA_FTYPE_ALL_F32", ("f32",)),
    Precision.FP16: FileType("LLAMA_FTYPE_MOSTLY_F16", ("f16",)),
    Precision.Q8_0: FileType("LLAMA_FTYPE_MOSTLY_Q8_0", ("q8_0",)),
    Precision.Q6_K: FileType("LLAMA_FTYPE_MOSTLY_Q6_K", ("q6_k",)),
    Precision.Q5_K_M: FileType("LLAMA_FTYPE_MOSTLY_Q5_K_M", ("q5_k", "q6_k")),
    Precision.Q4_K_M: FileType("LLAMA_FTYPE_MOSTLY_Q4_K_M", ("q4_k", "q6_k", "q5_k")),
    Precision.Q4_0: FileType("LLAMA_FTYPE_MOSTLY_Q4_0", ("q4_0", "q4_1", "q6_k")),
}
_WRITER_DTYPE = {Precision.FP32: "f32", Precision.FP16: "f16"}  # what gguf_io writes itself


def needs_llamacpp(quant: Precision) -> bool:
    """Whether `llama_model_quantize` makes the file (every type but f32 and f16)."""
    return quant not in _WRITER_DTYPE


def quantize(src: Path, dst: Path, quant: Precision, overrides: dict[str, str] | None = None, threads: int = 0) -> None:
    """`llama_model_quantize(src → dst)` with optional per-tensor type overrides (regex → ggml type name).

    Overrides are how per-expert / per-layer precision plans are applied
    (`tt_overrides`, e.g. {"blk\\.2\\.ffn_.*_exps": "q8_0"}).

    Raises:
        RuntimeUnavailable: llama_cpp missing or unpatched.
        InputError: unknown type name in `overrides`.
    """
    lc = require_patched_llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.ftype = getattr(lc, FILE_TYPES[quant].ftype)
    params.nthread = threads
    keep = None
    if overrides:
        arr = (lc.llama_model_tensor_override * (len(overrides) + 1))()
        keep = [p.encode() for p in overrides]  # keep the bytes alive during the call
        types = check_override_types(overrides)
        for i, pattern in enumerate(overrides):
            arr[i].pattern, arr[i].type = keep[i], types[i]
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, type(params.tt_overrides))
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise RuntimeUnavailable(f"llama.cpp could not quantize {src.name} to {quant.value} (return code {rc}); run with a patched build: {BUILD_COMMAND}")


def check_override_types(overrides: dict[str, str]) -> list[int]:
    """The ggml type ids of the override values, in order.

    Raises:
        InputError: a name that is not a ggml weight type.
    """
    gguf = require_gguf()
    ids = []
    for pattern, type_name in overrides.items():
        try:
            ids.append(int(gguf.GGMLQuantizationType[type_name.upper()]))
        except KeyError:
            known = ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32", "I64", "F64"))
            raise InputError(f"tensor type {type_name!r} for {pattern!r} is not a ggml type: use one of {known}") from None
    return ids


def parse_tensor_types(value: Any) -> dict[str, str]:
    """`--tensor-type REGEX=TYPE` values (or a {regex: type} dict) → {regex: type}, in the order given
    (llama.cpp takes the first match).

    Raises:
        InputError: not REGEX=TYPE, a bad regular expression, or not a ggml type.
    """
    if isinstance(value, dict):
        items = [(str(p), str(t)) for p, t in value.items()]
    else:
        items = []
        for item in [value] if isinstance(value, str) else list(value):
            pattern, sep, ttype = item.rpartition("=")
            if not sep or not pattern or not ttype:
                raise InputError(f"--tensor-type {item!r} is not REGEX=TYPE (e.g. 'blk\\.0\\.ffn_.*_exps=q8_0')")
            items.append((pattern, ttype))
    out: dict[str, str] = {}
    for pattern, ttype in items:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--tensor-type {pattern}={ttype}: {pattern!r} is not a valid regular expression ({e})") from None
        out[pattern] = ttype.lower()
    check_override_types(out)
    return out


def parse_mmproj_dtype(value: Any) -> str:
    """`--mmproj-dtype`: "f32" or "f16" (fp32/fp16/float32/float16 accepted)."""
    try:
        p = Precision.parse(str(value), allowed=(Precision.FP32, Precision.FP16), option="--mmproj-dtype")
    except InputError:
        raise InputError(f"--mmproj-dtype {value!r} is not f32 or f16") from None
    return _WRITER_DTYPE[p]


def read_tensor_types(path: Path) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """(name, ggml type name, parameters, numpy shape) of every tensor in a GGUF file."""
    gguf = require_gguf()
    r = gguf.GGUFReader(str(path))
    out = []
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out.append((t.name, t.tensor_type.name.lower(), int(t.n_elements), shape))
    return out


def _fallbacks(tensors: list[tuple[str, str, int, tuple[int, ...]]], quant: Precision, overrides: dict[str, str]) -> dict[str, str]:
    """Weight matrices that did not get the type asked for: the override whose pattern matches
    first (as llama.cpp applies them), else one of `quant`'s types. The router and all biases
    (2-D for stacked experts) are F32 on purpose and never counted."""
    if not needs_llamacpp(quant):
        return {}
    patterns = [(re.compile(p), t.lower()) for p, t in overrides.items()]
    out = {}
    for name, ttype, _, shape in tensors:
        if len(shape) < 2 or not name.endswith(".weight") or "ffn_gate_inp" in name:
            continue
        asked = next(((t,) for p, t in patterns if p.search(name)), FILE_TYPES[quant].types)
        if ttype not in asked:
            out[name] = ttype
    return out


def _tensor_type(precision: Precision, name: str, *, writer_only: bool) -> str:
    """The ggml type name of a tensor a plan gives `precision`."""
    if writer_only and precision not in _WRITER_DTYPE:
        raise InputError(
            f"the plan gives {name} {precision.value}, but this file is written without llama.cpp, in f32 or f16: "
            "per-tensor quantized types need a quantized default (e.g. --quant q8_0), as llama.cpp applies type overrides only then"
        )
    if precision.kind is PrecisionKind.FLOAT:
        return {Precision.FP32: "f32", Precision.FP16: "f16", Precision.BF16: "bf16"}[precision]
    if precision.kind is not PrecisionKind.GGML:
        raise InputError(f"the plan gives {name} {precision.value}, which is not a ggml tensor type (file-type mixes such as q4_k_m and ONNX int codes are not)")
    return precision.value


def _plan_precision(plan: QuantPlan, t: TableTensor, *, mmproj_default: Precision | None = None) -> Precision:
    """The one precision `plan` gives every TensorId a GGUF tensor holds.

    Raises:
        InputError: a stacked tensor whose experts the plan gives different precisions.
    """
    specs = {plan_rule(plan, i) for i in t.ids} if mmproj_default is not None else {plan_spec(plan, i) for i in t.ids}
    precisions = {mmproj_default if s is None else s.precision for s in specs}
    if len(precisions) > 1:
        layer = t.ids[0].layer
        raise InputError(
            f"the plan gives the experts of layer {layer} {', '.join(sorted(p.value for p in precisions))} for {t.name}: GGUF stores one type per layer "
            "and projection for all experts of a layer (stacked for mul_mat_id); give them one precision per projection"
        )
    return precisions.pop()


@dataclass(frozen=True)
class _PlanTypes:
    """What a plan asks of the two GGUF files: per-matrix writer dtypes and llama.cpp overrides."""

    text_dtype: dict[str, str]  # text GGUF written directly (f32/f16 file): tensor name → f32|f16
    overrides: dict[str, str]  # quantized text GGUF: exact-name regex → ggml type
    mmproj_dtype: dict[str, str]  # tensor name → f32|f16


def _plan_types(loaded: LoadedModel, request: ExportRequest) -> _PlanTypes:
    """Map the request's plan onto GGUF tensors (nothing for a uniform plan).

    Raises:
        InputError: a precision GGUF cannot give one tensor, or experts of a stack that differ.
    """
    plan, quant = request.plan, request.precision
    if plan.is_uniform:
        return _PlanTypes({}, {}, {})
    text, mmproj = table_tensors(released_state_dict(loaded.model), loaded.spec)
    text_dtype, overrides, mm_dtype = {}, {}, {}
    for t in (t for t in text if not t.f32):
        p = _plan_precision(plan, t)
        if not needs_llamacpp(quant):
            text_dtype[t.name] = _tensor_type(p, t.name, writer_only=True)
        elif p is not quant:
            overrides[f"^{re.escape(t.name)}$"] = _tensor_type(p, t.name, writer_only=False)
    mm_default = Precision.parse(request.options["mmproj_dtype"])
    for t in (t for t in mmproj if not t.f32):
        mm_dtype[t.name] = _tensor_type(_plan_precision(plan, t, mmproj_default=mm_default), t.name, writer_only=True)
    return _PlanTypes(text_dtype, overrides, mm_dtype)


class GgufExporter(Exporter):
    """The llama.cpp bundle: text GGUF (patched archs) + mmproj GGUF, tensor names from `tensor_ids`."""

    name = "gguf"
    artifact_kind = ArtifactKind.GGUF
    description = "llama.cpp: text GGUF (medmoe-phi2 / medmoe-stablelm, patched llama.cpp) + mmproj GGUF for mtmd"
    precisions = tuple(FILE_TYPES)
    default_precision = Precision.FP32
    precision_flag = "--quant"
    options = (
        ExportOption("mmproj_dtype", "--mmproj-dtype", parse_mmproj_dtype, "f32"),
        ExportOption("overrides", "--tensor-type", parse_tensor_types, None),
    )

    @classmethod
    def request(cls, given: dict[str, Any], *, plan: QuantPlan | None = None, vision_tower: Path | None = None) -> ExportRequest:
        """As `Exporter.request`; without `--mmproj-dtype`, a uniformly quantized bundle (q8_0,
        q4_k_m, ...) gets an f16 mmproj: 0.57 GB less to read, hold and convert for the
        ViT-L tower, and a load inside `run`'s bounds (docs/GGUF.md "Load time and memory");
        f32 and f16 bundles keep the f32 mmproj their parity checks are set on."""
        req = super().request(given, plan=plan, vision_tower=vision_tower)
        if "--mmproj-dtype" not in given and plan is None and needs_llamacpp(req.precision):
            req = replace(req, options=req.options | {"mmproj_dtype": "f16"})
        return req

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import gguf
        except ImportError:
            return False, "the gguf package is missing: pip install 'gguf==0.19.0'"
        return True, f"gguf-py {getattr(gguf, '__version__', '?')}"

    def load(self, model: str | Path, request: ExportRequest) -> LoadedModel:
        """One load for both files, in the checkpoint's own dtype when it is all bf16/fp16: exact for the
        language model and half the memory of fp32 (Phi: 12 GB instead of 24 GB). The CLIP tower is
        stored apart from the checkpoint, in full precision, so it is read again in fp32.
        What the request alone decides is checked first (before minutes of loading)."""
        quant, overrides = request.precision, request.options["overrides"]
        if overrides and not needs_llamacpp(quant):
            # llama.cpp applies tensor-type overrides only when the file type is a quantized one
            raise InputError(f"tensor type overrides need a quantized --quant (q8_0, q4_k_m, ...), not {_WRITER_DTYPE[quant]}")
        if needs_llamacpp(quant):
            require_patched_llama_cpp()
        text_dtype = export_load_dtype(model)
        loaded = load_model(model, dtype=text_dtype, vision_tower=request.vision_tower)
        if text_dtype != torch.float32:
            reload_vision_tower(loaded, torch.float32)
        return loaded

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        check_text_supported(loaded.spec)
        check_tower_supported(loaded)
        _plan_types(loaded, request)

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        quant = request.precision
        mmproj_dtype, user_overrides = request.options["mmproj_dtype"], dict(request.options["overrides"] or {})
        plan = _plan_types(loaded, request)
        overrides = user_overrides | {p: t for p, t in plan.overrides.items() if p not in user_overrides}
        if needs_llamacpp(quant):
            f32 = out / ".model-f32.gguf"
            write_loaded_text_gguf(loaded, f32, dtype="f32")
            quantize(f32, out / TEXT_FILE, quant, overrides or None)
            f32.unlink()
        else:
            dtype = _WRITER_DTYPE[quant]
            write_loaded_text_gguf(loaded, out / TEXT_FILE, dtype=dtype, matrix_dtype=lambda t: plan.text_dtype.get(t.name, dtype))
        write_mmproj_gguf(loaded, out / MMPROJ_FILE, dtype=mmproj_dtype, matrix_dtype=lambda t: plan.mmproj_dtype.get(t.name, mmproj_dtype))
        extra: dict[str, Any] = {"fallbacks": _fallbacks(read_tensor_types(out / TEXT_FILE), quant, overrides), "tensor_overrides": user_overrides, "mmproj_dtype": mmproj_dtype}
        if plan.overrides:
            extra["plan_overrides"] = plan.overrides
        return bundle_parts(loaded, out, extra)


def bundle_parts(loaded: LoadedModel, out: Path, extra: dict[str, Any]) -> ExportParts:
    """The parts of a written GGUF bundle, its tensor groups read back from the two files: each
    tensor's TensorIds and the type it was stored as. A stacked tensor counts for each expert of
    its layer with its one type: in GGUF types are per layer x projection."""
    written = read_tensor_types(out / TEXT_FILE) + read_tensor_types(out / MMPROJ_FILE)
    tmap = gguf_map([name for name, *_ in written], loaded.spec)
    state = released_state_dict(loaded.model)
    model_sizes = checkpoint_map(state, loaded.spec).group_sizes({k: v.numel() for k, v in state.items()})
    groups = stored_groups("GGUF", ((tmap.ids(name), Precision.from_ggml(ttype), n) for name, ttype, n, _ in written), model_sizes)
    return ExportParts(
        roles={TEXT_FILE: "text-model", MMPROJ_FILE: "mmproj"},
        graphs={"text": GraphSpec(TEXT_FILE, (), ()), "mmproj": GraphSpec(MMPROJ_FILE, (), ())},
        tensor_groups=groups,
        toolchain=_toolchain(),
        layout={"expert_layout": EXPERT_LAYOUT},
        extra=extra,
    )


def _toolchain() -> dict:
    gguf = require_gguf()
    tc: dict = {"gguf": getattr(gguf, "__version__", "0.19.0")}
    try:
        import llama_cpp

        tc["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    return tc


def export_gguf(
    model: str | Path,
    out: Path,
    quant: Precision | str = Precision.FP32,
    *,
    mmproj_dtype: str | None = None,
    vision_tower: Path | None = None,
    overrides: dict[str, str] | None = None,
):
    """Export `model` (checkpoint directory, hub id or "demo") to a llama.cpp bundle at `out`, through `GgufExporter`.

    Args:
        quant: language-model file type (f32 and f16 are spelled fp32/fp16 in the manifest).
        mmproj_dtype: "f32" or "f16" for the vision tower and projector (default: f16 for a
            quantized `quant`, else f32; see `GgufExporter.request`).
        overrides: per-tensor type overrides for `llama_model_quantize` (regex → ggml type).
    Returns:
        The bundle's manifest.
    Raises:
        InputError: `out` not empty, bad option.
        RuntimeUnavailable: gguf missing; llama_cpp missing/unpatched for quantized types.
        CheckpointError / UnsupportedCheckpoint: the checkpoint cannot be exported.
    """
    given: dict[str, Any] = {"--quant": Precision.parse(str(getattr(quant, "value", quant)), option="--quant").value}
    if mmproj_dtype is not None:
        given["--mmproj-dtype"] = mmproj_dtype
    if overrides:
        given["--tensor-type"] = dict(overrides)
    request = GgufExporter.request(given, vision_tower=vision_tower)
    return GgufExporter().export(model, out, request)


__all__ = ["FILE_TYPES", "MMPROJ_FILE", "TEXT_FILE", "GgufExporter", "bundle_parts", "export_gguf", "needs_llamacpp", "parse_tensor_types", "quantize", "read_tensor_types"]
