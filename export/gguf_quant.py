"""`medmoe-edge quantize --format gguf`: the llama.cpp bundle with each planned matrix stored in the
ggml type the plan chose, its codes copied from the quantizer that measured them.

The plan's codes come from ggml's own `ggml_quantize_chunk` (`medmoe_edge.ggml_codes`), each
expert rounded with the importance vector of the tokens routed to it, so they are written as they
are (gguf-py writes pre-quantized data): nothing is quantized a second time and no
`llama_model_quantize` pass runs. What llama.cpp would have needed for the same result, a
per-expert imatrix slice of each stacked tensor (`size == ne[0]·ne[2]`), is exactly what was used.

GGUF stores a layer's experts as one tensor per projection (`ffn_*_exps`) of one type, so a
plan gives the experts of a layer one type per projection (the allocator's `stacked_experts`
units). Norms, biases and the router stay F32. The projector's codes go into the mmproj file
(mtmd's projector matmuls take any ggml type); the vision tower stays in the mmproj's f32/f16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medmoe_edge.allocation import unit_name
from medmoe_edge.checkpoint import LoadedModel, read_spec
from medmoe_edge.errors import CheckpointError, InputError
from medmoe_edge.exporter import ExportParts, ExportRequest
from medmoe_edge.ggml_codes import GgmlCodes, block_size, ggml_type
from medmoe_edge.tensor_ids import gguf_map, plan_rule, plan_spec, released_state_dict
from medmoe_edge.vocab import Precision, PrecisionKind

from .gguf_export import MMPROJ_FILE, TEXT_FILE, GgufExporter, bundle_parts, read_tensor_types
from .gguf_io import PlannedTensor, TableTensor, require_gguf, table_tensors
from .gguf_mmproj import check_supported as check_tower_supported
from .gguf_mmproj import write_mmproj_gguf
from .gguf_text import check_supported as check_text_supported
from .gguf_text import write_loaded_text_gguf

_FLOAT = {Precision.FP32: "f32", Precision.FP16: "f16"}


def _one(values: set, what: str):
    if len(values) > 1:
        raise InputError(f"the plan gives {what} {', '.join(sorted(v.value for v in values))}: GGUF stores one type per layer and projection for all experts of a layer")
    return values.pop()


class GgufQuantExporter(GgufExporter):
    """The GGUF exporter writing a quantization plan's ggml codes.

    Constructed with the codes of every planned matrix (checkpoint key → `GgmlCodes`) and the
    plan summary kept in the manifest.
    """

    def __init__(self, codes: dict[str, GgmlCodes], summary: dict[str, Any] | None = None) -> None:
        self.codes = dict(codes)
        self.summary = dict(summary or {})

    def _types(self, loaded: LoadedModel, request: ExportRequest) -> tuple[dict[str, Precision], dict[str, Precision]]:
        """(text tensor → its plan precision, mmproj tensor → its precision), every quantized tensor's codes checked.

        A text matrix takes its plan precision (fp32 by the plan's default); an mmproj matrix the
        mmproj's own dtype unless a rule names it (the projector, when the plan quantized it: the
        vision tower is not an allocation unit).

        Raises:
            InputError: experts of one stack with different types, a type GGUF cannot take here,
                or a planned matrix without codes of its type.
        """
        text, mmproj = table_tensors(released_state_dict(loaded.model), loaded.spec)
        mm_default = Precision.parse(request.options["mmproj_dtype"])
        types: dict[str, Precision] = {}
        mm: dict[str, Precision] = {}
        for table, out, of in ((text, types, lambda i: plan_spec(request.plan, i).precision), (mmproj, mm, lambda i: rule.precision if (rule := plan_rule(request.plan, i)) else mm_default)):
            for t in (t for t in table if not t.f32):
                p = _one({of(i) for i in t.ids}, f"the experts of {t.name}")
                if p.kind is PrecisionKind.GGML:
                    missing = [k for k in t.keys if k not in self.codes or self.codes[k].precision is not p]
                    if missing:
                        raise InputError(f"the plan gives {t.name} {p.value} but no {p.value} codes were given for {missing[0]}: quantize it first")
                elif p not in _FLOAT:
                    raise InputError(f"--format gguf plans take ggml types, fp16 and fp32, not {p.value} ({t.name})")
                out[t.name] = p
        return types, mm

    def load(self, model: str | Path, request: ExportRequest) -> LoadedModel:
        if request.options["overrides"]:
            raise InputError("--tensor-type does not apply to a quantization plan: the plan gives every tensor its type")
        return super().load(model, request)

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        check_text_supported(loaded.spec)
        check_tower_supported(loaded)
        self._types(loaded, request)

    def _coded(self, t: TableTensor, p: Precision) -> PlannedTensor:
        """The codes of a planned matrix as gguf-py writes pre-quantized data: uint8, bytes per row."""
        parts = [self.codes[k].data for k in t.keys]  # in expert order for a stack
        data = np.stack(parts) if t.stacked else parts[0]
        return PlannedTensor(t.name, np.dtype(np.uint8), tuple(data.shape), lambda data=data: np.ascontiguousarray(data), ggml_type(p))

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        types, mm = self._types(loaded, request)
        write_loaded_text_gguf(
            loaded,
            out / TEXT_FILE,
            dtype="f32",
            matrix_dtype=lambda t: _FLOAT[types[t.name]],
            codes=lambda t: self._coded(t, types[t.name]) if types[t.name].kind is PrecisionKind.GGML else None,
        )
        write_mmproj_gguf(
            loaded,
            out / MMPROJ_FILE,
            dtype=request.options["mmproj_dtype"],
            matrix_dtype=lambda t: _FLOAT[mm[t.name]],
            codes=lambda t: self._coded(t, mm[t.name]) if mm[t.name].kind is PrecisionKind.GGML else None,
        )
        for file, planned in ((TEXT_FILE, types), (MMPROJ_FILE, mm)):
            stored = {name: Precision.from_ggml(ttype) for name, ttype, *_ in read_tensor_types(out / file)}
            wrong = {n: (p, stored.get(n)) for n, p in planned.items() if stored.get(n) is not p}
            if wrong:
                name, (asked, got) = next(iter(wrong.items()))
                raise CheckpointError(f"{name} was planned as {asked.value} but {file} stores {getattr(got, 'value', got)}: report this as a bug")
        quantized = sum(p.kind is PrecisionKind.GGML for p in (*types.values(), *mm.values()))
        extra = {"mmproj_dtype": request.options["mmproj_dtype"], "quantization": self.summary | {"quantized_tensors": quantized}}
        return bundle_parts(loaded, out, extra)


def read_back(bundle: Path, spec=None) -> dict[str, tuple[Precision, int, int]]:
    """What the written text GGUF stores for every quantized allocation unit, read from the file:
    unit (a TensorId group, or `layers.L.expert.*.PROJ` for a stack) → (ggml type, its block
    size, bytes of the tensor data). The size check compares these bytes with the plan's prediction.

    Raises:
        CheckpointError: a unit whose tensors disagree on type.
    """
    gguf = require_gguf()
    spec = spec if spec is not None else read_spec(bundle)[0]  # a bundle carries its config.json
    found: dict[str, tuple[Precision, int, int]] = {}
    for file in (TEXT_FILE, MMPROJ_FILE):  # the projector's codes are in the mmproj file
        reader = gguf.GGUFReader(str(bundle / file))
        tmap = gguf_map([t.name for t in reader.tensors], spec)
        for t in reader.tensors:
            p = Precision.from_ggml(t.tensor_type.name)
            if p.kind is not PrecisionKind.GGML:
                continue
            ids = tmap.ids(t.name)
            key = unit_name(ids[0], stacked_experts=True)
            if key in found and found[key][0] is not p:
                raise CheckpointError(f"{key} is stored as {found[key][0].value} and as {p.value} in {file}: a unit has one type")
            found[key] = (p, block_size(p), found.get(key, (p, 0, 0))[2] + int(t.n_bytes))
    return found


__all__ = ["GgufQuantExporter", "read_back"]
