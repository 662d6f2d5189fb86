"""Device profiles: the machines `medmoe-edge plan` sizes a deployment for, as data.

One frozen `DeviceProfile` per target (`--device` name), every figure a `Figure` that carries
where it comes from and of which kind it is:

* ``datasheet``: printed by the vendor (NVIDIA module datasheets, the GPU's product page).
* ``derived``: computed from datasheet figures (e.g. FP16 tensor TFLOPS = tensor cores × FMA/clock
  × 2 × GPU clock), the arithmetic in the source text.
* ``measured``: measured on this development machine class (../shared/reference/toolchain-facts.md §5).
* ``estimate``: our working figure where no vendor figure exists (OS reserve); planning treats it
  as such and the plan says so.

Memory is in GiB (the modules' "8GB" is 8 GiB of DRAM), bandwidth in GB/s (10^9 bytes/s), compute
in TFLOPS (10^12 FLOP/s, dense, no structured sparsity). Runtimes are registry names
(`medmoe-edge runtimes`) including ``tensorrt`` (engines); precisions are `vocab.Precision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .errors import InputError
from .vocab import DeviceKind, Precision

P = Precision


class FigureKind(str, Enum):
    """How a profile figure is known."""

    DATASHEET = "datasheet"
    DERIVED = "derived"
    MEASURED = "measured"
    ESTIMATE = "estimate"


class MemoryKind(str, Enum):
    """Where the model's weights live."""

    SHARED = "shared"  # Jetson: CPU and GPU share one LPDDR pool (unified memory)
    DISCRETE = "discrete"  # a GPU with its own VRAM; the plan sizes the VRAM
    HOST = "host"  # CPU only: system RAM


@dataclass(frozen=True)
class Figure:
    """A number with its source."""

    value: float
    kind: FigureKind
    source: str

    def to_json(self) -> dict:
        return {"value": self.value, "kind": self.kind.value, "source": self.source}


@dataclass(frozen=True)
class DeviceProfile:
    """One deployment target.

    Attributes:
        name: the `--device` spelling.
        title: the product.
        device_kind: where the model computes (CUDA for Jetson and GPUs).
        memory: GiB the model can live in (VRAM for discrete GPUs, the shared pool on Jetson, RAM on CPUs).
        memory_kind: shared, discrete or host.
        bandwidth: GB/s of that memory.
        fp32_tflops: dense FP32 compute (CUDA cores, or the CPU's SIMD units).
        fp16_tflops: dense FP16 tensor-core compute with FP32 accumulation; None without tensor cores.
        compute_capability: CUDA SM version, None for CPUs.
        runtimes: runtime names that run on it.
        precisions: weight precisions its runtimes can execute efficiently.
        os_reserve: GiB the operating system and desktop keep (of `memory`; on a discrete GPU the
            display and driver's share of VRAM).
        notes: OS / software stack.
    """

    name: str
    title: str
    device_kind: DeviceKind
    memory: Figure
    memory_kind: MemoryKind
    bandwidth: Figure
    fp32_tflops: Figure
    fp16_tflops: Figure | None
    compute_capability: tuple[int, int] | None
    runtimes: tuple[str, ...]
    precisions: tuple[Precision, ...]
    os_reserve: Figure
    notes: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "device_kind": self.device_kind.value,
            "memory_gib": self.memory.to_json(),
            "memory_kind": self.memory_kind.value,
            "bandwidth_gbs": self.bandwidth.to_json(),
            "fp32_tflops": self.fp32_tflops.to_json(),
            "fp16_tflops": None if self.fp16_tflops is None else self.fp16_tflops.to_json(),
            "compute_capability": None if self.compute_capability is None else ".".join(map(str, self.compute_capability)),
            "runtimes": list(self.runtimes),
            "precisions": [p.value for p in self.precisions],
            "os_reserve_gib": self.os_reserve.to_json(),
            "notes": self.notes,
        }


D, DER, M, E = FigureKind.DATASHEET, FigureKind.DERIVED, FigureKind.MEASURED, FigureKind.ESTIMATE

