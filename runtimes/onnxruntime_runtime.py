"""The ONNX Runtime runtime (`--runtime onnxruntime`): runs a bundle from `medmoe-edge export --format onnx`.

* The bundle is verified (manifest, SHA-256 of every file) before anything is loaded.
* `--provider cpu|cuda|tensorrt` picks the execution provider. A provider that this
  onnxruntime build lacks, or that fails to initialise, is an error: ONNX Runtime would
  otherwise fall back to the CPU silently (toolchain-facts §1, onnxruntime-gpu).
* KV cache: one preallocated buffer per layer and key/value for the whole generation
  (prompt + `max_new_tokens` slots), bound to the decoder with I/O binding. The graph
  reads the filled prefix and returns only this pass's new rows, which are copied in.
  Inputs and outputs are torch tensors on the provider's device, so nothing round-trips
  through host memory on CUDA.
* Inputs are validated and generation (sampling, stopping, streaming) runs in the shared
  contract (`medmoe_edge.runtime_contract.Runtime`); this module only runs the graphs.

The TensorRT provider path is written against ONNX Runtime's documented provider
options and has not been run (no TensorRT on the machines this was built on).
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from medmoe_edge.bundle import Manifest, open_bundle
from medmoe_edge.errors import CheckpointError, InputError, RuntimeUnavailable

from .base import DTYPE, PROVIDER, THREADS, ArtifactKind, Availability, Capabilities, Device, DeviceKind, Precision, ResolvedOptions
from .graph_runtime import GraphRuntime

COMPUTE_PRECISIONS = (Precision.FP32, Precision.FP16)  # what an ONNX bundle computes in (`--precision` of the export)


class Provider(str, Enum):
    """ONNX Runtime execution providers this runtime drives."""

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"

    @property
    def ort_name(self) -> str:
        return {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider", Provider.TENSORRT: "TensorrtExecutionProvider"}[self]


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailable("the onnxruntime runtime needs ONNX Runtime: pip install 'medmoe-edge[onnx]' (CPU) or 'medmoe-edge[gpu]' (CUDA/TensorRT)") from None
    return onnxruntime


def _provider(provider: str | None, device: Device) -> Provider:
    """The provider from --provider and the parsed --device (they must agree; the default --device cpu goes with any provider)."""
    if provider is None:
        return Provider.CPU if device.kind is DeviceKind.CPU else Provider.CUDA
    try:
        chosen = Provider(provider.lower())
    except ValueError:
        raise InputError(f"--provider {provider!r} is not supported: use cpu, cuda or tensorrt") from None
    if chosen is Provider.CPU and device.kind is not DeviceKind.CPU:
        raise InputError(f"--provider {chosen.value} and --device {device} disagree: drop --device or choose a matching one")
    return chosen


def _compute_precision(manifest: Manifest, bundle: Path) -> Precision:
    """The precision the graphs compute in: the element type of the embedding graph's output."""
    try:
        dtype = manifest.graphs["embed"].outputs[0].dtype
    except (KeyError, IndexError):
        dtype = None
    if dtype == Precision.BF16.torch_name:
        # a TensorRT bundle exported with --precision bf16: ONNX Runtime's CPU kernels have no bf16
        # (and this runtime binds its buffers through numpy, which has no bf16 either)
        raise RuntimeUnavailable(f"{bundle} computes in bfloat16, which the onnxruntime runtime does not run: run its engines with --runtime tensorrt --device cuda on an Ampere or later GPU")
    try:
        return Precision.parse(str(dtype), allowed=COMPUTE_PRECISIONS, option="embeds element type")
    except InputError:
        raise CheckpointError(f"{bundle / 'manifest.json'} does not describe an fp32 or fp16 embed graph: export the bundle again") from None


