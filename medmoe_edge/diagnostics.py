"""`medmoe-edge doctor`: what this machine is and which runtimes can run here, with the fix for each gap.

Probes, each cheap and none fatal: platform and CPU (ISA extensions from /proc/cpuinfo), memory
(/proc/meminfo, the cgroup limit) and a measured copy bandwidth (numpy, 512 MiB, under a second or
two), NVIDIA GPU, driver, CUDA and cuDNN (nvidia-smi, torch), Jetson model, L4T/JetPack release and
power mode (/etc/nv_tegra_release, the device tree, nvpmodel), every runtime plugin's availability
and reason (the runtime registry), the ONNX Runtime execution providers that really initialise (a
one-node session each), TensorRT / TensorRT-RTX, and llama.cpp (patched? GPU offload?).

Nothing personal or secret is read or reported: no environment variables, host or user names,
or files outside the system descriptions above.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .devices import match_profile
from .runtimes.registry import discover

# x86 and Arm extensions that decide which kernels llama.cpp, ONNX Runtime and torch can use
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2")

# L4T release → JetPack (NVIDIA's JetPack archive)
JETPACK_OF_L4T = {
    "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4": "6.1", "36.3": "6.0", "36.2": "6.0 DP",
    "35.6": "5.1.4", "35.5": "5.1.3", "35.4.1": "5.1.2", "35.3.1": "5.1.1", "35.2.1": "5.1", "35.1": "5.0.2",
    "32.7": "4.6.x",
}

ORT_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider")


@dataclass
class Check:
    """One thing doctor looked at: ok True/False, or None where it does not apply here."""

    name: str
    ok: bool | None
    detail: str
    fix: str | None = None


@dataclass
class Report:
    platform: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    gpu: dict = field(default_factory=dict)
    jetson: dict | None = None
    runtimes: list[dict] = field(default_factory=list)
    onnxruntime_providers: list[dict] = field(default_factory=list)
    tensorrt: list[dict] = field(default_factory=list)
    llamacpp: dict = field(default_factory=dict)
    profile: str | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def gaps(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def to_json(self) -> dict:
        d = asdict(self)
        d["gaps"] = [asdict(c) for c in self.gaps]
        return d


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


# --- platform, CPU, memory ------------------------------------------------------------------------


def probe_platform() -> dict:
    os_release = _read("/etc/os-release") or ""
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', os_release, re.M)
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "os": pretty.group(1) if pretty else platform.platform(),
        "python": sys.version.split()[0],
    }


def probe_cpu() -> dict:
    info = _read("/proc/cpuinfo") or ""
    model = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.+)$", info, re.M)
    flags_line = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    wanted = ARM_FLAGS if platform.machine() in ("aarch64", "arm64") else X86_FLAGS
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "model": model.group(1).strip() if model else platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "isa": {f: f in flags for f in wanted},
    }


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        text = (_read(path) or "").strip()
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _meminfo() -> dict[str, int]:
    """/proc/meminfo's fields in KiB (empty where it cannot be read)."""
    info = _read("/proc/meminfo") or ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", info, re.M)}


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by what the cgroup limit leaves
    (memory.max − memory.current); None where neither can be read."""
    avail = _meminfo().get("MemAvailable", 0) * 1024 or None
    lim, used = _cgroup_limit(), (_read("/sys/fs/cgroup/memory.current") or "").strip()
    if lim is not None and used.isdigit():
        avail = min(avail, lim - int(used)) if avail is not None else lim - int(used)
    return avail


# a model "fits" when its weights times this fit in the free memory: activations and buffers on top
FIT_HEADROOM = 1.25


def fits_in_memory(nbytes: int) -> bool | None:
    """Whether `nbytes` of weights, with `FIT_HEADROOM`, fit in `available_memory()`; None where the
    free memory cannot be read (each caller decides what an unknown means)."""
    free = available_memory()
    return None if free is None else free > FIT_HEADROOM * nbytes


def measure_copy_bandwidth(mib: int = 512, repeats: int = 3) -> float | None:
    """GB/s of numpy copying `mib` MiB (read + write counted), best of `repeats` after a warm-up."""
    try:
        import numpy as np
    except ImportError:
        return None
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # page in both
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def probe_memory(bandwidth: bool = True) -> dict:
    kib = _meminfo()
    total = kib.get("MemTotal", 0) * 1024 or None
    avail = kib.get("MemAvailable", 0) * 1024 or None
    mib = 512 if (avail or 0) > 4 * 2**30 else 128
    bw = measure_copy_bandwidth(mib) if bandwidth else None
    return {
        "total_gib": round(total / 2**30, 2) if total else None,
        "available_gib": round(avail / 2**30, 2) if avail else None,
        "cgroup_limit_gib": round(lim / 2**30, 2) if (lim := _cgroup_limit()) else None,
        "copy_bandwidth_gbs": round(bw, 1) if bw else None,
        "bandwidth_method": f"numpy copy of {mib} MiB, one thread, read + write bytes, best of 3" if bandwidth else "skipped (--no-bandwidth)",
    }


# --- GPU, Jetson ------------------------------------------------------------------------------------


def probe_gpu() -> dict:
    gpus = []
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader,nounits"])
    for line in (smi or "").strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            gpus.append({"name": parts[0], "driver": parts[1], "memory_mib": parts[2], "compute_capability": parts[3]})
    d: dict = {"nvidia_smi": shutil.which("nvidia-smi") is not None, "gpus": gpus}
    try:
        import torch

        d["torch"] = torch.__version__
        d["torch_cuda_build"] = torch.version.cuda
        d["cuda_available"] = bool(torch.cuda.is_available())
        if d["cuda_available"]:
            d["torch_devices"] = [{"name": torch.cuda.get_device_name(i), "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i)))} for i in range(torch.cuda.device_count())]
        d["cudnn"] = torch.backends.cudnn.version() if torch.version.cuda else None
    except Exception as e:  # noqa: BLE001 - a broken torch is a finding, not a crash
        d["torch_error"] = f"{type(e).__name__}: {e}"
    return d


def parse_tegra_release(text: str) -> dict:
    """'# R36 (release), REVISION: 4.3, ...' → {'l4t': '36.4.3', 'jetpack': '6.2'}."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    if not m:
        return {"l4t": None, "jetpack": None}
    l4t = f"{m.group(1)}.{m.group(2)}"
    jp = next((JETPACK_OF_L4T[k] for k in sorted(JETPACK_OF_L4T, key=len, reverse=True) if l4t == k or l4t.startswith(k + ".")), None)
    return {"l4t": l4t, "jetpack": jp}


