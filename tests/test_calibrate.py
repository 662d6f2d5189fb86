"""`medmoe-edge calibrate`: per-expert statistics over exactly the routed tokens, the cache, the errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medmoe_edge.calib_stats import MIN_TOKENS_PER_INPUT, CalibStats
from medmoe_edge.cli.app import app
from medmoe_edge.errors import InputError
from medmoe_edge.quantization import calibrate

EXPERT = "model.layers.{l}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.weight"
META = "model.layers.{l}.mlp.meta_moe.{p}.weight"


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "stats"
    stats, cached = calibrate("demo", out, per_domain=1, sensitivity_per_domain=1)
    assert not cached
    return out, stats


def test_expert_hessians_partition_the_meta_experts_tokens(stats_dir):
    """fc1 of every routed expert reads the same x as the meta expert, on its own routed tokens only:
    the experts' token counts add up to the meta expert's, and their Hessians (before the few-token
    blend, which adds meta·(n_min − n)/n_meta) add up to the meta Hessian."""
    _, s = stats_dir
    for layer in s.moe_layers:
        meta = META.format(l=layer, p="fc1")
        keys = [EXPERT.format(l=layer, e=e, p="fc1") for e in range(4)]
        assert sum(s.tokens[k] for k in keys) == s.tokens[meta]
        li = s.moe_layers.index(layer)
        assert int(s.routed[li].sum()) == s.tokens[meta]  # every spliced position routed once (top-1)
        n_min = MIN_TOKENS_PER_INPUT * 256
        extra = sum(max(n_min - s.tokens[k], 0) for k in keys) / s.tokens[meta]
        total = sum(s.hessians[k].double() for k in keys)
        expected = s.hessians[meta].double() * (1 + extra)
        assert torch.allclose(total, expected, rtol=1e-4, atol=1e-3 * float(expected.abs().max()))


def test_few_token_experts_are_reported_with_their_action(stats_dir):
    _, s = stats_dir
    # 4 questions: every expert is far below n_min = 4·d_in tokens
    keys = {f.key for f in s.fallbacks}
    assert EXPERT.format(l=0, e=0, p="fc1") in keys and EXPERT.format(l=2, e=3, p="fc2") in keys
    for f in s.fallbacks:
        assert f.tokens < f.n_min
        assert (f.min_bits == 4) == (f.tokens < f.n_min // 4)
        assert s.min_bits(f.key) == f.min_bits
    assert s.min_bits(META.format(l=0, p="fc1")) is None


def test_matrices_that_read_one_input_share_one_hessian_on_disk_too(stats_dir):
    """q/k/v read the same LayerNorm output: one accumulated Hessian, one tensor, written once."""
    out, s = stats_dir
    q, k, v = (f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj"))
    assert s.hessians[k] is s.hessians[q] and s.hessians[v] is s.hessians[q] and s.tokens[k] == s.tokens[q]
    from safetensors import safe_open

    with safe_open(str(out / "stats-hessians-000.safetensors"), "pt") as f:
        names = set(f.keys())
    assert f"hessian/{q}" in names and f"hessian/{k}" not in names
    back = CalibStats.load(out)
    assert back.hessians[k] is back.hessians[q] and torch.equal(back.hessians[q], s.hessians[q])
    assert back.hessians.keys() == s.hessians.keys()


def test_imatrix_is_the_mean_square_input(stats_dir):
    _, s = stats_dir
    k = META.format(l=2, p="fc2")
    assert torch.allclose(s.imatrix(k), torch.diag(s.hessians[k]) / s.tokens[k])
    assert s.imatrix(k).shape == (512,)


def test_stats_round_trip_and_cache(stats_dir):
    out, s = stats_dir
    assert sorted(p.name for p in out.iterdir()) == ["stats-hessians-000.safetensors", "stats.json", "stats.safetensors"]
    loaded = CalibStats.load(out)
    assert loaded.key == s.key and loaded.tokens == s.tokens
    assert len(loaded.sequences) == 4 and loaded.sequences[0]["pixel_values"].shape == (1, 3, 64, 64)
    again, cached = calibrate("demo", out, per_domain=1, sensitivity_per_domain=1)
    assert cached and again.key == s.key


def test_other_settings_into_the_same_directory_are_refused(stats_dir):
    out, _ = stats_dir
    with pytest.raises(InputError, match="holds calibration statistics of another model, set, settings or medmoe-edge version: choose a new --out"):
        calibrate("demo", out, per_domain=2)


def test_stats_of_another_model_or_set_are_refused(stats_dir):
    out, s = stats_dir
    with pytest.raises(InputError, match=r"computed from another model .* run `medmoe-edge calibrate --model other"):
        s.check_model("0" * 64, "other", out)
    with pytest.raises(InputError, match="computed on calibration set 'calibration', not 'mine.jsonl'"):
        s.check_set("0" * 64, "mine.jsonl", out)


def test_an_edited_stats_file_is_refused(stats_dir, tmp_path):
    out, _ = stats_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    meta = json.loads((bad / "stats.json").read_text())
    meta["settings"]["domains"] = ["ct"]
    (bad / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="do not match their own cache key"):
        CalibStats.load(bad)
    with pytest.raises(InputError, match="holds no calibration statistics"):
        CalibStats.load(tmp_path)


def test_cli_bad_domain_is_one_line_and_writes_nothing(tmp_path):
    r = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "s"), "--domains", "ct,brain", "--per-domain", "1"])
    assert r.exit_code == 2
    assert "--domains 'brain' is not a domain of this set: use some of ct, mri, xray, pathology" in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_hessians_that_do_not_fit_are_collected_in_passes_with_the_same_result(stats_dir, tmp_path):
    """A model whose Hessians exceed the memory (a full-size Phi-2's are 44.5 GB) is collected a few
    layers per pass, each pass resuming from the hidden states the last one stopped at: the
    statistics are the same bit for bit, under the same cache key, and read back lazily."""
    from medmoe_edge.calib_stats import HessianStore
    from medmoe_edge.calibration.collect import hessian_bytes
    from medmoe_edge.checkpoint import load_model, resolve_model_dir

    one_dir, one = stats_dir
    need = hessian_bytes(load_model(resolve_model_dir("demo")))
    split, cached = calibrate("demo", tmp_path / "s", per_domain=1, sensitivity_per_domain=1, hessian_memory=need * 9 // 20)
    assert not cached and split.passes == 4 and one.passes == 1
    assert sorted(p.name for p in (tmp_path / "s").glob("stats-hessians-*")) == [f"stats-hessians-{i:03d}.safetensors" for i in range(split.passes)]
    assert split.key == one.key and split.tokens == one.tokens and split.fallbacks == one.fallbacks
    assert torch.equal(split.routed, one.routed) and torch.equal(split.margins, one.margins)
    assert split.hessians.keys() == one.hessians.keys()
    for k in one.hessians:
        assert torch.equal(split.hessians[k], one.hessians[k]), k
    assert isinstance(split.hessians, HessianStore) and split.hessians.resident() <= split.hessians.keep  # never all of them in memory
    fresh = CalibStats.load(tmp_path / "s").hessians
    assert all(k in fresh for k in one.hessians) and "lm_head.bias" not in fresh and fresh.resident() == 0  # asking costs no read


def test_a_layer_that_does_not_fit_alone_is_refused_before_the_pass(tmp_path):
    r = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "s"), "--per-domain", "1", "--hessian-memory", "0.001"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert "one layer's input Hessians (6.8 MiB) and the hidden states carried between passes (0.4 MiB) need more than the 1.0 MiB calibrate may hold: close other programs" in lines[0]
    assert "raise --hessian-memory" in lines[0] and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()
    r = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "s"), "--hessian-memory", "0"])
    assert r.exit_code == 2 and "--hessian-memory must be a positive, finite number of GiB, got 0" in r.output and not (tmp_path / "s").exists()


def test_the_free_memory_decides_the_passes_and_calibrate_says_so(tmp_path, monkeypatch):
    """Without --hessian-memory the free memory less the model's weights (less headroom) is the cap:
    read from /proc/meminfo and the cgroup, here made small enough for two passes."""
    import medmoe_edge.diagnostics as diagnostics
    from medmoe_edge.calibration.collect import hessian_bytes
    from medmoe_edge.checkpoint import load_model, resolve_model_dir
    from medmoe_edge.quantization import HESSIAN_HEADROOM, weight_bytes

    loaded = load_model(resolve_model_dir("demo"))
    need, weights = hessian_bytes(loaded), weight_bytes(loaded)
    free = diagnostics.available_memory()
    assert free is not None and weights + need * HESSIAN_HEADROOM < free  # this machine's: one pass
    # the weights count against the free memory (mapped from their file, they are not resident yet)
    monkeypatch.setattr(diagnostics, "available_memory", lambda: weights + int(need * 0.6 * HESSIAN_HEADROOM))
    r = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "s"), "--per-domain", "1"])
    assert r.exit_code == 0, r.output
    assert "the Hessians did not fit in memory at once: collected in 2 passes over consecutive layers (same statistics as one pass)" in " ".join(r.output.split())


def test_weights_that_take_all_the_free_memory_are_refused_in_one_line(tmp_path, monkeypatch):
    import medmoe_edge.diagnostics as diagnostics

    monkeypatch.setattr(diagnostics, "available_memory", lambda: 1000)
    r = CliRunner().invoke(app, ["calibrate", "--out", str(tmp_path / "s"), "--per-domain", "1"])
    assert r.exit_code != 0 and "Traceback" not in r.output and not (tmp_path / "s").exists()
    assert "take all of the 0.0 GiB of free memory, leaving none for the calibration statistics: close other programs" in " ".join(r.output.split())


def test_a_missing_or_misnamed_hessian_file_is_refused(stats_dir, tmp_path):
    out, _ = stats_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in out.iterdir():
        if not p.name.startswith("stats-hessians-"):
            (bad / p.name).write_bytes(p.read_bytes())
    with pytest.raises(InputError, match=r"calibration statistics in .* are corrupt .*stats-hessians-000.safetensors.*: run medmoe-edge calibrate again"):
        CalibStats.load(bad)
    # an index edited to point outside the directory is refused before any file is opened
    for p in out.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    meta = json.loads((bad / "stats.json").read_text())
    meta["hessians"] = {k: ["../../elsewhere.safetensors", n] for k, (_f, n) in meta["hessians"].items()}
    (bad / "stats.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"are corrupt \(ValueError: '../../elsewhere.safetensors' is not a Hessian file name\)"):
        CalibStats.load(bad)


def test_per_domain_statistics_cut_the_other_domains_held_out_error(tmp_path):
    """What calibrating on every domain buys GPTQ, measured where it acts: each matrix's output error
    tr(ΔW H ΔWᵀ) on held-out eval questions of a domain, int3 GPTQ codes from per-domain statistics
    against codes from CT-only statistics with as many questions in all. Per-domain codes must cut
    the error of MRI, X-ray and pathology by ≥ 15 % (geometric mean over the matrices the domain's
    questions reach; measured 1.22x, 1.48x, 2.51x), and CT-only codes must win on CT itself (0.68x):
    the statistics, not chance, decide. End-to-end KL, on the whole eval split with its spread, is
    `benchmarks/calibration_domains.py`."""
    import math

    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calibration.sensitivity import CodeBook, output_energy, units_for
    from medmoe_edge.checkpoint import load_model, resolve_model_dir
    from medmoe_edge.quant_plan import QuantMethod

    per_domain = calibrate("demo", tmp_path / "pd", per_domain=16, sensitivity_per_domain=1)[0]
    ct_only = calibrate("demo", tmp_path / "ct", per_domain=64, domains=["ct"], sensitivity_per_domain=1)[0]
    loaded = load_model(resolve_model_dir("demo"))
    state = loaded.model.lm.state_dict()
    keys = [k for u in units_for(loaded, BACKENDS["torch"]) for k in u.keys if k in per_domain.hessians]
    books = CodeBook(per_domain, QuantMethod.GPTQ, 32), CodeBook(ct_only, QuantMethod.GPTQ, 32)
    gain = {}
    for d in ("ct", "mri", "xray", "pathology"):
        held_out = calibrate("demo", tmp_path / f"eval-{d}", set_name="eval", domains=[d], per_domain=16, sensitivity_per_domain=1)[0]
        reached = [k for k in keys if held_out.tokens.get(k, 0) > 0]
        assert len(reached) >= 30, d  # attention, dense FFNs, projector, lm_head and the routed experts it reaches
        err = [[output_energy(held_out, k, state[k], b.get(k, state[k], 3).dequantize()) for b in books] for k in reached]
        gain[d] = math.exp(sum(math.log(ct / pd) for pd, ct in err) / len(err))
    assert gain["ct"] < 1.0, gain
    assert min(gain["mri"], gain["xray"], gain["pathology"]) >= 1.15, gain
