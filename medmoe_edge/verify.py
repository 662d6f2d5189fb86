"""Fidelity of a runtime against a recorded reference trace (`medmoe-edge verify`).

`replay` feeds each traced question to the runtime with the trace's own prepared inputs
(the same pixels and ids the reference saw) and compares, step by step:

1. The runtime is *teacher-forced* on the reference's tokens, so every step compares logits
   for the same context: divergence at one step cannot cascade into the next.
2. Metrics (named tolerances in `TOLERANCES`, chosen per artifact kind and precision):
   * logits max-abs and minimum cosine similarity over all steps (over the whole row when the
     trace keeps full logits, else over the reference's top-k entries of each step);
   * token agreement: share of steps where the runtime's argmax is the reference's;
   * routing agreement: share of (position, MoE layer, slot) expert choices that are equal,
     over the real prompt positions and every decode step; not judged for a runtime that
     does not report routing;
   * KL(reference ‖ runtime) of each step's next-token distribution, averaged over all steps
     (over the reference's top-k entries, both renormalised, when the trace keeps only those);
   * answer agreement: share of questions whose greedy answer is identical. When every
     teacher-forced argmax agrees, the runtime's own greedy run provably produces the same
     tokens; otherwise it is run free (`Runtime.generate`) to get its actual answer.

Verifying against the live reference checkpoint is the same code: record a trace with it
first (`medmoe_edge.trace.record`), then replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .quant_plan import QuantPlan
from .runtime_contract import Runtime, greedy_tokens
from .trace import Trace, TraceItem
from .vocab import ArtifactKind, Precision


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail bounds of `verify`, per artifact kind and precision."""

    logits_max_abs: float
    logits_cosine_min: float
    token_agreement_min: float
    routing_agreement_min: float
    answer_agreement_min: float
    kl_mean_max: float | None = None  # checked only when set (quantized bundles)


