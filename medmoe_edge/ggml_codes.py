"""ggml's own block quantizers (k-quants, Q8_0), called from Python, for GGUF quantization plans.

The GGUF backend of `medmoe-edge quantize` does not approximate llama.cpp's types with the
integer quantizer core: it calls `ggml_quantize_chunk` in the libggml-base that ships with the
patched llama-cpp-python, the very function `llama_model_quantize` calls per expert, with each
expert's own importance vector (mean x² per input column over the calibration tokens routed to
it, `CalibStats.imatrix`; quantization-study §3b). So the codes whose ΔKL the allocator measures
are byte for byte the codes the emitter writes into the GGUF file: nothing is quantized twice.

GPTQ codes need no ggml quantizer where a ggml type can hold them as they are (`pack`): q4_0 and
q8_0 are blocks of 32 weights with one fp16 scale and symmetric codes (x = d·(q − 8) for q4_0,
x = d·q for q8_0), exactly the quantizer core's symmetric block-32 int4/int8 with fp16-exact
scales, so those bytes are copied, not re-rounded.

Dequantization (for the fake-quant oracle and the sensitivity passes) is gguf-py's numpy
implementation of the same formats, independent of the C code that made the codes.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError, RuntimeUnavailable
from .llamacpp_lib import BUILD_COMMAND, import_llama
from .vocab import Precision

# ggml types whose blocks hold the quantizer core's symmetric block-32 codes as they are (type → code bits)
PACKABLE: dict[Precision, int] = {Precision.Q4_0: 4, Precision.Q8_0: 8}

# ggml types the GGUF allocator may choose, with their code bits (the few-token floor compares these)
CODE_BITS: dict[Precision, int] = {
    Precision.Q2_K: 2,
    Precision.Q3_K: 3,
    Precision.Q4_0: 4,
    Precision.Q4_K: 4,
    Precision.Q5_K: 5,
    Precision.Q6_K: 6,
    Precision.Q8_0: 8,
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise RuntimeUnavailable("GGUF quantization needs the gguf package: pip install 'gguf==0.19.0'") from None
    return gguf


def ggml_type(precision: Precision) -> int:
    """The `ggml_type` id of a ggml precision (gguf-py's GGMLQuantizationType).

    Raises:
        InputError: not a ggml block type this module quantizes.
    """
    if precision not in CODE_BITS:
        raise InputError(f"{precision.value} is not a ggml type GGUF plans choose from: use one of {', '.join(p.value for p in CODE_BITS)}")
    return int(_gguf().GGMLQuantizationType[precision.value.upper()])


def block_size(precision: Precision) -> int:
    """Weights per ggml block (ggml-common.h: QK_K = 256, QK8_0 = 32): a matrix's rows (its input
    size) must be a multiple of it, else llama.cpp falls back to another type."""
    return 32 if precision in PACKABLE else 256


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    """libggml-base of the installed llama-cpp-python, with the signatures used here."""
    llama_cpp, _lib_llama, _mtmd = import_llama()
    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*")) or sorted(Path(llama_cpp.__file__).parent.glob("**/libggml-base.*"))
    if not found:
        raise RuntimeUnavailable(f"llama-cpp-python has no libggml-base library next to it: rebuild it with `{BUILD_COMMAND}`")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


@dataclass(frozen=True)
class GgmlCodes:
    """One weight matrix [N, K] in a ggml block type: N rows of K weights, `data` [N, row bytes].

    Attributes:
        imatrix: whether an importance vector weighted the rounding.
    """

    precision: Precision
    data: np.ndarray
    shape: tuple[int, int]
    imatrix: bool
    gptq: bool = False  # the quantizer core's GPTQ codes, packed (`pack`), not ggml's rounding

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] weights as llama.cpp reads them back (gguf-py's dequantizer)."""
        gguf = _gguf()
        w = gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType(ggml_type(self.precision)))
        return torch.from_numpy(np.ascontiguousarray(w.reshape(self.shape), dtype=np.float32))


def quantize(weight: torch.Tensor, precision: Precision, imatrix: torch.Tensor | None = None) -> GgmlCodes:
    """`weight` [N, K] → ggml codes of `precision`, rounded with `imatrix` [K] as llama.cpp does.

    Raises:
        InputError: K is not a multiple of the type's block (llama.cpp would fall back to another type).
        RuntimeUnavailable: llama-cpp-python (with libggml-base) or gguf-py missing.
    """
    t = ggml_type(precision)
    w = np.ascontiguousarray(weight.detach().to(torch.float32).cpu().numpy())
    n, k = w.shape
    if k % block_size(precision):
        raise InputError(f"a matrix with rows of {k} weights cannot be stored as {precision.value} (blocks of {block_size(precision)})")
    lib = _lib()
    row = int(lib.ggml_row_size(t, k))
    out = np.empty((n, row), dtype=np.uint8)
    imat = None if imatrix is None else np.ascontiguousarray(imatrix.detach().to(torch.float32).cpu().numpy())
    if imat is not None and imat.shape != (k,):
        raise InputError(f"importance vector of {imat.shape} for rows of {k} weights")
    written = lib.ggml_quantize_chunk(t, w.ctypes.data, out.ctypes.data, 0, n, k, None if imat is None else imat.ctypes.data)
    if written != out.nbytes:
        raise RuntimeUnavailable(f"ggml_quantize_chunk wrote {written} bytes for {precision.value} [{n}, {k}], expected {out.nbytes}")
    return GgmlCodes(precision, out, (n, k), imat is not None)


def pack(q, precision: Precision) -> GgmlCodes:
    """The quantizer core's codes `q` (a `quantizer.QTensor`: symmetric, block 32) as ggml blocks of
    `precision` (q4_0 or q8_0), bit for bit: a block is the fp16 scale, then the codes (q4_0: byte j
    holds code j in its low nibble and code j + 16 in its high one; q8_0: signed bytes).

    Raises:
        InputError: a type that cannot hold them, or codes of another width, block or symmetry.
    """
    if precision not in PACKABLE:
        raise InputError(f"{precision.value} blocks cannot hold the quantizer's codes: pack into {' or '.join(p.value for p in PACKABLE)}")
    if not q.symmetric or q.block != 32 or q.bits != PACKABLE[precision]:
        raise InputError(f"{precision.value} holds symmetric {PACKABLE[precision]}-bit codes in blocks of 32, not {q.bits}-bit block {q.block} ({'symmetric' if q.symmetric else 'asymmetric'})")
    n, k = q.shape
    blocks = k // 32
    scale = q.scales.to(torch.float16).numpy().reshape(n, blocks, 1).view(np.uint8)  # [n, blocks, 2]
    if precision is Precision.Q8_0:
        body = q.signed_codes().numpy().reshape(n, blocks, 32).view(np.uint8)
    else:  # q4_0: unsigned nibbles, the zero point 8 fixed (the core's symmetric 4-bit codes are 0..15 around 8)
        c = q.codes.to(torch.uint8).numpy().reshape(n, blocks, 32)
        body = c[..., :16] | (c[..., 16:] << 4)
    data = np.ascontiguousarray(np.concatenate([scale, body], axis=-1).reshape(n, -1))
    return GgmlCodes(precision, data, (n, k), imatrix=False, gptq=True)


def nbytes(params: int, precision: Precision) -> int:
    """Bytes of `params` weights in a ggml block type (exact when rows are whole blocks)."""
    return int(round(params * precision.bits / 8))


__all__ = ["CODE_BITS", "PACKABLE", "GgmlCodes", "block_size", "ggml_type", "nbytes", "pack", "quantize"]
