"""`medmoe-edge doctor`: this machine's findings, every runtime with availability and reason, fixes for gaps."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medmoe_edge import diagnostics
from medmoe_edge.cli.app import app
from medmoe_edge.runtimes import Availability, discover, register, unregister
from medmoe_edge.runtimes.torch_runtime import TorchRuntime


class _NeedsGpu(TorchRuntime):
    name = "doctor-needs-gpu"
    description = "test plugin that cannot run here"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, "no CUDA device")


@pytest.fixture(scope="module")
def report():
    r = CliRunner().invoke(app, ["doctor", "--json", "--no-bandwidth"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_doctor_json_lists_every_runtime_with_availability_and_reason(report):
    names = {r["name"] for r in report["runtimes"]}
    assert names == set(discover()) and {"torch", "onnxruntime", "llamacpp"} <= names
    for rt in report["runtimes"]:
        assert isinstance(rt["available"], bool) and rt["reason"], rt
        assert (rt["fix"] is None) == rt["available"], rt
    torch = next(r for r in report["runtimes"] if r["name"] == "torch")
    assert torch["available"] and "torch" in torch["reason"]
    checks = {c["name"]: c for c in report["checks"]}
    assert all(f"runtime {n}" in checks for n in names)
    assert all(c["fix"] for c in report["gaps"])


def test_doctor_json_describes_the_machine(report):
    assert report["platform"]["machine"] and report["platform"]["python"]
    assert report["cpu"]["usable_cpus"] >= 1 and report["cpu"]["isa"]
    assert report["memory"]["total_gib"] > 0 and report["memory"]["copy_bandwidth_gbs"] is None  # --no-bandwidth
    assert "torch" in report["gpu"] and isinstance(report["gpu"]["gpus"], list)
    assert {t["module"] for t in report["tensorrt"]} == {"tensorrt", "tensorrt_rtx_bindings"}
    cpu = [p for p in report["onnxruntime_providers"] if p["provider"] == "CPUExecutionProvider"]
    ort_ok = next(r for r in report["runtimes"] if r["name"] == "onnxruntime")["available"]
    if ort_ok:
        assert cpu and cpu[0]["built"] and cpu[0]["initialises"], cpu  # a real session, not the provider list
    if not report["gpu"]["gpus"] and report["jetson"] is None:
        assert all(p["initialises"] is False for p in report["onnxruntime_providers"] if p["provider"] != "CPUExecutionProvider")


def test_an_unavailable_runtime_is_listed_with_its_reason_and_a_fix():
    register(_NeedsGpu)
    try:
        r = CliRunner().invoke(app, ["doctor", "--json", "--no-bandwidth"])
    finally:
        unregister(_NeedsGpu.name)
    d = json.loads(r.stdout)
    row = next(x for x in d["runtimes"] if x["name"] == _NeedsGpu.name)
    assert row["available"] is False and row["reason"] == "no CUDA device" and row["fix"]
    assert any(g["name"] == f"runtime {_NeedsGpu.name}" for g in d["gaps"])


def test_fix_commands_follow_the_platform():
    assert diagnostics.runtime_fix("llamacpp", has_gpu=False, jetson=False) == "bash scripts/build_llamacpp.sh cpu"
    assert diagnostics.runtime_fix("llamacpp", has_gpu=True, jetson=False) == "bash scripts/build_llamacpp.sh cuda"
    assert diagnostics.runtime_fix("llamacpp", has_gpu=True, jetson=True) == "bash scripts/build_llamacpp.sh jetson"
    assert diagnostics.runtime_fix("onnxruntime", has_gpu=True, jetson=False) == "pip install 'medmoe-edge[gpu]'"
    assert diagnostics.runtime_fix("onnxruntime", has_gpu=False, jetson=False) == "pip install 'medmoe-edge[onnx]'"


@pytest.mark.parametrize(
    "text,l4t,jetpack",
    [
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025", "36.4.3", "6.2"),
        ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64", "36.4.0", "6.1"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64", "35.4.1", "5.1.2"),
        ("garbage", None, None),
    ],
)
def test_l4t_release_maps_to_jetpack(text, l4t, jetpack):
    assert diagnostics.parse_tegra_release(text) == {"l4t": l4t, "jetpack": jetpack}


def test_a_jetson_is_recognised_from_its_release_file_device_tree_and_power_mode(monkeypatch):
    files = {
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
        "/proc/device-tree/model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00",
    }
    real_read, real_run = diagnostics._read, diagnostics._run
    monkeypatch.setattr(diagnostics, "_read", lambda p: files[p] if p in files else None if p.startswith(("/etc/nv", "/proc/device-tree")) else real_read(p))
    monkeypatch.setattr(diagnostics, "_run", lambda cmd, timeout=5.0: "NV Power Mode: MAXN_SUPER\n2\n" if cmd[0] == "nvpmodel" else real_run(cmd, timeout))
    j = diagnostics.probe_jetson()
    assert j == {"model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "l4t": "36.4.3", "jetpack": "6.2", "power_mode": "MAXN_SUPER"}
    r = diagnostics.diagnose(bandwidth=False)
    assert r.jetson == j and r.profile == "orin-nano-super"
    checks = {c.name: c for c in r.checks}
    assert "JetPack 6.2" in checks["Jetson"].detail and "MAXN_SUPER" in checks["Jetson"].detail
    # on a Jetson the llama.cpp fix is the Jetson build, and a CPU-only torch is a gap
    assert checks["torch CUDA"].ok is False and checks["torch CUDA"].fix
    for rt in r.runtimes:
        if rt["name"] == "llamacpp" and not rt["available"]:
            assert rt["fix"] == "bash scripts/build_llamacpp.sh jetson"


def test_no_jetson_here_without_its_files(monkeypatch):
    monkeypatch.setattr(diagnostics, "_read", lambda p: None)
    assert diagnostics.probe_jetson() is None


def test_bandwidth_probe_measures_something():
    bw = diagnostics.measure_copy_bandwidth(mib=16, repeats=2)
    assert bw is not None and bw > 0.1


def test_doctor_table_runs():
    r = CliRunner().invoke(app, ["doctor", "--no-bandwidth"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for word in ("medmoe-edge doctor", "runtime torch", "runtime llamacpp", "runtime onnxruntime", "ORT CPU", "TensorRT-RTX", "device profile"):
        assert word in r.output
