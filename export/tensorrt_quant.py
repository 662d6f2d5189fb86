"""`medmoe-edge quantize --format tensorrt`: TensorRT engines whose planned weights are int4.

The graphs are `onnx_quant`'s rewrite of the `if`-dispatch graphs (each expert its own MatMul
inside its branch, fed by a `DequantizeLinear` of its own codes), in the bundle's fp16 with fp16
scales, and the engines are built from them as `tensorrt_export` builds any bundle.

What TensorRT-RTX 1.7.1 keeps packed decides the codes (measured on the demo's decoder by engine
bytes, docs/TENSORRT.md): blocked symmetric int4 (block 32..128) stays int4, weight-only, and
shrinks the engine by about the bytes the plan saves; int4 with one scale per channel, and
weight-only int8 in any layout, are folded into fp16 weights at build time (the engine does not
shrink, or grows), and int8 q/k/v projections make its builder fail. So the `tensorrt`
allocation backend offers blocked int4 and fp16, and this exporter refuses codes of any other
layout rather than let the builder silently store floats. The engines need a GPU to run; without
one the bundle's check runs the very graphs they were built from with ONNX Runtime on the CPU.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError
from medmoe_edge.exporter import ExportParts, ExportRequest
from medmoe_edge.quantizer import QTensor
from medmoe_edge.vocab import Precision

from .onnx_export import OnnxExporter
from .onnx_quant import OnnxQuantExporter
from .tensorrt_export import TensorRTExporter


def check_codes(codes: dict[str, QTensor]) -> None:
    """Refuse codes TensorRT would not keep packed (see the module docstring).

    Raises:
        InputError: asymmetric codes, a width other than 4, or one block per row.
    """
    for key, q in codes.items():
        rows = q.shape[1]
        if not q.symmetric:
            raise InputError(f"{key}: TensorRT's DequantizeLinear takes symmetric codes only (zero point 0): quantize with the tensorrt backend's codes")
        if q.bits != 4:
            raise InputError(f"{key}: TensorRT keeps blocked int4 weights packed, not {q.bits}-bit codes (weight-only int8 is folded into fp16): plan int4 or fp16")
        if q.block >= rows:
            raise InputError(f"{key}: TensorRT folds int4 weights with one scale per row into fp16; use blocks smaller than the row ({rows}): --block 32, 64 or 128")


class TensorRTQuantExporter(TensorRTExporter):
    """The TensorRT exporter over graphs whose planned weights are DequantizeLinear of given codes.

    Constructed with the codes of every planned weight (checkpoint key → symmetric `QTensor`):
    nothing is quantized here, the codes are copied into the graphs the engines are built from.
    """

    def __init__(self, codes: dict[str, QTensor], summary: dict[str, Any] | None = None) -> None:
        check_codes(codes)
        self.codes = dict(codes)
        self.summary = dict(summary or {})

    def graph_exporter(self) -> OnnxExporter:
        return OnnxQuantExporter(self.codes, self.summary)

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        if request.precision is not Precision.FP16:
            # the allocation counted fp16 floats and fp16 scales; another float type changes every byte
            raise InputError(f"TensorRT quantization plans are built in fp16 (the plan's float groups and scales), not {request.precision.value}")
        super().check(loaded, request)

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        parts = super().write(loaded, out, request)
        engines = {name: (out / file).stat().st_size for name, file in parts.extra["tensorrt"]["engines"].items()}
        return replace(parts, extra=parts.extra | {"tensorrt": parts.extra["tensorrt"] | {"engine_bytes": engines}})


__all__ = ["TensorRTQuantExporter", "check_codes"]
