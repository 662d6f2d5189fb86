"""A bundle's runtime against the PyTorch fake-quant oracle of the same codes (shared by the quantize tests)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

QUESTIONS = ("what modality is this?", "is there a lesion?")


def assert_equals_oracle(bundle_rt, oracle, tol: float = 1e-4) -> None:
    """Prefill logits, one decode step's logits (within `tol`) and its routing (exactly) equal the
    oracle's on a seeded random image and two questions."""
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    for question in QUESTIONS:
        req, _ = oracle.prepare(image, question)
        got, want = bundle_rt.runtime.prefill([req], 4), oracle.runtime.prefill([req], 4)
        assert float((got.logits - want.logits).abs().max()) <= tol
        tok = want.logits.argmax(-1)
        step_got, step_want = bundle_rt.runtime.decode(tok), oracle.runtime.decode(tok)
        assert float((step_got.logits - step_want.logits).abs().max()) <= tol
        for layer, e in step_want.experts.items():
            assert torch.equal(step_got.experts[layer], e)
