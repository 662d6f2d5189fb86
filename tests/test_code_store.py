"""`quantize`'s candidate codes held to a memory cap (`calibration.code_store`): the same plan and
codes as when every candidate stays in memory, never more than the cap held, nothing left behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge.calibration.code_store import CodeStore, held_bytes
from medmoe_edge.checkpoint import load_model, resolve_model_dir
from medmoe_edge.cli.app import app
from medmoe_edge.ggml_codes import GgmlCodes
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantization import candidate_code_bytes, load_stats, make_plan
from medmoe_edge.quantizer import QuantizerConfig, quantize
from medmoe_edge.vocab import Precision


def test_codes_read_back_from_the_spill_directory_are_the_codes_made(tmp_path):
    g = torch.Generator().manual_seed(0)
    q = quantize(torch.randn(8, 64, generator=g), QuantizerConfig(3, 32, QuantMethod.RTN, symmetric=True))
    gg = GgmlCodes(Precision.Q4_K, np.arange(8 * 144, dtype=np.uint8).reshape(8, 144) % 251, (8, 256), True, False)
    store = CodeStore(memory=1, spill=tmp_path)  # below one entry: only the last one asked for stays
    made = []
    assert store.get("q", lambda: made.append("q") or q) is q
    assert store.get("g", lambda: made.append("g") or gg) is gg
    assert store.resident() == 1 and len(store) == 2 and "q" in store
    back = store.get("q", lambda: made.append("again") or q)
    assert made == ["q", "g"] and store.read_back == 1 and store.made == 2
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales) and torch.equal(back.zeros, q.zeros)
    assert (back.bits, back.block, back.symmetric, back.method) == (q.bits, q.block, q.symmetric, q.method)
    g2 = store.get("g", lambda: gg)
    assert np.array_equal(g2.data, gg.data) and (g2.precision, g2.shape, g2.imatrix, g2.gptq) == (gg.precision, gg.shape, gg.imatrix, gg.gptq)
    assert held_bytes(g2) == gg.nbytes
    with pytest.raises(ValueError, match="spill directory"):
        CodeStore(memory=10)


def test_a_plan_whose_candidate_codes_do_not_fit_is_the_same_plan(stats_dir, tmp_path):
    loaded = load_model(resolve_model_dir("demo"))
    stats = load_stats(stats_dir, resolve_model_dir("demo"), "demo")
    whole = make_plan(loaded, stats, "torch", method=QuantMethod.GPTQ, avg_bits=4.0, cache_dir=tmp_path / "whole", codes_memory=2**40)
    assert whole.spilled is None
    cap = candidate_code_bytes(whole.units, 32) // 8  # an eighth of the codes the plan's choices take
    spill = tmp_path / "beside-out"
    spill.mkdir()
    capped = make_plan(loaded, stats, "torch", method=QuantMethod.GPTQ, avg_bits=4.0, cache_dir=tmp_path / "capped", codes_memory=cap, spill_dir=spill)
    assert capped.spilled is not None and capped.spilled.cap == cap and capped.spilled.need > 8 * cap
    assert capped.spilled.read_back > 0  # the router check and the picks read codes the cap had dropped
    assert list(spill.iterdir()) == []  # the spill folder is removed with the plan made
    assert capped.plan == whole.plan
    assert capped.codes.keys() == whole.codes.keys()
    for k, q in whole.codes.items():
        assert torch.equal(q.codes, capped.codes[k].codes) and torch.equal(q.scales, capped.codes[k].scales), k


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_cli_codes_memory_must_be_positive_and_finite(stats_dir, tmp_path, value):
    r = CliRunner().invoke(app, ["quantize", "--format", "onnx", "--stats", str(stats_dir), "--avg-bits", "4", "--codes-memory", value, "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and f"--codes-memory must be a positive, finite number of GiB, got {value}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_a_whole_plan_measured_with_deferred_weights_is_measured_as_with_them_put_in(stats_dir):
    """The whole-plan router check makes each matrix from its codes while its layer runs (`Deferred`),
    not every planned matrix in fp32 at once: the same logits and routes, and the model restored."""
    from medmoe_edge.calibration.routing import measure_plan
    from medmoe_edge.calibration.sensitivity import CodeBook, Deferred, Probe

    loaded = load_model(resolve_model_dir("demo"))
    stats = load_stats(stats_dir, resolve_model_dir("demo"), "demo")
    state = loaded.model.lm.state_dict()
    book = CodeBook(stats, QuantMethod.GPTQ, 32)
    keys = [k for k in state if k.endswith(".weight") and state[k].dim() == 2 and "gate.wg" not in k]  # the embedding too: made at once
    eager = {k: book.get(k, state[k], 3).dequantize() for k in keys}
    made = []
    deferred = {k: Deferred(lambda k=k: made.append(k) or book.get(k, state[k], 3).dequantize()) for k in keys}
    before = {k: p for k, p in loaded.model.lm.named_parameters()}
    probe = Probe.from_stats(loaded, stats)
    a, b = measure_plan(loaded, probe, eager), measure_plan(loaded, probe, deferred)
    assert (a.delta_kl, a.flips, a.stderr) == (b.delta_kl, b.flips, b.stderr) and a.flips > 0
    assert "model.embed_tokens.weight" in made and len(made) >= len(keys)  # every matrix was made, each when its layer ran
    assert all(p is before[k] for k, p in loaded.model.lm.named_parameters()) and before.keys() == dict(loaded.model.lm.named_parameters()).keys()
