"""Fidelity of an exported bundle against the PyTorch reference (`medmoe-edge verify`).

For each question both runtimes get the same prepared request (same pixels, same ids):

1. The reference decodes greedily; its logits at every step are kept (prefill, then one
   decode step per generated token, including the step that predicts EOS).
2. The bundle is *teacher-forced* on the reference's tokens, so every step compares
   logits for the same context: divergence at one step cannot cascade into the next.
3. Metrics (named tolerances in `TOLERANCES`, chosen per bundle precision):
   * logits max-abs and minimum cosine similarity over all steps;
   * token agreement: share of steps where the bundle's argmax is the reference's token;
   * routing agreement: share of (position, MoE layer, slot) expert choices that are equal,
     over the real prompt positions and every generated step;
   * answer agreement: share of questions whose greedy answer is identical. When every
     teacher-forced argmax agrees, the bundle's own greedy run provably produces the same
     tokens; otherwise it is run free to get its actual answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .api import Pipeline
from .imaging import PreprocessMode
from .runtimes.base import Runtime


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail bounds of `verify`, per bundle precision."""

    logits_max_abs: float
    logits_cosine_min: float
    token_agreement_min: float
    routing_agreement_min: float
    answer_agreement_min: float


# Keys are "<format>:<precision>" of the bundle's manifest.
# ONNX fp32: the same fp32 math in another order: 1e-4 absolute (the bound).
# ONNX fp16: weights and activations in half precision (router and softmax in fp32): answers may
#   flip where two tokens are nearly tied, so agreement is judged on answers (≥ 98 %).
# GGUF: llama.cpp computes GELU through an fp16 table (also in mtmd's projector), so even F32
#   files differ by ~1e-3 in logits; quantized files are judged on answer agreement, and their
#   logit bounds are sanity limits only. llama.cpp does not report routing.
TOLERANCES: dict[str, Tolerances] = {
    "onnx:fp32": Tolerances(logits_max_abs=1e-4, logits_cosine_min=0.99999, token_agreement_min=1.0, routing_agreement_min=1.0, answer_agreement_min=1.0),
    "onnx:fp16": Tolerances(logits_max_abs=0.5, logits_cosine_min=0.999, token_agreement_min=0.98, routing_agreement_min=0.98, answer_agreement_min=0.98),
    "gguf:f32": Tolerances(logits_max_abs=0.25, logits_cosine_min=0.999, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    "gguf:f16": Tolerances(logits_max_abs=0.5, logits_cosine_min=0.999, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    "gguf:q8_0": Tolerances(logits_max_abs=2.0, logits_cosine_min=0.99, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    "gguf:q6_k": Tolerances(logits_max_abs=3.0, logits_cosine_min=0.98, token_agreement_min=0.90, routing_agreement_min=1.0, answer_agreement_min=0.90),
    "gguf:q5_k_m": Tolerances(logits_max_abs=3.0, logits_cosine_min=0.98, token_agreement_min=0.90, routing_agreement_min=1.0, answer_agreement_min=0.90),
    "gguf:q4_k_m": Tolerances(logits_max_abs=5.0, logits_cosine_min=0.95, token_agreement_min=0.85, routing_agreement_min=1.0, answer_agreement_min=0.85),
    "gguf:q4_0": Tolerances(logits_max_abs=5.0, logits_cosine_min=0.95, token_agreement_min=0.85, routing_agreement_min=1.0, answer_agreement_min=0.85),
}


def tolerances_for(fmt: str, precision: str) -> Tolerances | None:
    """The named tolerances of a bundle's format and precision, or None when none are defined."""
    return TOLERANCES.get(f"{fmt}:{precision}")


@dataclass
class SampleResult:
    id: str
    reference_answer: str
    bundle_answer: str
    logits_max_abs: float
    logits_cosine_min: float
    steps: int
    tokens_agreed: int
    routing_total: int
    routing_agreed: int


@dataclass
class VerifyReport:
    """Aggregated fidelity figures and the verdict."""

    tolerances: Tolerances
    samples: list[SampleResult] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        s = self.samples
        steps = sum(r.steps for r in s)
        routed = sum(r.routing_total for r in s)
        return {
            "logits_max_abs": max((r.logits_max_abs for r in s), default=0.0),
            "logits_cosine_min": min((r.logits_cosine_min for r in s), default=1.0),
            "token_agreement": sum(r.tokens_agreed for r in s) / steps if steps else 1.0,
            # None when the runtime does not report routing (llama.cpp)
            "routing_agreement": sum(r.routing_agreed for r in s) / routed if routed else None,
            "answer_agreement": sum(r.reference_answer == r.bundle_answer for r in s) / len(s) if s else 1.0,
        }

    @property
    def checks(self) -> dict[str, tuple[float | None, str, bool]]:
        """metric → (value, bound as text, passed); a value of None is not measured by this runtime and not judged."""
        m, t = self.metrics, self.tolerances
        if m["routing_agreement"] is None:
            routing = (None, "not reported by this runtime", True)
        else:
            routing = (m["routing_agreement"], f"≥ {t.routing_agreement_min:.0%}", m["routing_agreement"] >= t.routing_agreement_min)
        return {
            "logits_max_abs": (m["logits_max_abs"], f"≤ {t.logits_max_abs:g}", m["logits_max_abs"] <= t.logits_max_abs),
            "logits_cosine_min": (m["logits_cosine_min"], f"≥ {t.logits_cosine_min:g}", m["logits_cosine_min"] >= t.logits_cosine_min),
            "token_agreement": (m["token_agreement"], f"≥ {t.token_agreement_min:.0%}", m["token_agreement"] >= t.token_agreement_min),
            "routing_agreement": routing,
            "answer_agreement": (m["answer_agreement"], f"≥ {t.answer_agreement_min:.0%}", m["answer_agreement"] >= t.answer_agreement_min),
        }

    @property
    def passed(self) -> bool:
        return all(ok for _, _, ok in self.checks.values())

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "n": len(self.samples),
            "metrics": self.metrics,
            "tolerances": asdict(self.tolerances),
            "disagreements": [asdict(r) for r in self.samples if r.reference_answer != r.bundle_answer],
        }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def _greedy_answer(rt: Runtime, req, max_new_tokens: int) -> list[int]:
    """The bundle's own greedy tokens (used only when teacher forcing found a disagreement)."""
    eos = rt.model_info.eos_id
    out = rt.prefill([req], max_new_tokens)
    ids: list[int] = []
    for step in range(max_new_tokens):
        tok = int(out.logits[0].argmax())
        if tok == eos:
            break
        ids.append(tok)
        if step < max_new_tokens - 1:
            out = rt.decode(torch.tensor([tok]))
    return ids


def compare_one(reference: Pipeline, bundle: Pipeline, sample_id: str, image, question: str, *, max_new_tokens: int, preprocess_mode: PreprocessMode) -> SampleResult:
    """Teacher-forced comparison of one question (see the module docstring)."""
    ref, bun = reference.runtime, bundle.runtime
    req, _ = reference.prepare(image, question, preprocess_mode=preprocess_mode)
    L = req.spliced_length(ref.model_info.spec.image_tokens)
    eos = ref.model_info.eos_id
    ro, bo = ref.prefill([req], max_new_tokens), bun.prefill([req], max_new_tokens)
    routing_total = routing_agreed = 0
    for layer, re in (ro.prompt_experts or {}).items():
        be = (bo.prompt_experts or {}).get(layer)
        if be is not None:
            routing_total += re[0, :L].numel()
            routing_agreed += int((re[0, :L] == be[0, :L]).sum())
    max_abs, cos_min, agreed, steps, ids = 0.0, 1.0, 0, 0, []
    for step in range(max_new_tokens):
        max_abs = max(max_abs, float((ro.logits - bo.logits).abs().max()))
        cos_min = min(cos_min, _cosine(ro.logits, bo.logits))
        tok = int(ro.logits[0].argmax())
        agreed += int(int(bo.logits[0].argmax()) == tok)
        steps += 1
        if step:  # experts of the pass that produced this step's logits (the prompt's are counted above)
            for layer, re in ro.experts.items():
                be = bo.experts.get(layer)
                if be is not None:
                    routing_total += re.numel()
                    routing_agreed += int((re == be).sum())
        if tok == eos:
            break
        ids.append(tok)
        if step == max_new_tokens - 1:
            break
        t = torch.tensor([tok])
        ro, bo = ref.decode(t), bun.decode(t)
    tokenizer = ref.model_info.tokenizer
    ref_answer = tokenizer.decode(ids).strip()
    bundle_answer = ref_answer if agreed == steps else tokenizer.decode(_greedy_answer(bun, req, max_new_tokens)).strip()
    return SampleResult(sample_id, ref_answer, bundle_answer, max_abs, cos_min, steps, agreed, routing_total, routing_agreed)


def verify(
    reference: Pipeline,
    bundle: Pipeline,
    samples: Sequence,
    root,
    tolerances: Tolerances,
    *,
    max_new_tokens: int = 32,
    preprocess_mode: PreprocessMode = PreprocessMode.PAD,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Compare `bundle` with `reference` on `samples` (`calibration.synth.Sample`s, images relative to `root`)."""
    report = VerifyReport(tolerances)
    for i, s in enumerate(samples):
        report.samples.append(compare_one(reference, bundle, s.id, root / s.image, s.question, max_new_tokens=max_new_tokens, preprocess_mode=preprocess_mode))
        if progress:
            progress(i + 1, len(samples))
    return report
