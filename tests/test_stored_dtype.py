"""A bf16 checkpoint's matrices kept as stored (`load_model(keep_stored=True)`, what `calibrate` and
`quantize` load): the fp32 reference bit for bit with about half the weights' memory, so the
statistics, the measured sensitivities, the plan and the codes are those of an fp32 load."""

from __future__ import annotations

import pytest
import torch

from medmoe_edge import quantization
from medmoe_edge.calibration.sensitivity import Probe
from medmoe_edge.calibration.sets import resolve_set
from medmoe_edge.calibration.teacher import prepare
from medmoe_edge.checkpoint import load_model
from medmoe_edge.demo import demo_dir
from medmoe_edge.imaging import PreprocessMode
from medmoe_edge.quant_plan import QuantMethod


@pytest.fixture
def same_threads(monkeypatch):
    """Pin the torch runtime's default thread count for the whole test: it is load-aware
    (`runtime_contract.default_threads`), and float32 sums change with the thread count, so two
    recordings compared bit for bit must run at the same count (both failed in CI without it)."""
    import medmoe_edge.runtime_contract as contract

    monkeypatch.setattr(contract, "default_threads", lambda: 2)


def _lm_bytes(loaded) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.lm.parameters())


def test_kept_matrices_compute_the_fp32_reference_bit_for_bit(bf16_demo):
    wide, kept = load_model(bf16_demo), load_model(bf16_demo, keep_stored=True)
    params = dict(kept.model.lm.named_parameters())
    assert {k for k, p in params.items() if p.dtype == torch.bfloat16} == {k for k, p in params.items() if p.dim() == 2}
    assert all(p.dtype == torch.float32 for p in params.values() if p.dim() == 1)  # norms and biases: the compute dtype
    assert kept.model.dtype == torch.float32
    assert _lm_bytes(kept) < 0.55 * _lm_bytes(wide)
    samples, root = resolve_set("eval")
    a, b = (Probe(m, prepare(m, samples[:8], root, PreprocessMode.PAD)) for m in (wide, kept))
    assert torch.equal(a.ref_logp, b.ref_logp)
    assert a.ref_routes.keys() == b.ref_routes.keys() and all(torch.equal(a.ref_routes[k], b.ref_routes[k]) for k in a.ref_routes)


def test_an_fp32_checkpoint_is_never_narrowed_and_keep_stored_needs_fp32_compute():
    kept = load_model(demo_dir(), keep_stored=True)
    assert {p.dtype for p in kept.model.lm.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype=torch.float32"):
        load_model(demo_dir(), dtype=torch.bfloat16, keep_stored=True)


def test_calibrate_and_quantize_from_kept_matrices_equal_an_fp32_load(bf16_demo, tmp_path, monkeypatch, same_threads):
    kept_stats, _ = quantization.calibrate(bf16_demo, tmp_path / "kept", per_domain=1, sensitivity_per_domain=1)
    kept = load_model(bf16_demo, keep_stored=True)
    kept_plan = quantization.make_plan(kept, kept_stats, "torch", method=QuantMethod.GPTQ, avg_bits=4.0, cache_dir=tmp_path / "kept")
    assert next(kept.model.lm.parameters()).dtype == torch.bfloat16  # the probes put every matrix back as it was

    monkeypatch.setattr(quantization, "load_model", lambda d, **_: load_model(d))  # the whole model in fp32
    wide_stats, _ = quantization.calibrate(bf16_demo, tmp_path / "wide", per_domain=1, sensitivity_per_domain=1)
    assert wide_stats.key == kept_stats.key and wide_stats.tokens == kept_stats.tokens
    assert torch.equal(wide_stats.routed, kept_stats.routed) and torch.equal(wide_stats.margins, kept_stats.margins)
    assert wide_stats.hessians.keys() == kept_stats.hessians.keys()
    for k in kept_stats.hessians:
        assert torch.equal(wide_stats.hessians[k], kept_stats.hessians[k]), k
    wide_plan = quantization.make_plan(load_model(bf16_demo), wide_stats, "torch", method=QuantMethod.GPTQ, avg_bits=4.0, cache_dir=tmp_path / "wide")
    assert [(u.name, c.precision, c.delta, c.router_agreement) for u, c in zip(wide_plan.units, wide_plan.allocation.picks)] == [
        (u.name, c.precision, c.delta, c.router_agreement) for u, c in zip(kept_plan.units, kept_plan.allocation.picks)
    ]
    assert wide_plan.codes.keys() == kept_plan.codes.keys()
    for k, q in kept_plan.codes.items():
        assert torch.equal(q.codes, wide_plan.codes[k].codes) and torch.equal(q.scales, wide_plan.codes[k].scales), k
    # quantize records the bundle's trace on the model as make_plan left it: the fp32 reference's
    on_kept, fresh = quantization._embedded_trace(bf16_demo, 4, kept), quantization._embedded_trace(bf16_demo, 4)
    assert [i.id for i in on_kept.items] == [i.id for i in fresh.items]
    for a, b in zip(on_kept.items, fresh.items):
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), a.id


def test_quantize_records_the_trace_on_an_fp32_load_when_it_fits_and_on_the_kept_model_when_not(bf16_demo, monkeypatch):
    """Decoding widens every kept matrix at every token (2.4x the time on the real-dimension proxy),
    so the trace uses an fp32 load where it fits, and the kept model only where it does not."""
    import medmoe_edge.diagnostics as diagnostics

    kept, wide = load_model(bf16_demo, keep_stored=True), load_model(bf16_demo)
    assert quantization.keeps_narrow(kept) and not quantization.keeps_narrow(wide)
    assert quantization.fp32_fits(kept) and not quantization.fp32_fits(wide)  # an fp32 checkpoint is reused as loaded
    monkeypatch.setattr(diagnostics, "available_memory", lambda: 2**20)
    assert not quantization.fp32_fits(kept)


def test_export_traces_a_checkpoint_whose_fp32_weights_do_not_fit_as_stored(bf16_demo, tmp_path, monkeypatch, same_threads):
    """`export` embeds a reference trace: recorded on the matrices as stored where the whole model
    in fp32 would not fit (a full-size Phi: 23 GiB), the same trace bit for bit at the same thread count."""
    import medmoe_edge.diagnostics as diagnostics
    from medmoe_edge import workflows
    from medmoe_edge.trace import Trace

    asked = []
    real = workflows.record_trace
    with monkeypatch.context() as m:
        m.setattr(workflows, "record_trace", lambda *a, **k: asked.append(k["keep_stored"]) or real(*a, **k))
        m.setattr(diagnostics, "available_memory", lambda: 2**20)
        workflows.export_bundle("onnx", bf16_demo, tmp_path / "b", trace_questions=2)
    assert asked == [True]
    embedded, fresh = Trace.load(tmp_path / "b"), workflows.record_trace(bf16_demo, limit=2)
    assert [i.id for i in embedded.items] == [i.id for i in fresh.items]
    for a, b in zip(embedded.items, fresh.items):
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors), a.id