def board_model() -> str | None:
    text = _read("/proc/device-tree/model")
    return text.strip("\x00\n ") if text else None


def probe_jetson() -> dict | None:
    release = _read("/etc/nv_tegra_release")
    model = board_model()
    if release is None and not (model and "jetson" in model.lower()):
        return None
    d = {"model": model, **parse_tegra_release(release or "")}
    q = _run(["nvpmodel", "-q"])
    mode = re.search(r"NV Power Mode:\s*(.+)", q or "")
    d["power_mode"] = mode.group(1).strip() if mode else None
    return d


# --- runtimes --------------------------------------------------------------------------------------


def _llamacpp_target(has_gpu: bool, jetson: bool) -> str:
    return "jetson" if jetson else "cuda" if has_gpu else "cpu"


def runtime_fix(name: str, *, has_gpu: bool, jetson: bool) -> str:
    """The command that makes runtime `name` available here."""
    if name == "torch":
        if jetson:
            return "pip install torch from NVIDIA's PyTorch-for-JetPack wheel (developer.nvidia.com/embedded/downloads), then pip install -e ."
        return "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" if has_gpu else "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    if name == "onnxruntime":
        return "pip install 'medmoe-edge[gpu]'" if has_gpu else "pip install 'medmoe-edge[onnx]'"
    if name == "llamacpp":
        return f"bash scripts/build_llamacpp.sh {_llamacpp_target(has_gpu, jetson)}"
    return f"reinstall the package that provides the {name!r} runtime plugin (pip install ...)"


def probe_runtimes(*, has_gpu: bool, jetson: bool) -> list[dict]:
    rows = []
    for name, entry in discover().items():
        av = entry.availability()
        rows.append({"name": name, "available": av.available, "reason": av.reason, "plugin": entry.target, "fix": None if av.available else runtime_fix(name, has_gpu=has_gpu, jetson=jetson)})
    return rows