_K, _P = ArtifactKind, Precision
# ONNX fp32: the same fp32 math in another order: 1e-4 absolute (the bound).
# ONNX fp16: weights and activations in half precision (router and softmax in fp32): answers may
#   flip where two tokens are nearly tied, so agreement is judged on answers (≥ 98 %).
# GGUF: llama.cpp computes GELU through an fp16 table (also in mtmd's projector), so even F32
#   files differ by ~1e-3 in logits; quantized files are judged on answer agreement, and their
#   logit bounds are sanity limits only. llama.cpp does not report routing.
TOLERANCES: dict[tuple[ArtifactKind, Precision], Tolerances] = {
    (_K.ONNX, _P.FP32): Tolerances(logits_max_abs=1e-4, logits_cosine_min=0.99999, token_agreement_min=1.0, routing_agreement_min=1.0, answer_agreement_min=1.0),
    (_K.ONNX, _P.FP16): Tolerances(logits_max_abs=0.5, logits_cosine_min=0.999, token_agreement_min=0.98, routing_agreement_min=0.98, answer_agreement_min=0.98),
    # TensorRT bundles: the same bounds as ONNX (the engines are built from those graphs)
    (_K.TENSORRT, _P.FP32): Tolerances(logits_max_abs=1e-4, logits_cosine_min=0.99999, token_agreement_min=1.0, routing_agreement_min=1.0, answer_agreement_min=1.0),
    (_K.TENSORRT, _P.FP16): Tolerances(logits_max_abs=0.5, logits_cosine_min=0.999, token_agreement_min=0.98, routing_agreement_min=0.98, answer_agreement_min=0.98),
    # bf16 (8 mantissa bits against fp16's 11): judged on answers like fp16; measured on a GPU only
    (_K.TENSORRT, _P.BF16): Tolerances(logits_max_abs=1.0, logits_cosine_min=0.995, token_agreement_min=0.98, routing_agreement_min=0.98, answer_agreement_min=0.98),
    (_K.GGUF, _P.FP32): Tolerances(logits_max_abs=0.25, logits_cosine_min=0.999, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    (_K.GGUF, _P.FP16): Tolerances(logits_max_abs=0.5, logits_cosine_min=0.999, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    (_K.GGUF, _P.Q8_0): Tolerances(logits_max_abs=2.0, logits_cosine_min=0.99, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95),
    (_K.GGUF, _P.Q6_K): Tolerances(logits_max_abs=3.0, logits_cosine_min=0.98, token_agreement_min=0.90, routing_agreement_min=1.0, answer_agreement_min=0.90),
    (_K.GGUF, _P.Q5_K_M): Tolerances(logits_max_abs=3.0, logits_cosine_min=0.98, token_agreement_min=0.90, routing_agreement_min=1.0, answer_agreement_min=0.90),
    (_K.GGUF, _P.Q4_K_M): Tolerances(logits_max_abs=5.0, logits_cosine_min=0.95, token_agreement_min=0.85, routing_agreement_min=1.0, answer_agreement_min=0.85),
    (_K.GGUF, _P.Q4_0): Tolerances(logits_max_abs=5.0, logits_cosine_min=0.95, token_agreement_min=0.85, routing_agreement_min=1.0, answer_agreement_min=0.85),
}


# Bundles written by `medmoe-edge quantize` (a plan with integer or ggml rules per TensorId group):
# the fp32/fp16 bounds above do not apply, weight quantization moves logits by design. They are
# judged by the distribution and the decisions instead, at the figures for plans at
# <= 3.5 bits per weight: router agreement >= 97.5 %, answers >= 95 % (GGUF), tokens and KL of
# the next-token distribution. Logit bounds are sanity limits only. ONNX Runtime's MatMulNBits
# at accuracy level 4 (int8 activations, the default) adds ~2e-2 per output on top of the codes
# (quantization-study §3a), hence the KL margin over the fake-quant plan's 1e-3.
QUANTIZED_TOLERANCES: dict[ArtifactKind, Tolerances] = {
    _K.ONNX: Tolerances(logits_max_abs=5.0, logits_cosine_min=0.98, token_agreement_min=0.98, routing_agreement_min=0.975, answer_agreement_min=0.95, kl_mean_max=5e-3),
    _K.TENSORRT: Tolerances(logits_max_abs=5.0, logits_cosine_min=0.98, token_agreement_min=0.98, routing_agreement_min=0.975, answer_agreement_min=0.95, kl_mean_max=5e-3),
    # llama.cpp's own tables (fp16 GELU) on top of the k-quants; no routing reported
    _K.GGUF: Tolerances(logits_max_abs=5.0, logits_cosine_min=0.95, token_agreement_min=0.95, routing_agreement_min=1.0, answer_agreement_min=0.95, kl_mean_max=1e-2),
}


def tolerances_for(kind: ArtifactKind, precision: Precision, plan: QuantPlan | None = None) -> Tolerances | None:
    """The named tolerances of an artifact kind and precision, or None when none are defined.

    Args:
        plan: the bundle's plan; one with integer or ggml rules (a `quantize` bundle) is judged by
            `QUANTIZED_TOLERANCES` of its kind.
    """
    if plan is not None and plan.quantizes_groups and kind in QUANTIZED_TOLERANCES:
        return QUANTIZED_TOLERANCES[kind]
    return TOLERANCES.get((kind, precision))


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
    kl_sum: float = 0.0  # KL(reference ‖ runtime) summed over the steps
    kl_max: float = 0.0


@dataclass
class VerifyReport:
    """Aggregated fidelity figures and the verdict.

    Attributes:
        logits_scope: "full" (whole logits rows) or "top-K" (the reference's top K of each step).
        reports_routing: whether the runtime reports routing (else routing is "not reported").
    """

    tolerances: Tolerances
    samples: list[SampleResult] = field(default_factory=list)
    logits_scope: str = "full"
    reports_routing: bool = True

    @property
    def metrics(self) -> dict[str, float | None]:
        s = self.samples
        steps = sum(r.steps for r in s)
        routed = sum(r.routing_total for r in s)
        return {
            "logits_max_abs": max((r.logits_max_abs for r in s), default=0.0),
            "logits_cosine_min": min((r.logits_cosine_min for r in s), default=1.0),
            "token_agreement": sum(r.tokens_agreed for r in s) / steps if steps else 1.0,
            # None when the runtime does not report routing (llama.cpp)
            "routing_agreement": sum(r.routing_agreed for r in s) / routed if routed and self.reports_routing else None,
            "kl_mean": sum(r.kl_sum for r in s) / steps if steps else 0.0,
            "answer_agreement": sum(r.reference_answer == r.bundle_answer for r in s) / len(s) if s else 1.0,
        }

    @property
    def checks(self) -> dict[str, tuple[float | None, str, bool | None]]:
        """metric → (value, bound as text, passed); passed is None for a check that did not run."""
        m, t = self.metrics, self.tolerances
        if m["routing_agreement"] is None:
            routing: tuple[float | None, str, bool | None] = (None, "not reported by this runtime", None)
        else:
            routing = (m["routing_agreement"], f"≥ {_pct(t.routing_agreement_min)}", m["routing_agreement"] >= t.routing_agreement_min)
        return {
            "logits_max_abs": (m["logits_max_abs"], f"≤ {t.logits_max_abs:g}", m["logits_max_abs"] <= t.logits_max_abs),
            "logits_cosine_min": (m["logits_cosine_min"], f"≥ {t.logits_cosine_min:g}", m["logits_cosine_min"] >= t.logits_cosine_min),
            "token_agreement": (m["token_agreement"], f"≥ {_pct(t.token_agreement_min)}", m["token_agreement"] >= t.token_agreement_min),
            "routing_agreement": routing,
            "kl_mean": (m["kl_mean"], "not judged at this precision", None) if t.kl_mean_max is None else (m["kl_mean"], f"≤ {t.kl_mean_max:g}", m["kl_mean"] <= t.kl_mean_max),
            "answer_agreement": (m["answer_agreement"], f"≥ {_pct(t.answer_agreement_min)}", m["answer_agreement"] >= t.answer_agreement_min),
        }

    @property
    def passed(self) -> bool:
        return all(ok is not False for _, _, ok in self.checks.values())

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "n": len(self.samples),
            "metrics": self.metrics,
            "logits_scope": self.logits_scope,
            "tolerances": asdict(self.tolerances),
            "disagreements": [asdict(r) for r in self.samples if r.reference_answer != r.bundle_answer],
        }


def _pct(x: float) -> str:
    """A bound in percent with the decimals it needs (97.5 %, not 98 %)."""
    return f"{x:.0%}" if round(x * 100, 6).is_integer() else f"{x:.1%}"


def _step_logits(item: TraceItem, step: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, runtime) logits of one step in fp64: the whole row, or the reference's top-k entries."""
    if "logits" in item.tensors:
        return item.tensors["logits"][step].double(), logits.double()
    return item.tensors["topk_values"][step].double(), logits[item.tensors["topk_indices"][step]].double()


def step_kl(item: TraceItem, step: int, logits: torch.Tensor) -> float:
    """KL(reference ‖ runtime) of one step's next-token distribution (top-k entries renormalised
    over themselves when the trace keeps only those)."""
    ref, got = _step_logits(item, step, logits)
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    return max(0.0, float((lp.exp() * (lp - lq)).sum()))


def _compare_logits(item: TraceItem, step: int, logits: torch.Tensor) -> tuple[float, float, float]:
    """(max-abs, cosine, KL) of one step's [V] logits against the trace (full row or the reference's top-k)."""
    ref, got = _step_logits(item, step, logits)
    # identical rows are exactly 1 (the fp64 reduction can land one ulp below, which a bit-exact
    # bound of cosine ≥ 1 must not fail on)
    cos = 1.0 if torch.equal(ref, got) else float(torch.nn.functional.cosine_similarity(ref[None], got[None], dim=-1)[0])
    return float((ref - got).abs().max()), cos, step_kl(item, step, logits)


def replay_one(runtime: Runtime, item: TraceItem, max_new_tokens: int) -> SampleResult:
    """Teacher-forced comparison of one traced question (see the module docstring)."""
    req = item.request
    out = runtime.prefill([req], max_new_tokens)
    routing_total = routing_agreed = 0
    for layer, ref in item.experts("prompt_experts").items():
        got = (out.prompt_experts or {}).get(layer)
        if got is not None:
            got = got[0, : ref.shape[0]].to(torch.int64)
            routing_total += ref.numel()
            routing_agreed += int((ref == got).sum())
    step_experts = item.experts("step_experts")
    max_abs, cos_min, agreed, kl_sum, kl_max = 0.0, 1.0, 0, 0.0, 0.0
    for step, ref_tok in enumerate(item.argmax):
        a, c, kl = _compare_logits(item, step, out.logits[0])
        max_abs, cos_min, kl_sum, kl_max = max(max_abs, a), min(cos_min, c), kl_sum + kl, max(kl_max, kl)
        agreed += int(int(out.logits[0].argmax()) == ref_tok)
        if step:  # experts of the pass that produced this step's logits (the prompt's are counted above)
            for layer, ref in step_experts.items():
                got = out.experts.get(layer)
                if got is not None:
                    routing_total += ref[step - 1].numel()
                    routing_agreed += int((ref[step - 1] == got[0].to(torch.int64)).sum())
        if step == item.steps - 1:
            break
        out = runtime.decode(torch.tensor([ref_tok]))
    own = item.answer if agreed == item.steps else runtime.model_info.tokenizer.decode(greedy_tokens(runtime, req, max_new_tokens)).strip()
    return SampleResult(item.id, item.answer, own, max_abs, cos_min, item.steps, agreed, routing_total, routing_agreed, kl_sum, kl_max)


def replay(runtime: Runtime, trace: Trace, tolerances: Tolerances, *, limit: int | None = None, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Compare `runtime` with the reference recorded in `trace` (its first `limit` questions)."""
    items = trace.items[:limit] if limit is not None else trace.items
    scope = "full" if trace.header.full_logits else f"top-{trace.header.topk}"
    report = VerifyReport(tolerances, logits_scope=scope, reports_routing=runtime.capabilities.reports_routing)
    for i, item in enumerate(items):
        report.samples.append(replay_one(runtime, item, trace.header.max_new_tokens))
        if progress:
            progress(i + 1, len(items))
    return report


__all__ = ["QUANTIZED_TOLERANCES", "TOLERANCES", "step_kl", "SampleResult", "Tolerances", "VerifyReport", "replay", "replay_one", "tolerances_for"]
