"""`medmoe-edge quantize --format gguf` on the demo model: one ggml type per layer × projection for the
stacked experts (and per TensorId group elsewhere) from measured sensitivities, every matrix rounded
by ggml's own quantizer with its own importance vector; the written file holds exactly the codes that
were measured, and llama.cpp running it equals the PyTorch fake-quant oracle of those codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.allocation import BACKENDS
from medmoe_edge.bundle import read_manifest
from medmoe_edge.checkpoint import load_model, resolve_model_dir
from medmoe_edge.cli.app import app
from medmoe_edge.presets import Preset
from medmoe_edge.quant_plan import QuantMethod, QuantPlan
from medmoe_edge.quantization import fake_quantize, load_stats, make_plan
from medmoe_edge.runtime_contract import RuntimeOptions
from medmoe_edge.trace import Trace, TraceQuestion, record
from medmoe_edge.verify import QUANTIZED_TOLERANCES, TOLERANCES, replay
from medmoe_edge.vocab import ArtifactKind, Component, Precision, PrecisionKind

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: bash scripts/build_llamacpp.sh")
if "+medmoe" not in llama_cpp.__version__:
    pytest.skip("llama-cpp-python is not the patched build: bash scripts/build_llamacpp.sh", allow_module_level=True)
gguf = pytest.importorskip("gguf")

AVG_BITS = "5"  # the demo's smallest GGUF plan that keeps the router guard is ~3.5 bits per weight (projector q8_0)
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def bundle(stats_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gbundle") / "b"
    r = CliRunner().invoke(app, ["quantize", "--format", "gguf", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--out", str(out)], env=WIDE)
    return out, r


@pytest.fixture(scope="module")
def planned(bundle, stats_dir):
    """The same plan made again in-process (sensitivities cached in the statistics directory, codes deterministic)."""
    model_dir = resolve_model_dir("demo")
    loaded = load_model(model_dir)
    result = make_plan(loaded, load_stats(stats_dir, model_dir, "demo"), "gguf", method=QuantMethod.IMATRIX_RTN, avg_bits=float(AVG_BITS), cache_dir=stats_dir)
    assert result.plan.to_json() == QuantPlan.from_json(read_manifest(bundle[0]).plan.to_json()).to_json()
    return loaded, result


def test_quantize_prints_the_plan_and_judges_the_bundle_by_the_quantized_tolerances(bundle):
    out, r = bundle
    text = " ".join(r.output.split())
    assert "plan (imatrix-rtn, ggml blocks)" in text and "layers.0.expert.*.fc1" in text
    assert "written against" in text and "(+0.00%)" in text
    assert "llamacpp runtime against the embedded reference trace (40 eval questions)" in text
    tol = QUANTIZED_TOLERANCES[ArtifactKind.GGUF]
    assert f"≤ {tol.kl_mean_max:g}" in text and "≥ 95%" in text  # the quantized bounds, not the F32 file's ≤ 0.25
    report = read_manifest(out)
    assert report.plan.quantizes_groups
    # the verdict the tool printed is the one its exit code carries
    if r.exit_code == 0:
        assert "FAIL" not in text
    else:
        assert r.exit_code == 1 and "outside the quantized-bundle tolerances" in text


def test_types_keep_the_plan_to_the_types_asked_within_the_same_budget(planned, stats_dir):
    """--types q4_k,q6_k,q8_0 (what a CPU user asks to keep q3_k, slow to decode, out): every pick is
    one of them or floating point, the budget holds, and the plan without it did pick others."""
    loaded, full = planned
    allowed = (Precision.Q4_K, Precision.Q6_K, Precision.Q8_0)
    assert any(not c.precision.is_float and c.precision not in allowed for c in full.allocation.picks)  # the restriction has something to remove
    res = make_plan(loaded, load_stats(stats_dir, resolve_model_dir("demo"), "demo"), "gguf", method=QuantMethod.IMATRIX_RTN, avg_bits=float(AVG_BITS), cache_dir=stats_dir, types=allowed)
    picks = {c.precision for c in res.allocation.picks}
    assert picks <= set(allowed) | {Precision.FP16, Precision.FP32}, picks
    assert picks & set(allowed)
    assert res.allocation.nbytes <= res.allocation.budget == full.allocation.budget
    assert {r.spec.precision for r in res.plan.rules} <= set(allowed) | {Precision.FP16}


def test_types_read_back_equal_the_plan_one_per_layer_and_projection(bundle):
    from medmoe_edge.export.gguf_quant import read_back
    from medmoe_edge.ggml_codes import block_size

    out, _ = bundle
    m = read_manifest(out)
    rules = {r.pattern: r for r in m.plan.rules}
    stacks = {p for p in rules if ".expert.*." in p}
    assert stacks == {f"layers.{layer}.expert.*.{proj}" for layer in (0, 2) for proj in ("fc1", "fc2")}
    stored = read_back(out)
    quantized = {p: r for p, r in rules.items() if r.spec.precision.kind is PrecisionKind.GGML}
    assert set(stored) == set(quantized) and quantized
    for name, (precision, block, nbytes) in stored.items():
        rule = quantized[name]
        assert precision is rule.spec.precision and block == block_size(precision), name
        assert nbytes == rule.note["bytes"], name  # ggml sizes are exact: bytes per block × blocks
        # the embedding is a lookup table: no calibrated inputs, no imatrix
        assert rule.spec.method is (QuantMethod.RTN if name == "embed" else QuantMethod.IMATRIX_RTN) and rule.spec.group_size is None
    assert "projector" in rules  # planned like any unit: its type (ggml codes in the mmproj file, or f16) is checked below
    for tid in ("layers.0.router", "layers.2.router", "vision"):
        assert m.plan.spec_for(tid).precision.is_float
    # the manifest's own read-back: every expert of a stack has the stack's type
    for g in m.tensor_groups:
        if g.name.startswith("layers.0.expert.") and g.precision.kind is PrecisionKind.GGML:
            assert g.precision in {rules["layers.0.expert.*.fc1"].spec.precision, rules["layers.0.expert.*.fc2"].spec.precision}


def test_the_file_holds_the_measured_codes_each_expert_rounded_with_its_own_imatrix(bundle, planned):
    from medmoe_edge.ggml_codes import quantize
    from medmoe_edge.tensor_ids import gguf_target

    out, _ = bundle
    loaded, result = planned
    data = {(f, t.name): np.asarray(t.data) for f in ("model.gguf", "mmproj.gguf") for t in gguf.GGUFReader(str(out / f)).tensors}
    for key, codes in result.codes.items():
        target = gguf_target(key)
        stored = data[("mmproj.gguf" if target.mmproj else "model.gguf", target.name)]
        got = stored[target.tensor_id.expert] if target.stacked else stored
        assert np.array_equal(got.reshape(codes.data.shape), codes.data), key
    # a routed expert's codes use its own importance vector: without it (or with another expert's) they differ
    k_quant = next(k for k, c in result.codes.items() if ".deepspeed_experts.1." in k and c.precision is not Precision.Q8_0)
    weight = loaded.model.lm.state_dict()[k_quant]
    mine = result.codes[k_quant]
    assert mine.imatrix
    assert not np.array_equal(quantize(weight, mine.precision, None).data, mine.data)


def test_llamacpp_on_the_bundle_equals_the_fake_quant_oracle_of_the_same_codes(bundle, planned):
    """Kernel error only: llama.cpp running the codes against the PyTorch reference running the same
    dequantized codes, judged by the F32 GGUF bundle's own tolerances; and the KL to fp32 within
    1.5× the fake-quant plan's (the issue's bound)."""
    out, _ = bundle
    loaded, result = planned
    opts = RuntimeOptions(num_threads=2)
    embedded = Trace.load(out)
    n = 8
    with api.load(resolve_model_dir("demo"), runtime="torch", options=opts) as oracle:
        fake_quantize(oracle.runtime.loaded, result.codes)
        fake_vs_fp32 = replay(oracle.runtime, embedded, QUANTIZED_TOLERANCES[ArtifactKind.GGUF], limit=n)
        qs = [TraceQuestion(it.id, it.question, it.request, it.meta) for it in embedded.items[:n]]
        h = embedded.header
        oracle_trace = record(oracle.runtime, qs, source_sha256=h.source_sha256, max_new_tokens=h.max_new_tokens, preprocess=h.preprocess, set_name=h.set_name)
    with api.load(out, runtime="llamacpp", options=opts) as pipe:
        kernels = replay(pipe.runtime, oracle_trace, TOLERANCES[(ArtifactKind.GGUF, Precision.FP32)])
        gguf_vs_fp32 = replay(pipe.runtime, embedded, QUANTIZED_TOLERANCES[ArtifactKind.GGUF], limit=n)
    assert kernels.passed, kernels.checks
    assert kernels.metrics["answer_agreement"] == 1.0
    assert gguf_vs_fp32.metrics["kl_mean"] <= 1.5 * fake_vs_fp32.metrics["kl_mean"], (gguf_vs_fp32.metrics, fake_vs_fp32.metrics)


def test_rows_that_are_not_whole_blocks_are_never_offered_that_type(tiny_ckpts):
    """k-quants need rows of 256 weights and q8_0 rows of 32 (llama.cpp would store another type), so
    the allocator offers only the types a unit's rows fit: none of the k-quants on a tiny model, all
    of them for the demo's decoder (rows of 256 and 512), q8_0 for its projector (rows of 128 from
    the tower) as for any unit."""
    from medmoe_edge.calibration.sensitivity import units_for

    b = BACKENDS["gguf"]
    floats = {Precision.FP16, Precision.FP32}
    k_quants = {Precision.Q2_K, Precision.Q3_K, Precision.Q4_K, Precision.Q5_K, Precision.Q6_K}
    for model, any_k_quant in ((tiny_ckpts[Preset.TINY_PHI], False), (resolve_model_dir("demo"), True)):
        offered_k = False
        for u in units_for(load_model(model), b):
            offered = {p for p in b.candidates if b.offers(p, u)}
            expected = floats | ({Precision.Q8_0, Precision.Q4_0} if all(r % 32 == 0 for r in u.rows) else set()) | (k_quants if all(r % 256 == 0 for r in u.rows) else set())
            assert offered == expected, (model.name, u.name, u.rows)
            offered_k |= bool(offered & k_quants)
            if u.component is Component.PROJECTOR and model.name != "tiny-phi":
                assert Precision.Q8_0 in offered, u.rows
        assert offered_k is any_k_quant, model.name


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--block", "64"], "--block does not apply to --format gguf: ggml types fix their own blocks"),
        (["--moe-dispatch", "if"], "--moe-dispatch does not apply to --format gguf"),
        (["--avg-bits", "3"], "is below what the smallest types allow"),
        (["--types", "q4_k,int4"], "--types 'int4' is not a type of --format gguf: use some of q2_k, q3_k, q4_0, q4_k, q5_k, q6_k, q8_0"),
        (["--types", "q8_0"], "or allow smaller types than --types q8_0"),  # 5 bits per weight cannot be met with q8_0 and floats alone
    ],
)
def test_bad_gguf_options_are_one_line_errors_that_leave_nothing(extra, message, stats_dir, tmp_path):
    out = tmp_path / "out"
    args = ["quantize", "--format", "gguf", "--stats", str(stats_dir), "--out", str(out)]
    if "--avg-bits" not in extra:
        args += ["--avg-bits", AVG_BITS]
    r = CliRunner().invoke(app, [*args, *extra], env=WIDE)
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert message in " ".join(r.output.split()), r.output
    assert not out.exists()


def test_plan_show_lists_each_stack_and_marks_its_experts_with_both_projections(bundle):
    out, _ = bundle
    m = read_manifest(out)
    r = CliRunner().invoke(app, ["plan", "show", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    rules = {x.pattern: x for x in m.plan.rules}
    fc1, fc2 = rules["layers.0.expert.*.fc1"].spec.precision, rules["layers.0.expert.*.fc2"].spec.precision
    text = " ".join(r.output.split())
    assert "layers.0.expert.*.fc1" in text and fc1.value in text
    from medmoe_edge.ggml_codes import CODE_BITS

    # the heatmap cell of every expert of layer 0: fc1 bits / fc2 bits (code bits, not q2_k's 2.625)
    assert f"{CODE_BITS[fc1]}/{CODE_BITS[fc2]}" in text
    # the projector's pick is a rule, so the mmproj stores it as the budget counted (ggml codes or f16)
    from medmoe_edge.export.gguf_export import read_tensor_types

    projector = rules["projector"].spec.precision
    assert projector is not Precision.FP32 and projector.value in text
    assert {Precision.from_ggml(t) for n, t, _, shape in read_tensor_types(out / "mmproj.gguf") if n.startswith("mm.") and len(shape) == 2} == {projector}


def test_gptq_codes_are_packed_into_q4_0_and_q8_0_bit_for_bit_and_written_as_they_are(stats_dir, tmp_path):
    """--method gptq: where a ggml type holds the quantizer core's symmetric block-32 codes (q4_0,
    q8_0), the file holds GPTQ on the matrix's own Hessian, packed, not re-rounded by ggml; the
    k-quants stay ggml's imatrix rounding, and the plan says which method made each group."""
    from medmoe_edge.ggml_codes import PACKABLE
    from medmoe_edge.quantizer import QuantizerConfig, quantize
    from medmoe_edge.tensor_ids import gguf_target

    out = tmp_path / "gptq"
    r = CliRunner().invoke(app, ["quantize", "--format", "gguf", "--method", "gptq", "--stats", str(stats_dir), "--avg-bits", "6", "--out", str(out)], env=WIDE)
    assert r.exit_code in (0, 1), r.output  # 1: written, outside the tolerances (said so)
    m = read_manifest(out)
    picks = {rule.pattern: rule.spec for rule in m.plan.rules if not rule.spec.precision.is_float}
    packed = [name for name, spec in picks.items() if spec.precision in PACKABLE]
    assert packed, picks  # the demo's plan at 6 bits holds q8_0/q4_0 groups
    for name, spec in picks.items():
        want = QuantMethod.GPTQ if spec.precision in PACKABLE else QuantMethod.IMATRIX_RTN
        assert spec.method is want or (name == "embed" and spec.method is QuantMethod.RTN), (name, spec)
    model_dir = resolve_model_dir("demo")
    loaded = load_model(model_dir)
    stats = load_stats(stats_dir, model_dir, "demo")
    result = make_plan(loaded, stats, "gguf", method=QuantMethod.GPTQ, avg_bits=6.0, cache_dir=stats_dir)
    data = {(f, t.name): np.asarray(t.data) for f in ("model.gguf", "mmproj.gguf") for t in gguf.GGUFReader(str(out / f)).tensors}
    state = loaded.model.lm.state_dict()
    checked = 0
    for key, codes in result.codes.items():
        if codes.precision not in PACKABLE or key not in stats.hessians:
            continue
        q = quantize(state[key], QuantizerConfig(PACKABLE[codes.precision], 32, QuantMethod.GPTQ, symmetric=True), stats.hessians[key], stats.tokens[key])
        assert codes.gptq and torch.equal(codes.dequantize(), q.dequantize()), key  # packed bit for bit: gguf-py reads back the GPTQ weights exactly
        target = gguf_target(key)
        stored = data[("mmproj.gguf" if target.mmproj else "model.gguf", target.name)]
        got = stored[target.tensor_id.expert] if target.stacked else stored
        assert np.array_equal(got.reshape(codes.data.shape), codes.data), key
        checked += 1
    assert checked
