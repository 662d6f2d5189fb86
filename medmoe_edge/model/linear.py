"""`Linear`: nn.Linear that computes in its input's dtype.

A bf16 or fp16 checkpoint's matrices can stay as stored while the model computes in fp32
(`checkpoint.load_model(keep_stored=True)`): every value of a narrower float widens to fp32
exactly, so each call computes what the fp32 reference computes, bit for bit, while the weights
take half the memory (a full-size Phi-2 Med-MoE: 12 GiB instead of 24). Only the one matrix in
use is widened at a time. Where the weight already has the input's dtype nothing is added, so
traced graphs (ONNX export) and the usual fp32 or bf16 runs are unchanged.

The weight may also be an object that makes the matrix when asked (`dequantize()`): `quantize`
measures a whole plan with each matrix dequantized from its codes only while its layer runs
(`calibration.sensitivity.Deferred`), instead of every planned matrix in fp32 at once.
"""

from __future__ import annotations

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear whose weight and bias are cast to the input's dtype when they differ (and whose
    weight, put in as a deferred one, is made when called)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if isinstance(self.weight, torch.Tensor) else self.weight.dequantize().to(x.device)
        w = w if w.dtype == x.dtype else w.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)


__all__ = ["Linear"]
