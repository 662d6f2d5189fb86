"""`medmoe-edge export --format tensorrt`: the ONNX graphs, then TensorRT engines built from them.

* Graphs: the ONNX exporter's three graphs with the `if` MoE dispatch (`onnx_moe_cond`): no
  NonZero and no data-dependent shape, which TensorRT-RTX cannot build (toolchain-facts §6). They
  stay in the bundle, so ONNX Runtime (CPU, CUDA or its TensorRT provider) runs the very graphs
  the engines were built from, `verify --runtime onnxruntime` checks them without a GPU, and a
  Jetson can rebuild engines for itself from the bundle alone.
* Engines: one per graph (vision tower + projector, embedding, decoder), each with one
  optimisation profile bounded from the manifest (batch ≤ --max-batch, positions ≤ --max-context;
  the decoder's opt shape is one image plus a short question). Networks are strongly typed: the
  precision is the graph's (fp32, fp16 or bf16 tensors; the router and softmaxes stay fp32 in the
  graph). bf16 needs Ampere or later; ONNX Runtime's CPU kernels have no bf16, so without a GPU a
  bf16 bundle's fidelity cannot be checked (the export says so).
* `--target rtx` builds with TensorRT-RTX ahead of time on any machine, CPU included, for the
  compute capabilities of `--compute-capability`; `--target jetson` builds with standard
  TensorRT on the GPU it runs on (JetPack on the Jetson itself) and writes a timing cache.
* Memory: TensorRT's builder copies every weight of a graph while it builds (the export holds
  about 15 GiB of anonymous memory building a full-size Phi-2 Med-MoE's fp16 decoder). So the
  torch model's weights are released once the graphs are written, and each engine is streamed
  into its file where the library can (`build_serialized_network_to_stream`: TensorRT-RTX has
  it, TensorRT 10.0 has not) rather than held whole in memory first. Together these let a
  full-size checkpoint build on a 24 GB machine (docs/TENSORRT.md).
* The manifest records library, version, target, compute capabilities, the profiles and each
  engine's file (hashed like every file); `runtimes/tensorrt_runtime.py` checks them before it
  deserializes anything.

Per-expert int4 weights (a `medmoe-edge quantize --format tensorrt` plan): `tensorrt_quant`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medmoe_edge.bundle import GraphSpec
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError, RuntimeUnavailable
from medmoe_edge.exporter import ExportOption, ExportParts, Exporter, ExportRequest
from medmoe_edge.tensorrt_lib import EngineFacts, TrtLibrary, TrtTarget, gpu_compute_capability, import_library, installed_libraries, parse_compute_capabilities, rtx_capability
from medmoe_edge.vocab import ArtifactKind, Precision

from .onnx_export import GRAPH_FILES, OnnxExporter, positive_int, tensorrt_profiles

ENGINE_FILES = {name: f"{name}.engine" for name in GRAPH_FILES}
TIMING_CACHE = "timing.cache"
# Positions beyond one image that --max-context must leave: a short question and its answer
# (the decoder profile's opt shape is one image plus 64 positions too).
QUESTION_POSITIONS = 64


def _target(value: Any) -> TrtTarget:
    try:
        return TrtTarget(str(value).lower())
    except ValueError:
        raise InputError(f"--target {value!r} is not one of {', '.join(t.value for t in TrtTarget)}") from None


def _capabilities(value: Any) -> tuple[str, ...]:
    return parse_compute_capabilities([value] if isinstance(value, str) else list(value))


def _without_bf16(given: tuple[str, ...] | None) -> list[str]:
    """The targeted compute capabilities without bf16 tensor cores (Turing, 7.5)."""
    return [cc for cc in (given or ()) if float(cc) < 8.0]


class TensorRTExporter(Exporter):
    """ONNX graphs (MoE as an `If` per expert) and the TensorRT engines built from them."""

    name = "tensorrt"
    artifact_kind = ArtifactKind.TENSORRT
    description = "TensorRT engines (TensorRT-RTX ahead of time, or standard TensorRT on a Jetson) + the ONNX graphs they were built from"
    precisions = (Precision.FP32, Precision.FP16, Precision.BF16)
    default_precision = Precision.FP16
    options = (
        ExportOption("target", "--target", _target, TrtTarget.RTX),
        ExportOption("max_batch", "--max-batch", positive_int("--max-batch"), 1),
        ExportOption("max_context", "--max-context", positive_int("--max-context"), None),
        ExportOption("compute_capabilities", "--compute-capability", _capabilities, None),
    )

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        ok, why = OnnxExporter.availability()
        if not ok:
            return ok, why
        found = [f"{lib.label} {v}" for lib, v in installed_libraries().items()]
        if not found:
            return False, f"no TensorRT library: {TrtLibrary.RTX.install_hint}, or {TrtLibrary.STANDARD.install_hint}"
        return True, ", ".join(found)

    def graph_exporter(self) -> OnnxExporter:
        """The exporter of the ONNX graphs the engines are built from (a quantized one for a plan)."""
        return OnnxExporter()

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        self.graph_exporter().check(loaded, request)
        target: TrtTarget = request.options["target"]
        if target is TrtTarget.JETSON and request.options["compute_capabilities"] is not None:
            raise InputError("--compute-capability is for --target rtx: standard TensorRT builds for the GPU it runs on")
        no_bf16 = _without_bf16(request.options["compute_capabilities"])
        if request.precision is Precision.BF16 and no_bf16:
            raise InputError(f"--precision bf16 needs compute capability 8.0 or later (Ampere); {', '.join(no_bf16)} has no bf16: drop it from --compute-capability or use --precision fp16")
        import_library(target.library)  # refuse before the ONNX export when the builder is missing
        if target is TrtTarget.JETSON and gpu_compute_capability() is None:
            raise RuntimeUnavailable("--target jetson builds with standard TensorRT on the GPU the engines will run on, and torch sees no CUDA GPU here: run the export on the Jetson itself, or use --target rtx")
        context = loaded.spec.text.max_position_embeddings
        if (request.options["max_context"] or 0) > context:
            raise InputError(f"--max-context {request.options['max_context']} is above the model's context length {context}: use at most {context}")
        least = loaded.spec.image_tokens + QUESTION_POSITIONS
        if least > (request.options["max_context"] or context):
            raise InputError(f"--max-context {request.options['max_context']} cannot hold one image ({loaded.spec.image_tokens} positions) and a question with its answer: use at least {least}")

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        """Write the graphs, then build the engines from their files. The model's weights are
        released (moved to the meta device) between the two: nothing reads them afterwards."""
        opts = request.options
        onnx_request = ExportRequest(request.plan, {"max_batch": opts["max_batch"], "moe_dispatch": "if"}, request.vision_tower)
        parts = self.graph_exporter().write(loaded, out, onnx_request)
        # the builder makes its own copy of a graph's weights: with the model's copy beside it a
        # full-size Phi-2 Med-MoE (11.4 GiB in fp16) does not fit in 24 GB
        loaded.model.to("meta")
        spec = loaded.spec
        context = opts["max_context"] or spec.text.max_position_embeddings
        profiles = tensorrt_profiles(spec.image_tokens, context, opts["max_batch"])
        target: TrtTarget = opts["target"]
        trt = import_library(target.library)
        if target is TrtTarget.RTX:
            ccs = opts["compute_capabilities"] or parse_compute_capabilities(None)
        else:
            cc = gpu_compute_capability()
            assert cc is not None  # check() refused a machine without a GPU
            ccs = (cc,)
        facts = EngineFacts(target.library, trt.__version__, target, ccs)
        builder = EngineBuilder(trt, facts)
        timings = {}
        for name, graph in parts.graphs.items():
            t0 = time.perf_counter()
            builder.build(out / graph.file, graph, profiles[name], out / ENGINE_FILES[name])
            timings[name] = round(time.perf_counter() - t0, 2)
        roles = dict(parts.roles) | {f: "engine" for f in ENGINE_FILES.values()}
        if builder.write_timing_cache(out / TIMING_CACHE):
            roles[TIMING_CACHE] = "timing-cache"
        extra = dict(parts.extra) | {
            "tensorrt_profiles": profiles,
            "tensorrt": facts.to_json() | {"engines": dict(ENGINE_FILES), "max_batch": opts["max_batch"], "max_context": context, "build_seconds": timings},
        }
        toolchain = dict(parts.toolchain) | {"tensorrt_library": target.library.value, "tensorrt": trt.__version__}
        return ExportParts(roles=roles, graphs=parts.graphs, tensor_groups=parts.tensor_groups, toolchain=toolchain, layout=parts.layout, extra=extra)


class EngineBuilder:
    """Builds serialized engines from ONNX files with one TensorRT module (RTX or standard)."""

    def __init__(self, trt: Any, facts: EngineFacts) -> None:
        self.trt, self.facts = trt, facts
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.builder = trt.Builder(self.logger)
        # write each engine into its file as it is serialized (TensorRT 10.0 cannot)
        self.stream = hasattr(self.builder, "build_serialized_network_to_stream")
        self._cache: Any = None

    def _network(self) -> Any:
        trt = self.trt
        if self.facts.library is TrtLibrary.RTX:
            return self.builder.create_network(0)  # TensorRT-RTX networks are always strongly typed
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise RuntimeUnavailable(f"TensorRT {trt.__version__} has no strongly typed networks (TensorRT 10 or later, JetPack 6): upgrade JetPack")
        return self.builder.create_network(1 << int(flag))

    def _config(self) -> Any:
        trt = self.trt
        config = self.builder.create_builder_config()
        if self.facts.library is TrtLibrary.RTX:
            config.num_compute_capabilities = len(self.facts.compute_capabilities)
            for i, cc in enumerate(self.facts.compute_capabilities):
                config.set_compute_capability(rtx_capability(trt, cc), i)
        else:
            # standard TensorRT times tactics on this GPU; the cache makes a rebuild on the same device quick
            self._cache = self._cache or config.create_timing_cache(b"")
            config.set_timing_cache(self._cache, False)
        return config

    def build(self, onnx_file: Path, graph: GraphSpec, bounds: dict[str, list[int]], engine_file: Path) -> None:
        """Parse `onnx_file`, add the profile of `bounds`, build and write the engine.

        Raises:
            RuntimeUnavailable: the parser or the builder rejects the graph (with TensorRT's first error).
        """
        network = self._network()
        parser = self.trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_file)):
            first = parser.get_error(0).desc() if parser.num_errors else "no error reported"
            raise RuntimeUnavailable(f"{self.facts.library.label} {self.facts.version} cannot parse {onnx_file.name}: {first}")
        config = self._config()
        profile = self.builder.create_optimization_profile()
        mins, opts, maxs = graph.profile_shapes(bounds)
        for name in mins:
            profile.set_shape(name, mins[name], opts[name], maxs[name])
        config.add_optimization_profile(profile)
        if self.stream:
            # the engine (as large as the graph's weights) is never held whole in memory beside
            # the builder's copy of the weights
            with engine_file.open("wb") as fh:
                built = self.builder.build_serialized_network_to_stream(network, config, _file_writer(self.trt, fh))
        else:
            blob = self.builder.build_serialized_network(network, config)
            built = blob is not None
            if built:
                engine_file.write_bytes(memoryview(blob))
        if not built:
            raise RuntimeUnavailable(f"{self.facts.library.label} {self.facts.version} could not build an engine from {onnx_file.name} (profile {bounds}): see its log above")

    def write_timing_cache(self, path: Path) -> bool:
        """Write the timing cache (standard TensorRT; TensorRT-RTX has none: it tunes at run time)."""
        if self._cache is None:
            return False
        path.write_bytes(memoryview(self._cache.serialize()))
        return True


def _file_writer(trt: Any, fh: Any) -> Any:
    """A `trt.IStreamWriter` writing into the open binary file `fh` (the class needs the
    imported library, which is chosen at run time)."""

    class FileWriter(trt.IStreamWriter):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)  # pybind11 needs the base's __init__ called explicitly

        def write(self, data: bytes) -> int:
            return fh.write(data)

    return FileWriter()


__all__ = ["ENGINE_FILES", "EngineBuilder", "TensorRTExporter"]
