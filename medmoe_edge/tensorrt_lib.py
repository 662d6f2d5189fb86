"""The TensorRT libraries, shared by the engine exporter and the `tensorrt` runtime.

Two Python APIs build and run engines (toolchain-facts §6):

* **TensorRT-RTX** (`tensorrt_rtx_bindings`, `pip install 'medmoe-edge[tensorrt]'`): builds engines
  ahead of time on any machine, CPU included, for GPUs of the compute capabilities named at build
  time (SM75-SM89, SM120/121: GeForce/RTX PRO and A100-class; not Hopper, not Jetson Orin).
* **Standard TensorRT** (`tensorrt`, from JetPack on a Jetson or NVIDIA's own index on a PC): builds
  on the GPU it runs on, for that GPU only.

An engine runs only with the library (and version) that built it, on a GPU its build targeted; both
facts are recorded in the manifest and checked before an engine is deserialized
(`engine_mismatch`), so a wrong engine is refused with the command that rebuilds it, not a crash.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import InputError, RuntimeUnavailable


class TrtTarget(str, Enum):
    """`export --format tensorrt --target`: which library builds the engines, and where."""

    RTX = "rtx"  # TensorRT-RTX, ahead of time, any build machine
    JETSON = "jetson"  # standard TensorRT on the device itself (JetPack); also any PC with `tensorrt`

    @property
    def library(self) -> TrtLibrary:
        return TrtLibrary.RTX if self is TrtTarget.RTX else TrtLibrary.STANDARD


class TrtLibrary(str, Enum):
    """A TensorRT Python package, by its import name."""

    RTX = "tensorrt_rtx_bindings"
    STANDARD = "tensorrt"

    @property
    def label(self) -> str:
        return "TensorRT-RTX" if self is TrtLibrary.RTX else "TensorRT"

    @property
    def install_hint(self) -> str:
        if self is TrtLibrary.RTX:
            return "pip install 'medmoe-edge[tensorrt]' (TensorRT-RTX from PyPI: Linux x86-64 and Windows wheels only)"
        return "on a Jetson, use JetPack's TensorRT (python3-libnvinfer, see docs/TENSORRT.md); on a PC, NVIDIA's tensorrt wheels"


# compute capabilities TensorRT-RTX 1.7 builds for (`trt.ComputeCapability`), as "major.minor"
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
DEFAULT_RTX_COMPUTE_CAPABILITIES = ("8.6", "8.9")  # RTX 30 and 40 series; --compute-capability adds others


def import_library(library: TrtLibrary) -> Any:
    """The TensorRT module, or RuntimeUnavailable naming how to install it."""
    try:
        return importlib.import_module(library.value)
    except ImportError:
        raise RuntimeUnavailable(f"{library.label} is not installed ({library.value} cannot be imported): {library.install_hint}") from None
    except OSError as e:  # the bindings import but a shared library is missing
        raise RuntimeUnavailable(f"{library.label} is installed but its libraries do not load ({str(e).splitlines()[0]}): reinstall it, {library.install_hint}") from None


def installed_libraries() -> dict[TrtLibrary, str]:
    """The TensorRT libraries that import here, with their versions."""
    found = {}
    for lib in TrtLibrary:
        try:
            found[lib] = str(import_library(lib).__version__)
        except RuntimeUnavailable:
            pass
    return found


def parse_compute_capabilities(values: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`--compute-capability 8.6,sm89` → ("8.6", "8.9"), each one TensorRT-RTX can build for.

    Raises:
        InputError: a value that is not a compute capability TensorRT-RTX targets.
    """
    if not values:
        return DEFAULT_RTX_COMPUTE_CAPABILITIES
    out: list[str] = []
    for raw in ",".join(values).split(","):
        v = raw.strip().lower().removeprefix("sm").removeprefix("_")
        if v and "." not in v:
            v = f"{v[:-1]}.{v[-1]}"
        if v not in RTX_COMPUTE_CAPABILITIES:
            raise InputError(f"--compute-capability {raw.strip()!r} is not one TensorRT-RTX builds for: use {', '.join(RTX_COMPUTE_CAPABILITIES)} (Jetson Orin, 8.7, needs --target jetson on the device)")
        if v not in out:
            out.append(v)
    return tuple(out)


def rtx_capability(trt: Any, cc: str) -> Any:
    """The `trt.ComputeCapability` member of "8.6"."""
    return getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""))


@dataclass(frozen=True)
class EngineFacts:
    """What an engine bundle was built with (manifest `extra["tensorrt"]`)."""

    library: TrtLibrary
    version: str
    target: TrtTarget
    compute_capabilities: tuple[str, ...]  # "8.6", ...; the build GPU's for standard TensorRT

    def to_json(self) -> dict:
        return {"library": self.library.value, "version": self.version, "target": self.target.value, "compute_capabilities": list(self.compute_capabilities)}

    @classmethod
    def from_json(cls, data: dict) -> EngineFacts:
        return cls(TrtLibrary(data["library"]), str(data["version"]), TrtTarget(data["target"]), tuple(str(c) for c in data["compute_capabilities"]))


def gpu_compute_capability(device_index: int = 0) -> str | None:
    """"8.6" for the CUDA device torch sees, or None when there is no usable GPU."""
    import torch

    if not torch.cuda.is_available() or device_index >= torch.cuda.device_count():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


def engine_mismatch(facts: EngineFacts, installed_version: str | None, gpu_cc: str | None, rebuild: str) -> str | None:
    """Why these engines cannot run here (library version, GPU), or None when they can.

    Checked before deserializing: TensorRT refuses (or crashes on) an engine of another version or
    compute capability, and the fix is always a rebuild, so the message names that command.
    """
    if installed_version is None:
        return f"the engines were built with {facts.library.label} {facts.version}, which is not installed here: {facts.library.install_hint}, or rebuild them with the library you have: {rebuild}"
    if installed_version != facts.version:
        return f"the engines were built with {facts.library.label} {facts.version} and this machine has {installed_version}: engines run only with the version that built them; rebuild: {rebuild}"
    if gpu_cc is None:
        return None  # the caller reports the missing GPU itself
    if gpu_cc not in facts.compute_capabilities:
        return f"the engines target compute capability {', '.join(facts.compute_capabilities)} and this GPU is {gpu_cc}: rebuild for it: {rebuild}"
    return None


__all__ = [
    "DEFAULT_RTX_COMPUTE_CAPABILITIES",
    "RTX_COMPUTE_CAPABILITIES",
    "EngineFacts",
    "TrtLibrary",
    "TrtTarget",
    "engine_mismatch",
    "gpu_compute_capability",
    "import_library",
    "installed_libraries",
    "parse_compute_capabilities",
    "rtx_capability",
]