_GGML = (P.Q8_0, P.Q6_K, P.Q5_K_M, P.Q4_K_M, P.Q4_0)
_ORIN = (P.FP32, P.FP16, P.BF16, P.INT8, P.INT4, *_GGML)  # SM87: bf16 tensor cores
_GPU_RUNTIMES = ("torch", "onnxruntime", "llamacpp", "tensorrt")
_CPU_RUNTIMES = ("torch", "onnxruntime", "llamacpp")
_ORIN_DS = "NVIDIA Jetson Orin Nano series datasheet"
_ORIN_NX_DS = "NVIDIA Jetson Orin NX series datasheet"
_AGX_DS = "NVIDIA Jetson AGX Orin series datasheet"
_JETPACK6 = "JetPack 6 (L4T R36, Ubuntu 22.04, CUDA 12.6, TensorRT 10); torch and onnxruntime-gpu from NVIDIA's Jetson wheels; llama.cpp: `bash scripts/build_llamacpp.sh jetson`"
_JETSON_RESERVE = Figure(1.5, E, "estimate: JetPack 6 desktop at idle plus the carve-outs the kernel does not hand out (about 1.2-1.5 GiB)")


def _orin_tflops(cuda_cores: int, tensor_cores: int, ghz: float, ds: str) -> tuple[Figure, Figure]:
    fp32 = cuda_cores * 2 * ghz / 1000
    fp16 = tensor_cores * 256 * 2 * ghz / 1000  # Ampere tensor core: 256 dense FP16 FMA per clock
    return (
        Figure(round(fp32, 2), DER, f"derived: {cuda_cores} CUDA cores × 2 FLOP × {ghz} GHz max GPU clock ({ds})"),
        Figure(round(fp16, 1), DER, f"derived: {tensor_cores} Ampere tensor cores × 256 FP16 FMA × 2 × {ghz} GHz ({ds}; half its dense INT8 TOPS)"),
    )


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "orin-nano-8gb", "NVIDIA Jetson Orin Nano 8GB", DeviceKind.CUDA,
            Figure(8, D, f"8GB 128-bit LPDDR5, shared by CPU and GPU ({_ORIN_DS})"), MemoryKind.SHARED,
            Figure(68, D, f"68 GB/s LPDDR5 ({_ORIN_DS})"),
            *_orin_tflops(1024, 32, 0.625, _ORIN_DS), (8, 7), _GPU_RUNTIMES, _ORIN, _JETSON_RESERVE,
            f"{_JETPACK6}; 7W/15W power modes (nvpmodel)",
        ),
        DeviceProfile(
            "orin-nano-super", "NVIDIA Jetson Orin Nano Super Developer Kit (8GB)", DeviceKind.CUDA,
            Figure(8, D, "8GB 128-bit LPDDR5 (NVIDIA Jetson Orin Nano Super Developer Kit product page)"), MemoryKind.SHARED,
            Figure(102, D, "102 GB/s in the MAXN SUPER mode (NVIDIA Jetson Orin Nano Super Developer Kit product page)"),
            *_orin_tflops(1024, 32, 1.02, "Orin Nano Super, JetPack 6.1 rev.1 MAXN SUPER clocks"), (8, 7), _GPU_RUNTIMES, _ORIN, _JETSON_RESERVE,
            f"{_JETPACK6}; needs JetPack 6.1 (rev. 1) or later and `sudo nvpmodel -m 2` (MAXN SUPER) for these figures",
        ),
        DeviceProfile(
            "orin-nx-16gb", "NVIDIA Jetson Orin NX 16GB", DeviceKind.CUDA,
            Figure(16, D, f"16GB 128-bit LPDDR5 ({_ORIN_NX_DS})"), MemoryKind.SHARED,
            Figure(102.4, D, f"102.4 GB/s LPDDR5 ({_ORIN_NX_DS})"),
            *_orin_tflops(1024, 32, 0.918, _ORIN_NX_DS), (8, 7), _GPU_RUNTIMES, _ORIN, _JETSON_RESERVE, _JETPACK6,
        ),
        DeviceProfile(
            "agx-orin-32gb", "NVIDIA Jetson AGX Orin 32GB", DeviceKind.CUDA,
            Figure(32, D, f"32GB 256-bit LPDDR5 ({_AGX_DS})"), MemoryKind.SHARED,
            Figure(204.8, D, f"204.8 GB/s LPDDR5 ({_AGX_DS})"),
            *_orin_tflops(1792, 56, 0.93, _AGX_DS), (8, 7), _GPU_RUNTIMES, _ORIN, _JETSON_RESERVE, _JETPACK6,
        ),
        DeviceProfile(
            "agx-orin-64gb", "NVIDIA Jetson AGX Orin 64GB", DeviceKind.CUDA,
            Figure(64, D, f"64GB 256-bit LPDDR5 ({_AGX_DS})"), MemoryKind.SHARED,
            Figure(204.8, D, f"204.8 GB/s LPDDR5 ({_AGX_DS})"),
            *_orin_tflops(2048, 64, 1.3, _AGX_DS), (8, 7), _GPU_RUNTIMES, _ORIN, _JETSON_RESERVE, _JETPACK6,
        ),
        DeviceProfile(
            "xavier-nx", "NVIDIA Jetson Xavier NX 8GB", DeviceKind.CUDA,
            Figure(8, D, "8GB 128-bit LPDDR4x (NVIDIA Jetson Xavier NX series datasheet)"), MemoryKind.SHARED,
            Figure(59.7, D, "59.7 GB/s LPDDR4x (NVIDIA Jetson Xavier NX series datasheet)"),
            Figure(0.84, DER, "derived: 384 Volta CUDA cores × 2 FLOP × 1.1 GHz (NVIDIA Jetson Xavier NX series datasheet)"),
            Figure(6.8, DER, "derived: 48 Volta tensor cores × 64 FP16 FMA × 2 × 1.1 GHz (NVIDIA Jetson Xavier NX series datasheet)"),
            (7, 2), _GPU_RUNTIMES, (P.FP32, P.FP16, P.INT8, *_GGML), _JETSON_RESERVE,
            "JetPack 5.1 at most (L4T R35, Ubuntu 20.04, CUDA 11.4, TensorRT 8.5); no bf16 (SM72); torch ≤ 2.1 from NVIDIA's wheels",
        ),
        DeviceProfile(
            "rtx-3060-12gb", "NVIDIA GeForce RTX 3060 12GB", DeviceKind.CUDA,
            Figure(12, D, "12 GB GDDR6, 192-bit (NVIDIA GeForce RTX 3060 product page)"), MemoryKind.DISCRETE,
            Figure(360, D, "360 GB/s GDDR6 at 15 Gbps × 192 bit (NVIDIA GeForce RTX 3060 specifications)"),
            Figure(12.7, D, "12.7 TFLOPS FP32 (NVIDIA GeForce RTX 3060 specifications)"),
            Figure(25.6, DER, "derived: 112 Ampere tensor cores × 64 dense FP16 FMA per clock with FP32 accumulate (GeForce rate) × 2 × 1.78 GHz boost (NVIDIA Ampere GA102 whitepaper, GA106 scaled)"),
            (8, 6), _GPU_RUNTIMES, (P.FP32, P.FP16, P.BF16, P.INT8, P.INT4, *_GGML),
            Figure(0.4, E, "estimate: display, desktop compositor and driver share of VRAM"),
            "Linux or Windows, CUDA 12; TensorRT-RTX builds for SM86; llama.cpp: `bash scripts/build_llamacpp.sh cuda`",
        ),
        DeviceProfile(
            "rtx-4090", "NVIDIA GeForce RTX 4090", DeviceKind.CUDA,
            Figure(24, D, "24 GB GDDR6X, 384-bit (NVIDIA GeForce RTX 4090 product page)"), MemoryKind.DISCRETE,
            Figure(1008, D, "1008 GB/s GDDR6X at 21 Gbps × 384 bit (NVIDIA GeForce RTX 4090 specifications)"),
            Figure(82.6, D, "82.6 TFLOPS FP32 (NVIDIA Ada Lovelace GPU architecture whitepaper)"),
            Figure(165.2, D, "165.2 TFLOPS dense FP16 tensor with FP32 accumulate (NVIDIA Ada Lovelace GPU architecture whitepaper)"),
            (8, 9), _GPU_RUNTIMES, (P.FP32, P.FP16, P.BF16, P.INT8, P.INT4, *_GGML),
            Figure(0.4, E, "estimate: display, desktop compositor and driver share of VRAM"),
            "Linux or Windows, CUDA 12; TensorRT-RTX builds for SM89; llama.cpp: `bash scripts/build_llamacpp.sh cuda`",
        ),
        DeviceProfile(
            "cpu-x86", "x86-64 CPU server (this development machine class: 2 cores, AVX2/FMA/F16C)", DeviceKind.CPU,
            Figure(24, M, "measured: MemTotal 23.5 GiB on this machine class (/proc/meminfo)"), MemoryKind.HOST,
            Figure(35, M, "measured: C read reduction over 2 GiB, 2 threads, about 35 GB/s on the 2-core x86 development machine (some processes get 54)"),
            Figure(0.051, M, "measured: torch 2.13 fp32 2048×2048 GEMM, 2 threads, 51 GFLOPS (bf16 GEMM: 0.2 GFLOPS, no AVX512-BF16)"),
            None, None, _CPU_RUNTIMES, (P.FP32, P.FP16, P.BF16, *_GGML),
            Figure(1.0, E, "estimate: the OS and other processes"),
            "Linux x86-64, Python ≥ 3.10, torch CPU build; llama.cpp: `bash scripts/build_llamacpp.sh cpu` (or native)",
        ),
        DeviceProfile(
            "raspberry-pi-5", "Raspberry Pi 5 8GB", DeviceKind.CPU,
            Figure(8, D, "8GB LPDDR4X-4267 (Raspberry Pi 5 product brief)"), MemoryKind.HOST,
            Figure(17, DER, "derived: LPDDR4X-4267 × 32-bit bus = 17.1 GB/s theoretical (Raspberry Pi 5 product brief)"),
            Figure(0.154, DER, "derived: 4 Cortex-A76 × 2.4 GHz × 16 FP32 FLOP/clock (2 × 128-bit NEON FMA) (Raspberry Pi 5 product brief, Arm Cortex-A76 TRM)"),
            None, None, _CPU_RUNTIMES, (P.FP32, P.FP16, *_GGML),
            Figure(0.8, E, "estimate: Raspberry Pi OS (64-bit) desktop at idle"),
            "Raspberry Pi OS 64-bit (Debian 12, aarch64); llama.cpp NEON/dotprod build: `bash scripts/build_llamacpp.sh native`",
        ),
    )
}


