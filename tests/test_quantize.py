"""`medmoe-edge quantize --format onnx` and `medmoe-edge plan show` on the demo model: the types read
back from the written graphs equal the plan, the written bytes equal the plan's prediction, ONNX
Runtime (DequantizeLinear → MatMul fused into MatMulNBits, accuracy level 0) equals the PyTorch
fake-quant oracle of the same codes, and bad input is a one-line error that leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmoe_edge import api
from medmoe_edge.bundle import read_manifest
from medmoe_edge.calib_stats import CalibSettings
from medmoe_edge.cli.app import app
from medmoe_edge.presets import Preset
from medmoe_edge.quant_plan import QuantMethod, QuantPlan
from medmoe_edge.quantization import fake_quantize, load_stats, make_plan
from medmoe_edge.runtime_contract import RuntimeOptions

from oracle_checks import assert_equals_oracle

pytest.importorskip("onnxruntime")

AVG_BITS = "6"  # the demo's smallest ONNX plan is 5.13 bits per weight (int4 + fp32 scale + 4-bit zero point): 6 mixes int4 and int8
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def bundle(stats_dir, tmp_path_factory):
    """The bundle `medmoe-edge quantize` writes (with its fidelity check), and what it printed."""
    out = tmp_path_factory.mktemp("qbundle") / "b"
    r = CliRunner().invoke(app, ["quantize", "--format", "onnx", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--out", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    return out, r.output


@pytest.fixture(scope="module")
def bundle_if(stats_dir, tmp_path_factory) -> Path:
    """The same plan on the If-per-expert graph (--moe-dispatch if): the experts' nodes sit inside If branches."""
    out = tmp_path_factory.mktemp("qbundle-if") / "b"
    r = CliRunner().invoke(app, ["quantize", "--format", "onnx", "--stats", str(stats_dir), "--avg-bits", AVG_BITS, "--moe-dispatch", "if", "--no-verify", "--out", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    return out


def test_quantize_prints_the_plan_the_size_and_the_fidelity(bundle):
    output = " ".join(bundle[1].split())
    assert "layers.0.expert.3" in output and "router agree" in output
    assert "bits per weight" in output and "written against" in output and "(+0.00%)" in output
    assert "fidelity vs the fp32 PyTorch reference on 40 eval questions" in output and "token_agreement" in output
    # judged by the quantized-bundle bounds (KL, routing ≥ 97.5 %), not the fp32 bundle's 1e-4, and passing
    assert "kl_mean" in output and "≤ 0.005" in output and "≥ 97.5%" in output and "FAIL" not in output


def test_verify_judges_a_plan_bundle_by_the_quantized_tolerances_and_a_uniform_one_by_its_type(bundle):
    from medmoe_edge.verify import QUANTIZED_TOLERANCES, TOLERANCES, tolerances_for
    from medmoe_edge.vocab import ArtifactKind, Precision

    m = read_manifest(bundle[0])
    assert m.precision is Precision.FP32 and m.plan.quantizes_groups
    assert tolerances_for(m.format, m.precision, m.plan) is QUANTIZED_TOLERANCES[ArtifactKind.ONNX]
    assert tolerances_for(m.format, m.precision) is TOLERANCES[(ArtifactKind.ONNX, Precision.FP32)]
    # a uniform export's plan (its default is the file type) keeps the type's own bounds
    q4 = QuantPlan.uniform(Precision.Q4_K_M)
    assert not q4.quantizes_groups and tolerances_for(ArtifactKind.GGUF, Precision.Q4_K_M, q4) is TOLERANCES[(ArtifactKind.GGUF, Precision.Q4_K_M)]
    r = CliRunner().invoke(app, ["verify", str(bundle[0]), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["passed"] and report["tolerances"]["kl_mean_max"] == QUANTIZED_TOLERANCES[ArtifactKind.ONNX].kl_mean_max
    assert 0 < report["metrics"]["kl_mean"] <= report["tolerances"]["kl_mean_max"]


def test_manifest_carries_the_plan_per_tensor_id(bundle, stats_dir):
    out, _ = bundle
    m = read_manifest(out)
    stats = load_stats(stats_dir, _demo_dir(), "demo")
    assert m.plan.calibration == stats.key and not m.plan.is_uniform
    names = {g.name for g in m.tensor_groups}
    for rule in m.plan.rules:
        assert rule.spec.group_size == 32 and rule.spec.method is QuantMethod.GPTQ
        if rule.spec.base is not None:  # a projection coded as the delta from its meta expert's: named by its TensorId
            assert rule.pattern.rsplit(".", 1)[0] in names and rule.note["delta_from_meta"] is True
            assert rule.note["output_energy"]["delta"] < rule.note["output_energy"]["direct"]  # taken because it adds less error
            continue
        assert rule.pattern in names  # one rule per TensorId group, named by the TensorId itself
        note = rule.note
        assert note["calibration_set_sha256"] == stats.settings.set_sha256
        assert note["delta_kl"] >= 0 and 0 <= note["router_agreement"] <= 1 and note["bytes"] > 0
    assert {r.spec.precision.value for r in m.plan.rules} == {"int4", "int8"}
    for tid in ("layers.0.router", "layers.2.router", "vision", "embed"):
        assert m.plan.spec_for(tid).precision.is_float


@pytest.mark.parametrize("dispatch", ["scatter", "if"])
def test_types_read_back_from_the_graphs_equal_the_plan_and_the_size_its_prediction(dispatch, request):
    from medmoe_edge.export.onnx_quant import read_back

    out = request.getfixturevalue("bundle")[0] if dispatch == "scatter" else request.getfixturevalue("bundle_if")
    m = read_manifest(out)
    stored = read_back(out)
    planned = {r.pattern: r for r in m.plan.rules if r.spec.base is None}
    assert set(stored) == set(planned)
    deltas = [r for r in m.plan.rules if r.spec.base is not None]  # a delta-coded projection: its expert's type, its meta's base
    assert deltas and all(r.pattern.rsplit(".", 1)[0] in stored and r.spec.precision is planned[r.pattern.rsplit(".", 1)[0]].spec.precision for r in deltas)
    assert all(r.spec.base == f"layers.{r.pattern.split('.')[1]}.meta.fc1" for r in deltas)
    for name, (precision, block, nbytes) in stored.items():
        rule = planned[name]
        assert precision is rule.spec.precision and block == rule.spec.group_size, name
        assert abs(nbytes - rule.note["bytes"]) <= 0.03 * rule.note["bytes"], name
    written = sum(b for _, _, b in stored.values())
    predicted = sum(r.note["bytes"] for r in planned.values())
    assert abs(written - predicted) <= 0.03 * predicted
    if all(not r.spec.precision.is_float for r in m.plan.rules):  # no float unit in the plan: the manifest's total is the same sum
        assert m.extra["quantization"]["predicted_bytes"] >= predicted
    # the manifest's own read-back agrees: int types only where the plan puts them
    for g in m.tensor_groups:
        if not g.precision.is_float:
            assert m.plan.spec_for(g.name).precision is g.precision


def _demo_dir() -> Path:
    from medmoe_edge.checkpoint import resolve_model_dir

    return resolve_model_dir("demo")


@pytest.mark.parametrize("dispatch", ["scatter", "if"])
def test_onnx_runtime_at_level_0_equals_the_fake_quant_oracle_of_the_same_codes(dispatch, request, stats_dir, level0, tmp_path):
    import onnx
    import onnxruntime as ort

    out = request.getfixturevalue("bundle")[0] if dispatch == "scatter" else request.getfixturevalue("bundle_if")
    m = read_manifest(out)
    model_dir = _demo_dir()
    opts = RuntimeOptions(num_threads=1)
    oracle = api.load(model_dir, runtime="torch", options=opts)
    loaded = oracle.runtime.loaded
    stats = load_stats(stats_dir, model_dir, "demo")
    result = make_plan(loaded, stats, "onnx", method=QuantMethod.GPTQ, avg_bits=float(AVG_BITS), cache_dir=stats_dir, delta_from_meta=True)
    assert any(d.chosen for d in result.deltas)  # the demo's experts sit close to their meta expert: some are delta-coded
    # the same plan (sensitivities cached, codes deterministic), so these are the codes the bundle holds
    assert result.plan.to_json() == QuantPlan.from_json(m.plan.to_json()).to_json()
    fake_quantize(loaded, result.codes)
    bundle_rt = api.load(out, runtime="onnxruntime", options=opts)
    assert_equals_oracle(bundle_rt, oracle)
    # ONNX Runtime really fused DequantizeLinear → MatMul into MatMulNBits (one per planned matrix)
    from medmoe_edge.tensor_ids import _all_nodes

    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    dq = sum(n.op_type == "DequantizeLinear" for n in _all_nodes(graph))
    in_branches = dq - sum(n.op_type == "DequantizeLinear" for n in graph.node)
    assert in_branches == (2 * 4 * 2 if dispatch == "if" else 0)  # 2 MoE layers × 4 experts × fc1, fc2 inside their If
    so = level0()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in _all_nodes(onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph)]
    assert "DequantizeLinear" not in ops and dq > 0 and ops.count("MatMulNBits") == dq


def test_plan_show_prints_the_table_and_the_heatmap(bundle):
    out, _ = bundle
    r = CliRunner().invoke(app, ["plan", "show", str(out)], env=WIDE)
    assert r.exit_code == 0, r.output
    assert "quantization plan (onnx" in r.output and "layers.2.expert.1" in r.output and "gptq" in r.output
    assert "bits per layer and expert" in r.output and "expert.3" in r.output
    r = CliRunner().invoke(app, ["plan", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    groups = {g["tensor_id"]: g for g in d["groups"]}
    plan = read_manifest(out).plan
    for rule in plan.rules:
        if rule.spec.base is not None:  # shown on its expert's row
            assert groups[rule.pattern.rsplit(".", 1)[0]]["delta_from"] == {"fc1": rule.spec.base}
            continue
        g = groups[rule.pattern]
        assert g["precision"] == rule.spec.precision.value and g["block"] == 32 and g["delta_kl"] == rule.note["delta_kl"]
    assert groups["layers.0.router"]["precision"] == "fp32" and d["summary"]["backend"] == "onnx"
    assert "gptq, fc1 as Δ from meta" in CliRunner().invoke(app, ["plan", "show", str(out)], env=WIDE).output
    narrow = CliRunner().invoke(app, ["plan", "show", str(out)], env={"COLUMNS": "80"}).output
    assert "│ layers.0.expert.3 │" in narrow  # a TensorId is never cut, however narrow the terminal
    assert d["summary"]["delta_from_meta"]["coded_as_delta"] and d["summary"]["router_check"]["held"]


def test_plan_show_of_a_bundle_without_a_plan_is_one_line(bundle, tmp_path):
    out, _ = bundle
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    manifest = json.loads((plain / "manifest.json").read_text())
    assert manifest["plan"]["rules"]
    # plan show reads the manifest only; a uniform one is what `export` writes
    manifest["plan"] = QuantPlan.uniform(read_manifest(out).precision).to_json()
    (plain / "manifest.json").write_text(json.dumps(manifest))
    _rehash(plain)
    r = CliRunner().invoke(app, ["plan", "show", str(plain)], env=WIDE)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{plain} has no quantization plan: every weight group is fp32 (`medmoe-edge quantize` writes bundles with one)"


def _rehash(bundle: Path) -> None:
    """Rewrite manifest.sha256 after editing manifest.json (when the bundle keeps one)."""
    import hashlib

    sums = bundle / "manifest.sha256"
    if sums.is_file():
        digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        sums.write_text(sums.read_text().replace(sums.read_text().split()[0], digest, 1))


def test_plan_without_show_still_plans_a_device():
    r = CliRunner().invoke(app, ["plan", "--device", "cpu-x86", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chosen"]


def _changed_set_stats(stats_dir: Path, tmp: Path) -> Path:
    """A copy of the statistics whose recorded calibration set hash no longer matches the set."""
    other = tmp / "changed-stats"
    shutil.copytree(stats_dir, other)
    js = other / "stats.json"
    meta = json.loads(js.read_text())
    settings = CalibSettings(**{**meta["settings"], "domains": tuple(meta["settings"]["domains"]), "set_sha256": "0" * 64})
    meta["settings"], meta["key"] = asdict(settings), settings.key(meta["model_sha256"])
    js.write_text(json.dumps(meta))
    return other


@pytest.mark.parametrize(
    "case,message",
    [
        ("tensorrt-dispatch", "--moe-dispatch does not apply to --format tensorrt (it applies to --format onnx)"),
        ("tensorrt-block", "--block 256 is not a TensorRT int4 block: use one of 32, 64, 128"),
        ("unknown-format", "--format 'coreml' cannot be quantized: use --format onnx, gguf, tensorrt"),
        ("neither", "give exactly one of --budget-mb and --avg-bits"),
        ("both", "give exactly one of --budget-mb and --avg-bits"),
        ("negative", "--budget-mb must be positive"),
        ("method", "--method 'awq' is not a quantization method: use one of gptq, rtn, imatrix-rtn"),
        ("sensitivity", "--sensitivity 'fisher' is not a sensitivity mode: use measured or proxy"),
        ("too-small", "is below what the smallest types allow (2.845 MB, 5.12 bits per weight): raise --budget-mb to at least 2.846 or --avg-bits to at least 5.13, or write ONNX Runtime-only MatMulNBits with --ops matmulnbits"),
        ("non-empty", "already exists and is not empty: choose a new --out directory or remove it"),
        ("file", "is a file: choose a new --out directory"),
        ("other-model", "was computed from another model"),
        ("other-set", "was computed on calibration set 'calibration', not 'eval' (manifest SHA-256 differs): run medmoe-edge calibrate --set eval"),
        ("changed-set", "whose manifest has changed since (SHA-256 differs): run `medmoe-edge calibrate --model demo --set calibration --out NEW_STATS`"),
        ("no-stats", "holds no calibration statistics"),
        ("missing-stats", "nostats does not exist: make calibration statistics there with `medmoe-edge calibrate --model M --out"),
        ("dispatch", "--moe-dispatch 'nonzero' is not one of"),
        ("unknown-type", "--types 'q3_k' is not a type of --format onnx: use some of int4, int8, comma-separated (floating point is always allowed)"),
        ("empty-types", "--types is empty: list some of int4, int8"),
        ("delta-tensorrt", "--delta-from-meta is written for --format onnx only (tensorrt: its engines are not built with it yet): drop the flag or use --no-delta-from-meta"),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2_and_leaves_nothing(case, message, stats_dir, tiny_ckpts, tmp_path):
    out = tmp_path / "out"
    args = {"--format": "onnx", "--stats": str(stats_dir), "--avg-bits": AVG_BITS, "--out": str(out)}
    extra: list[str] = []
    if case == "tensorrt-dispatch":  # TensorRT builds the `if` dispatch; the flag is the ONNX bundle's
        args["--format"] = "tensorrt"
        extra = ["--moe-dispatch", "scatter"]
    elif case == "tensorrt-block":
        args["--format"] = "tensorrt"
        extra = ["--block", "256"]
    elif case == "delta-tensorrt":
        args["--format"] = "tensorrt"
        extra = ["--delta-from-meta"]
    elif case == "unknown-format":
        args["--format"] = "coreml"
    elif case == "neither":
        del args["--avg-bits"]
    elif case == "both":
        extra = ["--budget-mb", "3"]
    elif case == "negative":
        del args["--avg-bits"]
        extra = ["--budget-mb", "-1"]
    elif case == "method":
        extra = ["--method", "awq"]
    elif case == "sensitivity":
        extra = ["--sensitivity", "fisher"]
    elif case == "too-small":
        args["--avg-bits"] = "2"
    elif case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "file":
        out.write_text("a file")
    elif case == "other-model":
        extra = ["--model", str(tiny_ckpts[Preset.TINY_PHI])]
    elif case == "other-set":
        extra = ["--set", "eval"]
    elif case == "changed-set":
        args["--stats"] = str(_changed_set_stats(stats_dir, tmp_path))
    elif case == "no-stats":
        args["--stats"] = str(tmp_path)
    elif case == "missing-stats":
        args["--stats"] = str(tmp_path / "nostats")
    elif case == "dispatch":
        extra = ["--moe-dispatch", "nonzero"]
    elif case == "unknown-type":  # a GGUF type asked of an ONNX plan
        extra = ["--types", "int8,q3_k"]
    elif case == "empty-types":
        extra = ["--types", ","]
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(app, ["quantize", *(x for kv in args.items() for x in kv), *extra])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and r.output.strip().startswith("error:")
    assert len(r.output.strip().splitlines()) == 1
    assert message in " ".join(r.output.split()), r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output directory, nothing half-written
    if case == "non-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_budget_that_only_the_router_guard_breaks_names_the_guard(bundle, stats_dir):
    """Bytes alone fit, but every small type flips routes beyond the guard (an impossible 101 % here):
    the error says so instead of blaming the types."""
    from medmoe_edge.checkpoint import load_model
    from medmoe_edge.errors import InputError

    loaded = load_model(_demo_dir())
    stats = load_stats(stats_dir, _demo_dir(), "demo")
    with pytest.raises(InputError, match=r"below the smallest plan that keeps router agreement >= 101\.0% \(17\.766 MB, 32\.00 bits per weight; 18 groups flip routes at their smallest type, first projector\): raise --budget-mb to at least 17\.767"):
        make_plan(loaded, stats, "onnx", avg_bits=float(AVG_BITS), router_guard=1.01, cache_dir=stats_dir)