def _tiny_onnx() -> bytes | None:
    """A one-node (Identity) ONNX model, or None without the onnx package."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "doctor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def probe_onnxruntime_providers(*, has_gpu: bool, jetson: bool) -> list[dict]:
    """Each provider of interest: built into the installed ONNX Runtime, and whether a session with it
    really initialises (ORT silently falls back to CPU when CUDA or TensorRT libraries are missing)."""
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001
        return [{"provider": p, "built": False, "initialises": False, "detail": f"onnxruntime not importable ({type(e).__name__})"} for p in ORT_PROVIDERS[:3]]
    built = ort.get_available_providers()
    model = _tiny_onnx()
    ort.set_default_logger_severity(4)
    rows = []
    for p in ORT_PROVIDERS:
        if p not in built and p == "NvTensorRTRTXExecutionProvider":
            continue
        row = {"provider": p, "built": p in built, "initialises": False, "detail": ""}
        if p not in built:
            row["detail"] = f"not in this onnxruntime {ort.__version__} build"
        elif model is None:
            row["detail"] = "not probed: the onnx package is missing"
        else:
            so = ort.SessionOptions()
            so.log_severity_level = 4
            try:
                sess = ort.InferenceSession(model, so, providers=[p] if p == "CPUExecutionProvider" else [p, "CPUExecutionProvider"])
                active = sess.get_providers()
                row["initialises"] = active[0] == p
                row["detail"] = "session created" if row["initialises"] else f"fell back to {active[0]}"
            except Exception as e:  # noqa: BLE001 - missing CUDA/TensorRT libraries surface here
                row["detail"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def _import_version(module: str) -> tuple[bool, str]:
    if importlib.util.find_spec(module) is None:
        return False, "not installed"
    try:
        mod = __import__(module)
    except Exception as e:  # noqa: BLE001 - a wheel whose libraries fail to load
        return False, f"installed but fails to import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return True, str(getattr(mod, "__version__", "?"))


def probe_tensorrt() -> list[dict]:
    rows = []
    for name, module in (("TensorRT", "tensorrt"), ("TensorRT-RTX", "tensorrt_rtx_bindings")):
        ok, detail = _import_version(module)
        rows.append({"name": name, "module": module, "importable": ok, "version": detail if ok else None, "detail": detail})
    return rows


def probe_llamacpp() -> dict:
    ok, detail = _import_version("llama_cpp")
    d: dict = {"importable": ok, "version": detail if ok else None, "detail": detail, "gpu_offload": None}
    if ok:
        try:
            import llama_cpp

            d["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception as e:  # noqa: BLE001
            d["detail"] = f"{detail}; GPU offload unknown ({type(e).__name__})"
    return d


# --- the report -----------------------------------------------------------------------------------


def diagnose(*, bandwidth: bool = True) -> Report:
    """Probe this machine (a few seconds; `bandwidth=False` skips the memory copy)."""
    r = Report(platform=probe_platform(), cpu=probe_cpu(), memory=probe_memory(bandwidth), gpu=probe_gpu(), jetson=probe_jetson())
    jetson = r.jetson is not None
    gpu_names = [g["name"] for g in r.gpu.get("gpus", [])] + [g["name"] for g in r.gpu.get("torch_devices", [])]
    has_gpu = bool(gpu_names) or jetson
    r.runtimes = probe_runtimes(has_gpu=has_gpu, jetson=jetson)
    r.onnxruntime_providers = probe_onnxruntime_providers(has_gpu=has_gpu, jetson=jetson)
    r.tensorrt = probe_tensorrt()
    r.llamacpp = probe_llamacpp()
    r.profile = match_profile(
        jetson_model=(r.jetson or {}).get("model"), gpu_name=gpu_names[0] if gpu_names else None, board_model=board_model(), machine=r.platform["machine"], memory_gib=r.memory.get("total_gib")
    )
    r.checks = _checks(r, has_gpu=has_gpu, jetson=jetson)
    return r


def _checks(r: Report, *, has_gpu: bool, jetson: bool) -> list[Check]:
    c: list[Check] = []
    isa = r.cpu["isa"]
    if r.platform["machine"] in ("x86_64", "AMD64"):
        base = all(isa.get(f) for f in ("avx2", "fma", "f16c"))
        c.append(Check("CPU ISA", base, "AVX2/FMA/F16C present: the portable llama.cpp build runs" if base else "no AVX2/FMA/F16C: the default llama.cpp build needs them", None if base else "bash scripts/build_llamacpp.sh native"))
    elif r.platform["machine"] in ("aarch64", "arm64"):
        dot = bool(isa.get("asimddp"))
        c.append(Check("CPU ISA", dot, "NEON dot product present (llama.cpp's fast quantised kernels)" if dot else "no NEON dot product: quantised kernels run slower", None))
    bw = r.memory.get("copy_bandwidth_gbs")
    c.append(Check("memory", True, f"{r.memory.get('total_gib')} GiB total, {r.memory.get('available_gib')} GiB available" + (f", copy bandwidth {bw} GB/s" if bw else "")))
    g = r.gpu
    if has_gpu:
        cuda = bool(g.get("cuda_available"))
        c.append(Check("torch CUDA", cuda, f"torch {g.get('torch')} CUDA {g.get('torch_cuda_build')} cuDNN {g.get('cudnn')}" if cuda else f"torch {g.get('torch')} cannot use the GPU (build: {g.get('torch_cuda_build') or 'CPU only'})", None if cuda else runtime_fix("torch", has_gpu=True, jetson=jetson)))
    else:
        c.append(Check("GPU", None, f"no NVIDIA GPU found (nvidia-smi {'present' if g.get('nvidia_smi') else 'absent'}, torch {g.get('torch')} {'CUDA ' + str(g.get('torch_cuda_build')) if g.get('torch_cuda_build') else 'CPU build'}): CPU runtimes only"))
    if r.jetson is not None:
        j = r.jetson
        c.append(Check("Jetson", True, f"{j.get('model')}, L4T {j.get('l4t')} (JetPack {j.get('jetpack') or '?'}), power mode {j.get('power_mode') or 'unknown'}"))
        if j.get("power_mode") is None:
            c[-1].fix = "sudo nvpmodel -q  (and `sudo nvpmodel -m 0` for the maximum mode; `sudo jetson_clocks` to pin clocks)"
    for rt in r.runtimes:
        c.append(Check(f"runtime {rt['name']}", rt["available"], rt["reason"], rt["fix"]))
    for p in r.onnxruntime_providers:
        name = p["provider"].removesuffix("ExecutionProvider").replace("Tensorrt", "TensorRT")
        if name == "CPU":
            c.append(Check(f"ORT {name}", p["initialises"], p["detail"], None if p["initialises"] else runtime_fix("onnxruntime", has_gpu=has_gpu, jetson=jetson)))
        elif not has_gpu:
            c.append(Check(f"ORT {name}", None, f"{p['detail'] or 'built'}; no NVIDIA GPU here"))
        else:
            fix = None
            if not p["initialises"]:
                fix = (
                    "install onnxruntime-gpu from NVIDIA's Jetson wheels (jetson-ai-lab pypi index for your JetPack)"
                    if jetson
                    else "pip uninstall -y onnxruntime && pip install 'medmoe-edge[gpu]'" if not p["built"] else "install the CUDA 12 / cuDNN 9 (and TensorRT) libraries this onnxruntime-gpu links against"
                )
            c.append(Check(f"ORT {name}", p["initialises"], p["detail"], fix))
    for t in r.tensorrt:
        importable = t["importable"]
        if t["name"] == "TensorRT":  # standard TensorRT: JetPack's on Jetson; onnxruntime's TensorRT provider elsewhere
            ok = importable if jetson else (True if importable else None)
            fix = "TensorRT ships with JetPack: sudo apt install nvidia-tensorrt python3-libnvinfer" if jetson else "pip install tensorrt-cu12" if has_gpu else None
        else:  # TensorRT-RTX: RTX GPUs (SM75-SM89, SM120); builds engines ahead of time even without a GPU
            ok = True if importable else (False if has_gpu and not jetson else None)
            fix = None if jetson else "pip install tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings"
        why = "" if importable else "; optional (`export --format tensorrt` builds engines with it)"
        if t["name"] == "TensorRT-RTX" and jetson:
            why = "; not for Jetson (SM87): use JetPack's TensorRT"
        c.append(Check(t["name"], ok, f"{t['module']}: {t['detail']}{why}", None if importable else fix))
    lc = r.llamacpp
    if lc["importable"] and has_gpu and lc["gpu_offload"] is False:
        c.append(Check("llama.cpp GPU offload", False, f"llama-cpp-python {lc['version']} is a CPU-only build on a machine with an NVIDIA GPU", f"bash scripts/build_llamacpp.sh {_llamacpp_target(True, jetson)}"))
    elif lc["importable"]:
        c.append(Check("llama.cpp GPU offload", bool(lc["gpu_offload"]) if has_gpu else None, f"llama-cpp-python {lc['version']}: {'GPU offload' if lc['gpu_offload'] else 'CPU only'}"))
    c.append(Check("device profile", True if r.profile else None, f"closest `plan --device` profile: {r.profile}" if r.profile else "no device profile matches this machine; `medmoe-edge plan --device` lists them", None))
    return c


__all__ = ["Check", "Report", "available_memory", "diagnose", "parse_tegra_release", "runtime_fix"]
