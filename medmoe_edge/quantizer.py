"""The one quantizer core: a weight matrix → integer codes and block scales, computed once.

Every emitter (ONNX DequantizeLinear, GGUF, TensorRT Q/DQ, the PyTorch fake-quant oracle) copies
the `QTensor` this module produces; nothing is quantized twice (quantization-study §0.1).

Layout of a `QTensor` for a weight W [N, K] (out, in), as `nn.Linear` stores it:

    codes  [N, K]      uint8, each in 0 .. 2**bits - 1
    scales [N, K/bs]   fp32 values that are exactly representable in fp16 (so a format that
                       stores fp16 scales copies them losslessly)
    zeros  [N, K/bs]   uint8 zero points; symmetric tensors have zeros == 2**(bits-1) everywhere
    W_hat = (codes - zeros) * scales          (per block of `bs` consecutive input columns)

Blocks run along the input dimension K, so one block of one output row is one contiguous run of
a row of W (what ONNX's blocked DequantizeLinear on Wᵀ with axis 0, MatMulNBits and ggml's
row-major blocks all expect).

Methods (`QuantMethod`):

* RTN: round to nearest per block (asymmetric min/max or symmetric absmax).
* IMATRIX_RTN: RTN with a per-block clip search that minimises the importance-weighted squared
  error Σ_j imp_j (w_j - ŵ_j)², imp = diag(H)/n from the calibration tokens (llama.cpp's method).
* GPTQ: Frantar et al. 2022, column by column with the inverse-Hessian update, H = Σ x xᵀ over
  *this matrix's own* calibration tokens (for a routed expert, the tokens its router sends it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError
from .quant_plan import QuantMethod

DEFAULT_BLOCK = 32
GPTQ_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's default)
GPTQ_COLUMN_BLOCK = 128  # lazy-batch width of the GPTQ update
CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(16))  # range shrink factors tried by the clip search


@dataclass(frozen=True)
class QuantizerConfig:
    """How one matrix is quantized.

    Attributes:
        bits: code width (2..8).
        block: input columns per scale.
        method: RTN, IMATRIX_RTN or GPTQ.
        symmetric: zero point fixed at 2**(bits-1) (TensorRT takes symmetric codes only).
    """

    bits: int
    block: int = DEFAULT_BLOCK
    method: QuantMethod = QuantMethod.RTN
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise InputError(f"{self.bits}-bit codes are not supported: use 2 to 8 bits")
        if self.method not in (QuantMethod.RTN, QuantMethod.IMATRIX_RTN, QuantMethod.GPTQ):
            raise InputError(f"the quantizer core implements rtn, imatrix-rtn and gptq, not {self.method.value!r}")


@dataclass(frozen=True)
class QTensor:
    """Codes and block scales of one weight matrix (see the module docstring for the layout)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    block: int
    symmetric: bool
    method: QuantMethod

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self) -> torch.Tensor:
        """W_hat [N, K] in fp32: (codes - zeros) * scales, block by block."""
        n, k = self.codes.shape
        q = self.codes.to(torch.float32).view(n, k // self.block, self.block)
        z = self.zeros.to(torch.float32).unsqueeze(-1)
        return ((q - z) * self.scales.unsqueeze(-1)).reshape(n, k)

    def signed_codes(self) -> torch.Tensor:
        """Codes minus the fixed zero point of a symmetric tensor, int8 in -2**(bits-1) .. 2**(bits-1)-1."""
        if not self.symmetric:
            raise InputError("signed codes exist only for symmetric tensors: quantize with symmetric=True")
        return (self.codes.to(torch.int16) - (1 << (self.bits - 1))).to(torch.int8)


@dataclass(frozen=True)
class DeltaQTensor(QTensor):
    """Codes of a matrix's difference from another stored matrix, `base_key`'s (a routed expert's
    input projection as the delta from its meta expert's, `calibration.delta`).

    The codes, scales and zero points are those of D = W - base (what a format stores, in D's
    own blocks); `dequantize` is the matrix the model computes with, base + D_hat (the PyTorch
    oracle); `base` is base_key's weight as the bundle stores it (its dequantized codes).
    """

    base: torch.Tensor = field(default_factory=lambda: torch.zeros(0), repr=False)
    base_key: str = ""

    def delta(self) -> QTensor:
        """The codes of D alone, as a plain `QTensor`."""
        return QTensor(self.codes, self.scales, self.zeros, self.bits, self.block, self.symmetric, self.method)

    def dequantize(self) -> torch.Tensor:
        return self.base.to(torch.float32) + super().dequantize()


def _fp16_exact(x: torch.Tensor) -> torch.Tensor:
    """Round scales to fp16-representable values (kept in fp32), never to zero."""
    tiny = torch.finfo(torch.float16).tiny
    return x.clamp_min(tiny).to(torch.float16).to(torch.float32)


def _block_params(w: torch.Tensor, bits: int, symmetric: bool, shrink: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of `w` [..., bs] (one block per row)."""
    qmax = (1 << bits) - 1
    if symmetric:
        amax = w.abs().amax(-1) * shrink
        half = 1 << (bits - 1)
        # codes -half .. half-1 around the zero point: the positive end has half-1 steps
        scale = _fp16_exact(amax / max(half - 1, 1))
        return scale, torch.full_like(scale, float(half))
    lo = (w.amin(-1) * shrink).clamp(max=0.0)  # the range holds 0 so that exact zeros stay exact
    hi = (w.amax(-1) * shrink).clamp(min=0.0)
    scale = _fp16_exact((hi - lo) / qmax)
    zero = (-lo / scale).round().clamp(0, qmax)
    return scale, zero


def _encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return (w / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, (1 << bits) - 1)


def _check_shape(weight: torch.Tensor, block: int) -> None:
    if weight.dim() != 2:
        raise InputError(f"only 2-D weight matrices are quantized, got shape {tuple(weight.shape)}")
    if weight.shape[1] % block:
        raise InputError(f"a row of {weight.shape[1]} weights does not split into blocks of {block}: use a block size that divides it")


def rtn(weight: torch.Tensor, cfg: QuantizerConfig, importance: torch.Tensor | None = None) -> QTensor:
    """Round to nearest, per block; with `importance` [K] (IMATRIX_RTN) each block's range is
    shrunk by the factor of `CLIP_GRID` that minimises the importance-weighted squared error."""
    _check_shape(weight, cfg.block)
    n, k = weight.shape
    w = weight.detach().to(torch.float32).reshape(n, k // cfg.block, cfg.block)
    if importance is None or cfg.method is QuantMethod.RTN:
        scale, zero = _block_params(w, cfg.bits, cfg.symmetric)
    else:
        imp = importance.to(torch.float32).reshape(1, k // cfg.block, cfg.block)
        best_err = torch.full(w.shape[:2], float("inf"))
        scale = zero = None
        for f in CLIP_GRID:
            s, z = _block_params(w, cfg.bits, cfg.symmetric, f)
            q = _encode(w, s, z, cfg.bits)
            err = (imp * (w - (q - z.unsqueeze(-1)) * s.unsqueeze(-1)) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = s if scale is None else torch.where(better, s, scale)
            zero = z if zero is None else torch.where(better, z, zero)
        assert scale is not None and zero is not None
    codes = _encode(w, scale, zero, cfg.bits).reshape(n, k)
    return QTensor(codes.to(torch.uint8), scale, zero.to(torch.uint8), cfg.bits, cfg.block, cfg.symmetric, cfg.method)


def gptq_factor(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damping)⁻¹ that GPTQ's error feedback uses, fp32 [K, K].

    Factored in float64 (a 5632-wide down projection's H is ill-conditioned in fp32), stored in
    fp32 for the updates. Columns that never saw input (diag H = 0) get a unit diagonal. A matrix
    that is not positive definite even after damping gets the identity: no error feedback (RTN).
    """
    k = hessian.shape[0]
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += torch.eye(k, dtype=h.dtype) * (GPTQ_DAMP * torch.diag(h).mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    except RuntimeError:
        return torch.eye(k)


class GptqFactors:
    """`gptq_factor` of the last few Hessians asked for, by identity: a plan quantizes one matrix
    at several widths, and matrices that read the same input share one Hessian tensor (q/k/v,
    gate/up), so each factorisation, O(K³) in float64, is done once instead of once per call."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, hessian: torch.Tensor) -> torch.Tensor:
        for h, f in self._entries:
            if h is hessian:
                return f
        f = gptq_factor(hessian)
        self._entries = [(hessian, f), *self._entries[: self.size - 1]]
        return f


def gptq(weight: torch.Tensor, hessian: torch.Tensor, cfg: QuantizerConfig, factors: GptqFactors | None = None) -> QTensor:
    """GPTQ of `weight` [N, K] against `hessian` [K, K] = Σ x xᵀ over the matrix's own inputs.

    A block's scale and zero point are chosen from the *updated* weights when GPTQ reaches the
    block's first column (GPTQ's group-wise variant), so the codes reproduce exactly with
    `QTensor.dequantize`. Columns that never saw input (diag H = 0) are quantized as they are.
    The updates run in fp32 (as the GPTQ reference does); `factors` reuses a factorisation.
    """
    _check_shape(weight, cfg.block)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise InputError(f"the Hessian is {tuple(hessian.shape)} but the matrix has {k} input columns: the statistics are of another model")
    w = weight.detach().to(torch.float32).clone()
    hinv = factors.get(hessian) if factors is not None else gptq_factor(hessian)
    codes = torch.empty(n, k)
    nb = k // cfg.block
    scales, zeros = torch.empty(n, nb), torch.empty(n, nb)
    qmax = (1 << cfg.bits) - 1
    for i1 in range(0, k, GPTQ_COLUMN_BLOCK):
        i2 = min(i1 + GPTQ_COLUMN_BLOCK, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            b = col // cfg.block
            if col % cfg.block == 0:
                # the block's parameters from its current (already updated) weights; only the
                # block's own columns are gathered (the rest of the matrix is not copied)
                rest = max(0, cfg.block - (i2 - i1 - j))
                blk = torch.cat([w1[:, j : j + cfg.block], w[:, i2 : i2 + rest]], 1)
                s, z = _block_params(blk.unsqueeze(1), cfg.bits, cfg.symmetric)
                scales[:, b], zeros[:, b] = s[:, 0], z[:, 0]
            s, z = scales[:, b], zeros[:, b]
            x = w1[:, j]
            q = (x / s + z).round_().clamp_(0, qmax)
            codes[:, col] = q
            e = (x - (q - z) * s) / hinv[col, col]
            w1[:, j:].addr_(e, hinv[col, col:i2], alpha=-1.0)
            err1[:, j] = e
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return QTensor(codes.to(torch.uint8), scales, zeros.to(torch.uint8), cfg.bits, cfg.block, cfg.symmetric, cfg.method)


def quantize(weight: torch.Tensor, cfg: QuantizerConfig, hessian: torch.Tensor | None = None, tokens: int = 0, factors: GptqFactors | None = None) -> QTensor:
    """Quantize one matrix by `cfg.method`; GPTQ and IMATRIX_RTN need the matrix's input Hessian.

    Args:
        hessian: Σ x xᵀ over the matrix's calibration inputs ([K, K]); None: RTN only.
        tokens: how many inputs `hessian` sums (for the imatrix diagonal diag(H)/n).
        factors: GPTQ's factorisations to reuse (`GptqFactors`).
    Raises:
        InputError: a method that needs statistics without them.
    """
    if cfg.method is QuantMethod.RTN:
        return rtn(weight, cfg)
    if hessian is None:
        raise InputError(f"{cfg.method.value} needs calibration statistics of this matrix: run medmoe-edge calibrate, or use --method rtn")
    if cfg.method is QuantMethod.IMATRIX_RTN:
        imp = torch.diag(hessian).to(torch.float32) / max(tokens, 1)
        return rtn(weight, cfg, importance=imp + 1e-12)
    return gptq(weight, hessian, cfg, factors)


def packed_bytes(numel: int, bits: int, block: int, *, scale_bytes: int, zero_point: bool) -> int:
    """Bytes of a blocked integer matrix as a format stores it: packed codes, one scale of
    `scale_bytes` per block, and (asymmetric) one packed `bits`-wide zero point per block."""
    blocks = numel // block
    code_bits = numel * bits + (blocks * bits if zero_point else 0)
    return -(-code_bits // 8) + blocks * scale_bytes


def relative_error(weight: torch.Tensor, q: QTensor, hessian: torch.Tensor | None = None) -> float:
    """‖(W − Ŵ)‖/‖W‖, or with a Hessian the output error sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))."""
    d = weight.to(torch.float64) - q.dequantize().to(torch.float64)
    w = weight.to(torch.float64)
    if hessian is None:
        return float(d.norm() / w.norm().clamp_min(1e-30))
    h = hessian.to(torch.float64)
    return float(((d @ h * d).sum() / (w @ h * w).sum().clamp_min(1e-30)).sqrt())


__all__ = ["DEFAULT_BLOCK", "DeltaQTensor", "GptqFactors", "QTensor", "QuantizerConfig", "gptq", "gptq_factor", "packed_bytes", "quantize", "relative_error", "rtn"]
