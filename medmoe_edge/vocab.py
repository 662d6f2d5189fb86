"""The one vocabulary of closed choices, shared by the CLI, manifests, tolerances, exporters and runtimes.

Every closed choice is an enum defined here and nowhere else (gguf-py's `constants.py` is the
model): what an artifact is (`ArtifactKind`), how a tensor is stored or computed (`Precision`),
which part of the model a weight belongs to (`Component`) and where a runtime runs (`DeviceKind`,
parsed once into a `Device`). Users' spellings ("float32", "f32", "FP16") are accepted by
`Precision.parse`, which always answers with one canonical member.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch


class ArtifactKind(str, Enum):
    """What a runtime loads and an exporter writes."""

    CHECKPOINT = "checkpoint"  # a released-layout Med-MoE directory
    ONNX = "onnx"
    GGUF = "gguf"
    TENSORRT = "tensorrt"
    PLUGIN = "plugin"  # a format of a third-party exporter; its manifest names the runtime that loads it

    @property
    def runtime(self) -> str:
        """The built-in runtime that loads this kind (for messages; plugins may add others)."""
        return {"checkpoint": "torch", "onnx": "onnxruntime", "gguf": "llamacpp", "tensorrt": "tensorrt"}.get(self.value, "the runtime its manifest names")


class PrecisionKind(str, Enum):
    """How a precision stores numbers."""

    FLOAT = "float"  # IEEE floating point, one value per weight
    INT = "int"  # blocked integer codes with scales (ONNX/TensorRT Q/DQ, MatMulNBits)
    GGML = "ggml"  # one of ggml's block types (one tensor, one type)
    GGML_MIX = "ggml-mix"  # a llama.cpp file type that mixes ggml types per tensor (q4_k_m)


class Precision(str, Enum):
    """A storage / compute type, for a whole bundle or one tensor group.

    Canonical spellings: fp32, fp16, bf16 for floating point; int8/int4/int3/int2 for blocked integer
    weight-only codes; ggml's own type names (q8_0, q4_k, ...) for GGUF tensors; and llama.cpp's
    file-type mixes (q4_k_m, q5_k_m) for a GGUF bundle as a whole.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    INT3 = "int3"  # the quantizer core and the PyTorch oracle only: no format stores 3-bit integer codes
    INT2 = "int2"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q5_K = "q5_k"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q4_K = "q4_k"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q3_K = "q3_k"
    Q2_K = "q2_k"
    Q5_K_M = "q5_k_m"
    Q4_K_M = "q4_k_m"

    @property
    def kind(self) -> PrecisionKind:
        return _KIND[self]

    @property
    def bits(self) -> float:
        """Bits per weight including block scales (llama.cpp's figures for ggml types; int codes
        with one fp16 scale per block of 32 for INT*; file-type mixes are their typical average)."""
        return _BITS[self]

    @property
    def is_float(self) -> bool:
        return self.kind is PrecisionKind.FLOAT

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype of a floating-point precision.

        Raises:
            InputError: a quantized precision has no torch dtype.
        """
        import torch

        table = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
        if self not in table:
            raise InputError(f"{self.value} is a quantized type, not a floating-point dtype: use fp32, fp16 or bf16")
        return table[self]

    @property
    def torch_name(self) -> str:
        """'float32', 'float16', 'bfloat16': the spelling of `--dtype` and of graph I/O element types."""
        return _TORCH_NAMES[self]

    @classmethod
    def parse(cls, text: str, *, allowed: tuple[Precision, ...] | None = None, option: str = "--precision") -> Precision:
        """The precision a user wrote, in any accepted spelling ("float32", "f32", "FP32" → FP32).

        Raises:
            InputError: unknown, or not in `allowed` (the message lists what is).
        """
        key = text.strip().lower()
        p = _ALIASES.get(key) or next((m for m in cls if m.value == key), None)
        choices = allowed if allowed is not None else tuple(cls)
        if p is None or p not in choices:
            raise InputError(f"{option} {text!r} is not supported here: use one of {', '.join(c.value for c in choices)}")
        return p

    @classmethod
    def from_ggml(cls, type_name: str) -> Precision:
        """The precision of a ggml tensor type name as gguf-py reports it ("F32", "Q4_K")."""
        return cls.parse(type_name, option="ggml type")


FLOAT_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)

_KIND = {p: PrecisionKind.FLOAT for p in (Precision.FP32, Precision.FP16, Precision.BF16)}
_KIND |= {p: PrecisionKind.INT for p in (Precision.INT8, Precision.INT4, Precision.INT3, Precision.INT2)}
_KIND |= {p: PrecisionKind.GGML_MIX for p in (Precision.Q5_K_M, Precision.Q4_K_M)}
_KIND |= {p: PrecisionKind.GGML for p in Precision if p not in _KIND}

# ggml figures from ggml/src/ggml-common.h block sizes (e.g. q4_K: 144 bytes per 256 weights = 4.5 bits).
_BITS = {
    Precision.FP32: 32.0,
    Precision.FP16: 16.0,
    Precision.BF16: 16.0,
    Precision.INT8: 8.5,
    Precision.INT4: 4.5,
    Precision.INT3: 3.5,
    Precision.INT2: 2.5,
    Precision.Q8_0: 8.5,
    Precision.Q6_K: 6.5625,
    Precision.Q5_K: 5.5,
    Precision.Q5_0: 5.5,
    Precision.Q5_1: 6.0,
    Precision.Q4_K: 4.5,
    Precision.Q4_0: 4.5,
    Precision.Q4_1: 5.0,
    Precision.Q3_K: 3.4375,
    Precision.Q2_K: 2.625,
    Precision.Q5_K_M: 5.7,
    Precision.Q4_K_M: 4.9,
}

_TORCH_NAMES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}

# Other spellings users and libraries write. One canonical member each.
_ALIASES = {
    "float32": Precision.FP32,
    "f32": Precision.FP32,
    "float": Precision.FP32,
    "float16": Precision.FP16,
    "f16": Precision.FP16,
    "half": Precision.FP16,
    "bfloat16": Precision.BF16,
}


class Component(str, Enum):
    """The part of Med-MoE a weight group belongs to (the `component` of a `TensorId`)."""

    VISION = "vision"  # CLIP tower (spec §2.1)
    PROJECTOR = "projector"  # mlp2x_gelu (§2.2)
    EMBED = "embed"
    ATTN = "attn"  # one layer's attention and its layer norms
    FFN = "ffn"  # one dense (non-MoE) layer's MLP
    ROUTER = "router"  # the MoE gate (§2.3); never quantized
    EXPERT = "expert"  # one routed expert
    META = "meta"  # the always-on meta expert
    COEFFICIENT = "coefficient"  # use_residual mixing layer
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"


class OnnxOps(str, Enum):
    """How an ONNX bundle stores planned weights (`quantize --ops`); `backend` names the allocation
    backend (`allocation.BACKENDS`) whose types it takes."""

    QDQ = "qdq"  # DequantizeLinear → MatMul: standard ONNX; ONNX Runtime fuses it, TensorRT reads it; int4/int8
    MATMULNBITS = "matmulnbits"  # com.microsoft.MatMulNBits: ONNX Runtime only; int2/int4/int8

    @property
    def backend(self) -> str:
        return "onnx" if self is OnnxOps.QDQ else "onnx-matmulnbits"


class KvType(str, Enum):
    """Element type of a runtime's KV cache (`--kv-type`; llama.cpp's `type_k`/`type_v`).

    F32 rounds nothing; F16 halves the cache and rounds each cached key and value to fp16; Q8_0
    stores blocks of 32 int8 codes with one fp16 scale (about a quarter of F32). docs/GGUF.md has
    the measured fidelity and speed of each.
    """

    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"

    @property
    def bytes_per_value(self) -> float:
        """Bytes per cached value, block scales included (Q8_0: 34 bytes per 32 values)."""
        return {KvType.F32: 4.0, KvType.F16: 2.0, KvType.Q8_0: 34 / 32}[self]

    @classmethod
    def parse(cls, text: str) -> KvType:
        """'f32', 'f16' or 'q8_0' (any case; 'fp32'/'fp16' too).

        Raises:
            InputError: anything else, naming the choices.
        """
        key = text.strip().lower()
        key = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16"}.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise InputError(f"--kv-type {text!r} is not a KV cache type: use one of {', '.join(k.value for k in cls)}") from None


class DeviceKind(str, Enum):
    """Where a runtime computes."""

    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class Device:
    """A parsed `--device`: kind and, for CUDA, the device index."""

    kind: DeviceKind
    index: int | None = None

    @classmethod
    def parse(cls, text: str) -> Device:
        """'cpu', 'cuda' or 'cuda:N'.

        Raises:
            InputError: anything else, naming the accepted forms.
        """
        kind, sep, idx = text.strip().lower().partition(":")
        try:
            k = DeviceKind(kind)
        except ValueError:
            raise InputError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N") from None
        if not sep:
            return cls(k)
        if k is DeviceKind.CPU or not idx.isdigit():
            raise InputError(f"--device {text!r} is not a device: use cpu, cuda or cuda:N")
        return cls(k, int(idx))

    def __str__(self) -> str:
        return self.kind.value if self.index is None else f"{self.kind.value}:{self.index}"


__all__ = ["FLOAT_PRECISIONS", "ArtifactKind", "Component", "Device", "DeviceKind", "KvType", "Precision", "PrecisionKind"]