def get_profile(name: str) -> DeviceProfile:
    """The profile called `name`.

    Raises:
        InputError: unknown name; the message lists the profiles.
    """
    key = name.strip().lower()
    if key not in PROFILES:
        raise InputError(f"--device {name!r} is not a device profile: use one of {', '.join(PROFILES)}")
    return PROFILES[key]


def match_profile(*, jetson_model: str | None = None, gpu_name: str | None = None, board_model: str | None = None, machine: str = "", memory_gib: float | None = None) -> str | None:
    """The profile closest to a machine that `medmoe-edge doctor` probed, or None.

    Args:
        jetson_model: /proc/device-tree/model of a Jetson ("NVIDIA Jetson Orin Nano Developer Kit").
        gpu_name: the first NVIDIA GPU's name from nvidia-smi or torch.
        board_model: /proc/device-tree/model of another board ("Raspberry Pi 5 Model B Rev 1.0").
        machine: platform.machine().
        memory_gib: total memory, to tell module sizes apart.
    """
    mem = memory_gib or 0
    if jetson_model:
        m = jetson_model.lower()
        if "xavier nx" in m:
            return "xavier-nx"
        if "agx orin" in m:
            return "agx-orin-64gb" if mem > 40 else "agx-orin-32gb"
        if "orin nx" in m:
            return "orin-nx-16gb"
        if "orin nano" in m:
            return "orin-nano-super" if "super" in m else "orin-nano-8gb"
        return None
    if gpu_name:
        g = gpu_name.lower()
        if "4090" in g:
            return "rtx-4090"
        if "3060" in g:
            return "rtx-3060-12gb"
    if board_model and "raspberry pi 5" in board_model.lower():
        return "raspberry-pi-5"
    if machine in ("x86_64", "AMD64") and not gpu_name:
        return "cpu-x86"
    return None


__all__ = ["PROFILES", "DeviceProfile", "Figure", "FigureKind", "MemoryKind", "get_profile", "match_profile"]
