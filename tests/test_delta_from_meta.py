"""Routed experts coded as deltas from their meta expert: the model's delta form, the per-expert
choice, and the ONNX emitter against the PyTorch fake-quant oracle, on both backbones."""

from __future__ import annotations

import pytest
import torch

from medmoe_edge import api
from medmoe_edge.calibration.delta import choose
from medmoe_edge.calibration.sensitivity import output_energy
from medmoe_edge.checkpoint import load_model, resolve_model_dir
from medmoe_edge.delta_coding import expert_inputs, to_delta_model
from medmoe_edge.model.moe import Dispatch, MoEFFN
from medmoe_edge.quant_plan import QuantMethod, QuantPlan, QuantRule, QuantSpec
from medmoe_edge.quantization import fake_quantize, load_stats
from medmoe_edge.quantizer import DeltaQTensor, QTensor, QuantizerConfig, quantize
from medmoe_edge.runtime_contract import RuntimeOptions
from medmoe_edge.tensor_ids import checkpoint_id
from medmoe_edge.vocab import Precision


def _delta_codes(loaded, bits: int = 4) -> dict[str, QTensor]:
    """Every routed expert's input projections as RTN codes of W_e − W_meta (the meta in fp32),
    the rest of each expert (fc2 / down) as direct RTN codes: an int`bits` plan of the experts."""
    state = loaded.model.lm.state_dict()
    codes: dict[str, QTensor] = {}
    cfg = QuantizerConfig(bits, 16, QuantMethod.RTN)  # the tiny presets: hidden 80 (phi) and 64
    for _layer, _e, pairs in expert_inputs(loaded):
        for k, m in pairs:
            base = state[m].to(torch.float32)
            d = quantize(state[k].float() - base, cfg)
            codes[k] = DeltaQTensor(d.codes, d.scales, d.zeros, d.bits, d.block, d.symmetric, d.method, base=base, base_key=m)
        prefix = pairs[0][0].rsplit(".", 2)[0]
        for k in state:
            if k.startswith(prefix + ".") and k.endswith(".weight") and k not in codes:
                codes[k] = quantize(state[k].float(), cfg)
    return codes


@pytest.mark.parametrize("dispatch", list(Dispatch))
def test_the_delta_form_computes_what_the_released_form_does(tiny_ckpt, dispatch):
    ref = load_model(tiny_ckpt)
    delta = load_model(tiny_ckpt)
    codes = _delta_codes(delta)
    converted = to_delta_model(delta, codes)
    assert converted == {(layer, e) for layer, e, _ in expert_inputs(delta)}
    state = delta.model.lm.state_dict()
    for k, q in codes.items():  # the weights are now exactly the D the codes were made from
        if isinstance(q, DeltaQTensor):
            assert torch.equal(state[k], ref.model.lm.state_dict()[k].float() - q.base)
    torch.manual_seed(0)
    hidden = ref.spec.text.hidden_size
    x = torch.randn(2, 5, hidden)
    for a, b in zip(ref.model.lm.model.layers, delta.model.lm.model.layers):
        if isinstance(a.mlp, MoEFFN):
            a.mlp.dispatch = b.mlp.dispatch = dispatch
            with torch.no_grad():
                ya, ra = a.mlp(x)
                yb, rb = b.mlp(x)
            assert torch.equal(ra.experts, rb.experts)
            assert float((ya - yb).abs().max()) <= 1e-5 * max(1.0, float(ya.abs().max()))


def test_the_fake_quant_oracle_of_delta_codes_is_base_plus_delta(tiny_ckpt):
    loaded = load_model(tiny_ckpt)
    codes = _delta_codes(loaded)
    k, q = next((k, q) for k, q in codes.items() if isinstance(q, DeltaQTensor))
    assert torch.equal(q.dequantize(), q.base + q.delta().dequantize())
    old = fake_quantize(loaded, codes)
    assert torch.equal(loaded.model.lm.state_dict()[k], q.dequantize())
    assert set(old) == set(codes)