class OnnxRuntimeRuntime(GraphRuntime):
    """Runs an ONNX bundle with ONNX Runtime (CPU, CUDA or TensorRT execution provider)."""

    name = "onnxruntime"
    artifact_kind = ArtifactKind.ONNX
    description = "ONNX Runtime on an exported bundle (--provider cpu|cuda|tensorrt)"
    # max_batch None: the graphs take any batch; the TensorRT provider's profile bound is the bundle's (checked in _prefill)
    capabilities = Capabilities(reports_routing=True, max_batch=None, devices=(DeviceKind.CPU, DeviceKind.CUDA), precisions=COMPUTE_PRECISIONS, options=frozenset({DTYPE, THREADS, PROVIDER}))

    @classmethod
    def availability(cls) -> Availability:
        try:
            ort = _import_ort()
        except RuntimeUnavailable as e:
            return Availability(False, str(e))
        return Availability(True, f"onnxruntime {ort.__version__}, providers: {', '.join(ort.get_available_providers())}")

    def _load(self, model: str | Path, options: ResolvedOptions) -> None:
        ort = _import_ort()
        self.dir = Path(model)
        # a TensorRT bundle holds the ONNX graphs its engines were built from: they run here too
        self.manifest: Manifest = open_bundle(self.dir, (ArtifactKind.ONNX, ArtifactKind.TENSORRT))
        self.compute = _compute_precision(self.manifest, self.dir)
        if options.dtype is not None and options.dtype is not self.compute:
            raise InputError(f"this bundle computes in {self.compute.torch_name}; --dtype {options.dtype.torch_name} needs a bundle exported with that precision (medmoe-edge export --precision)")
        self.provider = _provider(options.provider, options.device)
        self.device_id = options.device.index or 0
        if self.provider.ort_name not in ort.get_available_providers():
            asked = f"--provider {self.provider.value}" if options.provider is not None else f"--device {options.device}"
            raise RuntimeUnavailable(
                f"{asked}: this onnxruntime build has no {self.provider.ort_name} "
                f"(it has {', '.join(ort.get_available_providers())}): install onnxruntime-gpu with CUDA/cuDNN (and TensorRT) for it, or use {'--provider' if options.provider is not None else '--device'} cpu"
            )
        if self.provider is Provider.CPU:
            self.device = torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise RuntimeUnavailable(f"--provider {self.provider.value} keeps the KV cache in GPU memory through torch, and this torch has no CUDA: install a CUDA build of torch, or use --provider cpu")
            self.device = torch.device("cuda", self.device_id)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # the user's count, else the contract's default (which leaves room for other work on the cores)
        so.intra_op_num_threads = options.num_threads
        so.inter_op_num_threads = 1
        if self.manifest.format is ArtifactKind.TENSORRT:
            # a stand-in for the engines: TensorRT's int4 weights are weight-only (fp16 activations),
            # so the fused MatMulNBits must not quantize activations to int8 (ORT's default level 4);
            # on the demo's quantized decoder level 4 gave KL 3.5e-3 against 4.8e-5 at level 0
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.sessions = {name: self._session(ort, so, name) for name in ("vision", "embed", "decoder")}
        self._check_facts()

        self._setup_model(f"{self.manifest.format.value} graphs {self.manifest.precision.value}, {self.provider.value}")

    def _check_facts(self) -> None:
        """The manifest's model facts and precision against what the graphs really take and give.

        Raises:
            CheckpointError: naming the manifest field that disagrees with the graphs.
        """
        mm, where = self.manifest.model, self.dir / "manifest.json"
        dec = self.sessions["decoder"]
        ins = {i.name: i for i in dec.get_inputs()}
        outs = {o.name: o for o in dec.get_outputs()}
        embed_out = self.sessions["embed"].get_outputs()[0]
        found = {
            "model.num_layers": sum(1 for n in ins if n.startswith("past_key_")),
            "model.moe_layers": tuple(sorted(int(n.rsplit("_", 1)[1]) for n in outs if n.startswith("router_probs_"))),
            "model.num_experts": {o.shape[-1] for n, o in outs.items() if n.startswith("router_probs_")},
            "model.top_k": {o.shape[-1] for n, o in outs.items() if n.startswith("experts_")},
            "model.num_kv_heads": {i.shape[1] for n, i in ins.items() if n.startswith("past_key_")},
            "model.head_dim": {i.shape[3] for n, i in ins.items() if n.startswith("past_key_")},
            "model.vocab_rows": outs["logits"].shape[-1] if "logits" in outs else None,
            "model.hidden_size": embed_out.shape[-1],
            "precision": {"tensor(float)": Precision.FP32, "tensor(float16)": Precision.FP16}.get(embed_out.type),
        }
        expected = {
            "model.num_layers": mm.num_layers,
            "model.moe_layers": tuple(sorted(mm.moe_layers)),
            "model.num_experts": {mm.num_experts},
            "model.top_k": {mm.top_k},
            "model.num_kv_heads": {mm.num_kv_heads},
            "model.head_dim": {mm.head_dim},
            "model.vocab_rows": mm.vocab_rows,
            "model.hidden_size": mm.hidden_size,
            "precision": self.manifest.precision,
        }
        for field, want in expected.items():
            got = found[field]
            if got != want and not (isinstance(want, set) and not got and not mm.moe_layers):
                shown = lambda v: ", ".join(map(str, sorted(v))) if isinstance(v, (set, tuple)) else getattr(v, "value", v)  # noqa: E731
                raise CheckpointError(f"{where}: {field} is {shown(want)} but the graphs have {shown(got)}: the manifest does not describe this bundle; export it again")

    def _session(self, ort, so, name: str):
        graph = self.manifest.graphs[name]
        path = str(self.dir / graph.file)
        if self.provider is Provider.CPU:
            providers: list = ["CPUExecutionProvider"]
        elif self.provider is Provider.CUDA:
            providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        else:
            providers = [("TensorrtExecutionProvider", self._trt_options(name)), ("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise RuntimeUnavailable(f"ONNX Runtime could not load {graph.file} with --provider {self.provider.value}: {str(e).splitlines()[0]}") from None
        active = sess.get_providers()
        if not active or active[0] != self.provider.ort_name:
            raise RuntimeUnavailable(
                f"--provider {self.provider.value}: ONNX Runtime fell back to {active[0] if active else 'nothing'} "
                f"(the {self.provider.ort_name} failed to initialise: check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs); use --provider cpu to run on the CPU"
            )
        return sess

    def _trt_options(self, name: str) -> dict:
        """TensorRT provider options: fp16 for fp16 bundles, engine cache, the manifest's optimisation profile (unverified here)."""
        bounds = self.manifest.extra.get("tensorrt_profiles", {}).get(name, {})
        mins, opts, maxs = self.manifest.graphs[name].profile_shapes(bounds)

        def fmt(shapes: dict[str, list[int]]) -> str:
            return ",".join(f"{k}:{'x'.join(str(d) for d in v)}" for k, v in shapes.items())

        cache = Path(os.environ.get("MEDMOE_EDGE_TRT_CACHE", Path.home() / ".cache" / "medmoe-edge" / "trt")) / self.manifest.bundle_id
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": self.device_id,
            "trt_fp16_enable": self.compute is Precision.FP16,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_profile_min_shapes": fmt(mins),
            "trt_profile_opt_shapes": fmt(opts),
            "trt_profile_max_shapes": fmt(maxs),
        }

    def _check_batch(self, batch: int) -> None:
        """TensorRT engines are built for the manifest's optimisation profile: refuse a batch above its bound."""
        if self.provider is not Provider.TENSORRT:
            return
        bound = self.manifest.extra.get("tensorrt_profiles", {}).get("decoder", {}).get("batch")
        if bound and batch > int(bound[2]):
            raise InputError(f"the TensorRT profile of this bundle takes at most {bound[2]} request(s) at a time, got a batch of {batch}: export with a larger --max-batch")

    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run graph `name` reading `inputs` and writing into the preallocated `outputs` (I/O binding)."""
        io = self.sessions[name].io_binding()
        dev, idx = self.device.type, self.device.index or 0
        for key, t in inputs.items():
            t = t.contiguous()
            inputs[key] = t  # keep the contiguous copy alive until the run ends
            io.bind_input(key, dev, idx, _np_dtype(t), list(t.shape), t.data_ptr())
        for key, t in outputs.items():
            io.bind_output(key, dev, idx, _np_dtype(t), list(t.shape), t.data_ptr())
        self.sessions[name].run_with_iobinding(io)

    def close(self) -> None:
        self._kv = []
        self.sessions = {}


def _np_dtype(t: torch.Tensor):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]


__all__ = ["OnnxRuntimeRuntime", "Provider"]
