"""`quantize --sensitivity proxy`: tr(ΔW H ΔWᵀ) is the squared output error over the calibration
tokens, each probed class reproduces its end-to-end measurement exactly, the estimates rank the
demo's groups like the measured mode, and the bundle records which mode chose its plan."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge.allocation import BACKENDS
from medmoe_edge.bundle import read_manifest
from medmoe_edge.calibration.sensitivity import CodeBook, Probe, SensitivityMode, cache_name, estimate, measure, output_energy, probe_class, swap, units_for
from medmoe_edge.checkpoint import load_model, resolve_model_dir
from medmoe_edge.cli.app import app
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantization import load_stats

pytest.importorskip("onnxruntime")


def test_output_energy_is_the_squared_output_error_over_the_calibration_tokens():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    x = torch.randn(50, 16, generator=g)  # the 50 calibration rows that reach the matrix
    dq = w + 0.01 * torch.randn(8, 16, generator=g)
    stats = SimpleNamespace(hessians={"m.weight": x.T @ x})
    direct = float(((x @ (dq - w).T) ** 2).sum())
    assert output_energy(stats, "m.weight", w, dq) == pytest.approx(direct, rel=1e-5)
    assert output_energy(stats, "embed.weight", w, dq) is None  # no Hessian: probed end to end instead


@pytest.fixture(scope="module")
def demo(stats_dir):
    model_dir = resolve_model_dir("demo")
    return load_model(model_dir), load_stats(stats_dir, model_dir, "demo")


def test_a_probe_started_at_the_changed_layer_equals_a_full_pass(demo):
    """Probes of a layer's weights reuse the reference hidden states below it: same ΔKL and routes
    as running every layer (and starting above the changed layer would miss it: the start matters)."""
    loaded, stats = demo
    probe = Probe.from_stats(loaded, stats)
    state = loaded.model.lm.state_dict()
    n = loaded.spec.text.num_layers
    for key, layer in (("model.layers.2.mlp.meta_moe.fc1.weight", 2), ("model.layers.0.self_attn.q_proj.weight", 0), ("lm_head.weight", n)):
        g = torch.Generator().manual_seed(layer)
        old = swap(loaded, {key: state[key] + 0.05 * state[key].std() * torch.randn(state[key].shape, generator=g)})
        try:
            full, part = probe.measure(0), probe.measure(layer)
            above = probe.measure(min(layer + 1, n)) if layer < n else None
        finally:
            swap(loaded, old)
        assert full[0] > 1e-8, key
        assert part[0] == pytest.approx(full[0], rel=1e-4) and part[1] == pytest.approx(full[1], abs=1e-12), key
        if above is not None:
            assert above[0] < 0.5 * full[0] or above[1] != full[1], key
    assert probe.measure(0)[0] == pytest.approx(0.0, abs=1e-9) and probe.measure(0)[1] == 1.0  # restored


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_the_proxy_reproduces_its_probes_and_ranks_groups_like_the_measured_mode(demo, stats_dir, backend):
    loaded, stats = demo
    b = BACKENDS[backend]
    book = CodeBook(stats, QuantMethod.GPTQ, 32, symmetric=not b.zero_point)
    est = {f"{u.name}|{c.precision.value}": c for u in estimate(loaded, stats, b, book, cache_dir=stats_dir) for c in u.choices if not c.precision.is_float}
    got = {f"{u.name}|{c.precision.value}": c for u in measure(loaded, stats, b, book, cache_dir=stats_dir) for c in u.choices if not c.precision.is_float}
    assert est.keys() == got.keys()
    cached = json.loads((stats_dir / cache_name(stats, b, QuantMethod.GPTQ, 32, SensitivityMode.PROXY)).read_text())
    units = [u for u in units_for(loaded, b)]
    classes = {probe_class(u) for u in units if u.name != "embed"}
    assert len(cached["probes"]) == len(classes)  # one end-to-end probe per (layer, component)
    for key in cached["probes"]:  # a class's own probe is its estimate (share 1), equal to the measured mode's
        assert est[key].delta == pytest.approx(got[key].delta, rel=1e-6, abs=1e-12)
        assert est[key].router_agreement == pytest.approx(got[key].router_agreement, abs=1e-9)
    if backend == "torch":  # the embedding has no Hessian: measured at every type, so equal
        for key in (k for k in est if k.startswith("embed|")):
            assert est[key].delta == got[key].delta
    import numpy as np

    keys = sorted(est)
    rank = lambda xs: np.argsort(np.argsort(np.asarray(xs)))  # noqa: E731
    rho = float(np.corrcoef(rank([got[k].delta for k in keys]), rank([est[k].delta for k in keys]))[0, 1])
    assert rho >= 0.8, rho  # 0.97 with 16 calibration questions per domain (docs/QUANTIZATION.md); this fixture has 1


def test_quantize_with_the_proxy_records_it_in_the_plan_and_the_summary(stats_dir, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["quantize", "--format", "onnx", "--stats", str(stats_dir), "--avg-bits", "6", "--sensitivity", "proxy", "--no-verify", "--out", str(out)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "ΔKL estimated from tr(ΔW H ΔWᵀ), one probe per layer and component" in " ".join(r.output.split())
    m = read_manifest(out)
    assert m.extra["quantization"]["sensitivity"] == "proxy"
    check = m.extra["quantization"]["router_check"]  # the router check's per-pick probes, said as recorded
    picks = check["picks_measured"]
    assert check["pick_probes"] == picks  # one probe each
    assert f"{picks} estimated pick{'s' if picks != 1 else ''} probed end to end)" in " ".join(r.output.split())
    # every group's rule (a delta-coded projection's rule records the coding's energies instead)
    assert m.plan.rules and all(rule.note["sensitivity"] == "proxy" for rule in m.plan.rules if rule.spec.base is None)
    shown = CliRunner().invoke(app, ["plan", "show", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "(proxy sensitivities)" in " ".join(shown.output.split())
