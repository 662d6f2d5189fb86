"""The TensorRT runtime (`--runtime tensorrt`): runs the engines of `medmoe-edge export --format tensorrt`.

* Before any engine is deserialized, the bundle is verified (manifest, SHA-256 of every file) and
  its build facts are checked against this machine (`tensorrt_lib.engine_mismatch`): the library
  that built the engines must be importable at the same version, and there must be a CUDA GPU of
  a compute capability the build targeted. A mismatch is refused with the command that rebuilds
  the engines; a machine without a usable GPU is told exactly what is missing, and that the same
  bundle's ONNX graphs run with `--runtime onnxruntime`.
* Engines run through the TensorRT Python API with torch CUDA tensors as I/O (addresses set per
  call, one CUDA stream); the KV cache, prompt assembly and routing are the shared graph runner's
  (`graph_runtime.GraphRuntime`), as for ONNX Runtime.
* The batch and the positions are bounded by the engines' optimisation profile (the manifest's
  `tensorrt_profiles`); the context length the contract checks prompts against is that bound.

Unverified: the engine execution path has not run on a GPU yet (the machines this was written
on have none); `benchmarks/gpu_check.sh` runs it and verifies it against the embedded trace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medmoe_edge.bundle import Manifest, open_bundle
from medmoe_edge.errors import CheckpointError, InputError, RuntimeUnavailable
from medmoe_edge.tensorrt_lib import EngineFacts, TrtLibrary, engine_mismatch, gpu_compute_capability, import_library, installed_libraries

from .base import DTYPE, ArtifactKind, Availability, Capabilities, DeviceKind, Precision, ResolvedOptions
from .graph_runtime import GraphRuntime

COMPUTE_PRECISIONS = (Precision.FP32, Precision.FP16, Precision.BF16)  # bf16: Ampere or later (the export refuses 7.5)
GRAPHS = ("vision", "embed", "decoder")


def rebuild_command(manifest: Manifest, bundle: Path) -> str:
    """The export command that rebuilds this bundle's engines (from its source checkpoint)."""
    facts = manifest.extra.get("tensorrt", {})
    source = manifest.source.get("path", "CHECKPOINT")
    target = facts.get("target", "rtx")
    return f"medmoe-edge export --format tensorrt --model {source} --precision {manifest.precision.value} --target {target} --out {bundle.name}-rebuilt"


def engine_facts(manifest: Manifest, bundle: Path) -> EngineFacts:
    """The build facts of a TensorRT bundle.

    Raises:
        CheckpointError: the manifest does not record them.
    """
    try:
        return EngineFacts.from_json(manifest.extra["tensorrt"])
    except (KeyError, ValueError, TypeError):
        raise CheckpointError(f"{bundle / 'manifest.json'} does not record how its engines were built (extra.tensorrt): export the bundle again") from None


def check_engines_can_run(manifest: Manifest, bundle: Path, device_index: int = 0) -> EngineFacts:
    """Refuse engines this machine cannot run, before anything is deserialized.

    Raises:
        RuntimeUnavailable: another library version or compute capability (naming the rebuild
            command), the library missing, or no CUDA GPU.
    """
    facts = engine_facts(manifest, bundle)
    rebuild = rebuild_command(manifest, bundle)
    cc = gpu_compute_capability(device_index)
    why = engine_mismatch(facts, installed_libraries().get(facts.library), cc, rebuild)
    if why is not None:
        raise RuntimeUnavailable(why)
    if cc is None:
        torch_cuda = "torch has no CUDA (a CPU-only build)" if not torch.backends.cuda.is_built() else "torch sees no CUDA GPU"
        raise RuntimeUnavailable(
            f"the TensorRT runtime needs an NVIDIA GPU of compute capability {', '.join(facts.compute_capabilities)} and {torch_cuda}: "
            f"run it on such a machine, or run this bundle's ONNX graphs on the CPU with --runtime onnxruntime"
        )
    return facts


class TensorRTRuntime(GraphRuntime):
    """Runs a TensorRT bundle's engines on an NVIDIA GPU (TensorRT-RTX or standard TensorRT)."""

    name = "tensorrt"
    artifact_kind = ArtifactKind.TENSORRT
    description = "TensorRT engines of an exported bundle (TensorRT-RTX or JetPack's TensorRT), on an NVIDIA GPU"
    capabilities = Capabilities(reports_routing=True, max_batch=None, devices=(DeviceKind.CUDA,), precisions=COMPUTE_PRECISIONS, options=frozenset({DTYPE}))

    @classmethod
    def availability(cls) -> Availability:
        libs = [f"{lib.label} {v}" for lib, v in installed_libraries().items()]
        if not libs:
            return Availability(False, f"no TensorRT library: {TrtLibrary.RTX.install_hint}")
        # Available with the library alone: loading a bundle then says precisely what is wrong
        # (an engine of another version or GPU, or no GPU at all), which a bare "unavailable" would hide.
        cc = gpu_compute_capability()
        gpu = f"GPU compute capability {cc}" if cc else "no CUDA GPU visible to torch: engines cannot run here (their ONNX graphs run with --runtime onnxruntime)"
        return Availability(True, f"{', '.join(libs)}; {gpu}")

    def _load(self, model: str | Path, options: ResolvedOptions) -> None:
        self.dir = Path(model)
        self.manifest = open_bundle(self.dir, ArtifactKind.TENSORRT)
        device_index = options.device.index or 0
        facts = check_engines_can_run(self.manifest, self.dir, device_index)
        self.compute = self.manifest.precision
        if options.dtype is not None and options.dtype is not self.compute:
            raise InputError(f"these engines compute in {self.compute.torch_name}; --dtype {options.dtype.torch_name} needs engines exported with that precision (--precision)")
        trt = import_library(facts.library)
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self.trt_logger = trt.Logger(trt.Logger.ERROR)
        self.trt_runtime = trt.Runtime(self.trt_logger)
        engines = self.manifest.extra["tensorrt"]["engines"]
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        for name in GRAPHS:
            engine = self.trt_runtime.deserialize_cuda_engine((self.dir / engines[name]).read_bytes())
            if engine is None:
                raise RuntimeUnavailable(f"{facts.library.label} could not deserialize {engines[name]}: rebuild the engines: {rebuild_command(self.manifest, self.dir)}")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.max_batch = int(self.manifest.extra["tensorrt"].get("max_batch", 1))
        self._setup_model(f"tensorrt {self.compute.value}, {facts.library.label} {facts.version}", context_length=int(self.manifest.extra["tensorrt"]["max_context"]))

    def _check_batch(self, batch: int) -> None:
        if batch > self.max_batch:
            raise InputError(f"these engines take at most {self.max_batch} request(s) at a time, got a batch of {batch}: export with a larger --max-batch")

    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        ctx = self.contexts[name]
        keep = []
        for key, t in inputs.items():
            t = t.contiguous()
            keep.append(t)  # alive until the stream has run
            ctx.set_input_shape(key, tuple(t.shape))
            ctx.set_tensor_address(key, t.data_ptr())
        for key, t in outputs.items():
            ctx.set_tensor_address(key, t.data_ptr())
        # the graph runner wrote the inputs on torch's current stream; the engine runs after them
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {name} engine")
        self.stream.synchronize()  # the outputs are read next, and `keep` may be freed
        del keep

    def close(self) -> None:
        super().close()
        self.contexts = {}
        self.engines = {}


__all__ = ["TensorRTRuntime", "check_engines_can_run", "engine_facts", "rebuild_command"]