def test_each_expert_keeps_the_coding_with_less_output_energy(stats_dir):
    """On the demo (experts 8-12 % from their meta expert) the delta wins at int2; the choice is
    exactly the energy comparison, and a chosen delta's base is the meta expert's stored codes."""
    model_dir = resolve_model_dir("demo")
    loaded = load_model(model_dir)
    stats = load_stats(stats_dir, model_dir, "demo")
    state = loaded.model.lm.state_dict()
    cfg = QuantizerConfig(2, 32, QuantMethod.GPTQ)
    keys = [k for _l, _e, pairs in expert_inputs(loaded) for pair in pairs for k in pair]
    codes = {k: quantize(state[k], cfg, stats.hessians[k], stats.tokens.get(k, 0)) for k in dict.fromkeys(keys)}
    out, report = choose(loaded, stats, codes)
    assert len(report) == 8 and sum(c.chosen for c in report) >= 6
    for c in report:
        assert c.chosen == (c.delta < c.direct)
        for k, m in next(p for layer, e, p in expert_inputs(loaded) if (layer, e) == (c.layer, c.expert)):
            q = out[k]
            assert isinstance(q, DeltaQTensor) == c.chosen
            if c.chosen:
                assert q.base_key == m and torch.equal(q.base, codes[m].dequantize())  # the meta as the bundle stores it
                assert output_energy(stats, k, state[k], q.dequantize()) == pytest.approx(c.delta, rel=1e-6)
            assert not isinstance(out[m], DeltaQTensor)


def test_random_experts_far_from_their_meta_stay_direct(tiny_ckpts, tmp_path):
    """The tiny checkpoints' experts are independent random draws, about √2 as far from the meta
    expert as from zero: the delta adds more error, so no expert takes it."""
    from medmoe_edge.presets import Preset
    from medmoe_edge.quantization import calibrate

    ckpt = tiny_ckpts[Preset.TINY_STABLELM]
    stats, _ = calibrate(ckpt, tmp_path / "stats", per_domain=1, sensitivity_per_domain=1)
    loaded = load_model(ckpt)
    state = loaded.model.lm.state_dict()
    keys = dict.fromkeys(k for _l, _e, pairs in expert_inputs(loaded) for pair in pairs for k in pair)
    codes = {k: quantize(state[k], QuantizerConfig(4, 16, QuantMethod.GPTQ), stats.hessians[k], stats.tokens.get(k, 0)) for k in keys if k in stats.hessians}
    _out, report = choose(loaded, stats, codes)
    assert report and not any(c.chosen for c in report)
    assert all(c.delta > c.direct for c in report)


@pytest.mark.parametrize("dispatch", ["scatter", "if"])
def test_onnx_bundle_of_delta_codes_equals_the_oracle_on_both_backbones(tiny_ckpt, dispatch, level0, tmp_path):
    pytest.importorskip("onnxruntime")
    from oracle_checks import assert_equals_oracle

    from medmoe_edge.export.onnx_quant import OnnxQuantExporter

    loaded = load_model(tiny_ckpt)
    codes = _delta_codes(loaded)
    rules = [QuantRule(str(checkpoint_id(k)), QuantSpec(Precision.INT4, QuantMethod.RTN, 16, base=str(checkpoint_id(q.base_key)))) for k, q in codes.items() if isinstance(q, DeltaQTensor)]
    rules += [QuantRule(str(checkpoint_id(k).group), QuantSpec(Precision.INT4, QuantMethod.RTN, 16)) for k in dict.fromkeys(k for k in codes)]
    plan = QuantPlan(QuantSpec(Precision.FP32), tuple(dict((r.pattern, r) for r in rules).values()))
    exporter = OnnxQuantExporter(codes)
    out = tmp_path / "b"
    exporter.export(tiny_ckpt, out, OnnxQuantExporter.request({"--moe-dispatch": dispatch}, plan=plan))
    opts = RuntimeOptions(num_threads=1)
    oracle = api.load(tiny_ckpt, runtime="torch", options=opts)
    fake_quantize(oracle.runtime.loaded, codes)
    assert_equals_oracle(api.load(out, runtime="onnxruntime", options=opts), oracle)
