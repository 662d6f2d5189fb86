"""`medmoe-edge export --format onnx`: a checkpoint → an ONNX deployment bundle.

Choices (docs/ONNX.md has the measurements behind them):

* Exporter: torch's TorchScript exporter at opset 17 (`dynamo=False`). It gives stable,
  module-scoped node names (`/text/layers.2/mlp/deepspeed_experts.1/fc1/Gemm`),
  so intermediate outputs of the same layer and expert can be compared across exports;
  opset 17 has LayerNormalization and is inside what TensorRT 8.6–10 parse.
* MoE: NonZero/Gather/ScatterND dispatch per expert (expert-sparse, standard ops, no
  `com.microsoft` contrib op so TensorRT can build it).
* Three graphs (vision, embed, decoder), one decoder for prefill and decode.
* Weights are stored next to each graph in one external-data file (`<graph>.onnx.data`),
  which keeps real-size models under protobuf's 2 GB limit.
* The embedding and decoder graphs are traced on stand-ins and their weights written one at a
  time afterwards (`onnx_weights`), and an fp32 export keeps a bf16 checkpoint's matrices as
  stored: a full-size Phi-2 Med-MoE exports in about the memory of its bf16 weights (11.5 GiB),
  where a trace on the fp32 weights holds them about twice over (docs/ONNX.md).
* The manifest's tensor groups are read back from the written graphs: every initializer is
  mapped to its TensorId (`medmoe_edge.tensor_ids.ONNX_NAMES`) and each group must hold exactly
  the model's parameters, so no weight is left out or stored twice unnoticed.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from medmoe_edge.bundle import GraphIO, GraphSpec, Manifest
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import CheckpointError, InputError, RuntimeUnavailable
from medmoe_edge.exporter import ExportOption, ExportParts, Exporter, ExportRequest, stored_groups
from medmoe_edge.tensor_ids import checkpoint_id, checkpoint_map, onnx_map, plan_spec, released_state_dict
from medmoe_edge.vocab import ArtifactKind, Precision

from medmoe_edge.model.moe import Dispatch

from .onnx_graphs import DecoderGraph, EmbedGraph, VisionGraph, decoder_io_names, use_buffer_attention, use_dispatch
from .onnx_moe_cond import wrap_experts_in_if
from .onnx_weights import ExternalData, WeightSource, as_placeholders, fill, merge_copies, stand_ins, weight_sources, widened

OPSET = 17
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}
# --moe-dispatch → (the traced dispatch, ModelFacts.layout["moe_dispatch"]); docs/MOE_DISPATCH.md measures both
MOE_DISPATCHES = {
    "scatter": (Dispatch.SCATTER, "nonzero-gather-scatternd"),
    "if": (Dispatch.MASKED, "if-per-expert"),
}
# onnx.TensorProto element types of the weights an export stores
_ONNX_PRECISION = {1: Precision.FP32, 10: Precision.FP16, 16: Precision.BF16}


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise RuntimeUnavailable("ONNX export needs the onnx package: pip install 'medmoe-edge[onnx]'") from None
    return onnx


# Called with each graph before its weights are written: (graph proto, initializer → source
# parameter, name → real parameter, the external-data file). `OnnxQuantExporter` writes its codes here.
PlaceWeights = Callable[[Any, dict[str, WeightSource], dict[str, torch.Tensor], ExternalData], None]


def _export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
    rewrite: Callable[[Any], Any] | None = None,
    *,
    dtype: torch.dtype,
    with_weights: bool = False,
    place: PlaceWeights | None = None,
) -> None:
    """Trace `module` to `path` (weights in `path.name + '.data'`), passing the graph through
    `rewrite` and then `place` before its weights are written.

    Without `with_weights` the trace runs on stand-ins and the weights are written one at a time
    afterwards (`onnx_weights`); with it, the module is traced with its weights as they are
    (widened to `dtype`): for the vision graph, whose folded position embeddings only a trace
    with weights computes, and whose weights are small beside the decoder's.
    """
    onnx = _require_onnx()
    scratch = path.parent / f".{path.stem}-trace"
    scratch.mkdir()
    traced = scratch / path.name
    with warnings.catch_warnings(), (widened(module, dtype) if with_weights else stand_ins(module, dtype)) as params:
        # The TorchScript exporter is deprecated in favour of dynamo; see the module docstring for why we use it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(traced),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
            export_params=with_weights,
            # stand-ins are all zero: deduplicating equal initializers would merge them
            keep_initializers_as_inputs=None if with_weights else True,
        )
    proto = onnx.load(str(traced), load_external_data=with_weights)
    shutil.rmtree(scratch)
    if not with_weights:
        as_placeholders(proto.graph, inputs)
    sources = weight_sources(proto.graph, params)
    merge_copies(proto.graph, sources)  # a no-op after a trace with weights: torch merged equal copies
    if rewrite is not None:
        rewrite(proto)
    with ExternalData(path.with_name(path.name + ".data")) as data:
        if place is not None:
            place(proto, sources, params, data)
        data.put_raw(proto.graph)
        fill(proto.graph, sources, params, data)
    onnx.save_model(proto, str(path))


def _rewrites(*passes: Callable[[Any], Any] | None) -> Callable[[Any], None] | None:
    """One rewrite running `passes` (None ones skipped) in order on the model proto."""
    chosen = [p for p in passes if p is not None]
    if not chosen:
        return None

    def run(proto: Any) -> None:
        for p in chosen:
            p(proto)

    return run


def fix_bf16_casts(model: Any) -> int:
    """`_fix_complex_casts` on a bf16 model proto's graph and subgraphs."""
    return _fix_complex_casts(model.graph)


def _fix_complex_casts(graph: Any) -> int:
    """Retype Casts to complex128 as bfloat16; returns how many.

    For a bf16 model the TorchScript exporter casts SDPA's scale (1/sqrt(head_dim)) "to the
    query's type" as complex128, a type no Cast in these graphs can mean: the scale multiplies
    the bf16 scores next. TensorRT refuses the complex Cast ("Unsupported data type for the Cast
    operator"); fp32/fp16 graphs have none.
    """
    from onnx import TensorProto

    fixed = 0
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.COMPLEX128:
                    attr.i = TensorProto.BFLOAT16
                    fixed += 1
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                fixed += _fix_complex_casts(attr.g)
    return fixed


def _io(names: list[str], dtypes: list[str], shapes: list[tuple]) -> tuple[GraphIO, ...]:
    return tuple(GraphIO(n, d, s) for n, d, s in zip(names, dtypes, shapes))


def _moe_dispatch(value: Any) -> str:
    if value not in MOE_DISPATCHES:
        raise InputError(f"--moe-dispatch {value!r} is not one of {', '.join(MOE_DISPATCHES)}")
    return str(value)


def positive_int(flag: str) -> Callable[[Any], int]:
    """The parser of a whole-number option `flag` that must be at least 1 (an `ExportOption.parse`)."""

    def parse(value: Any) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise InputError(f"{flag} {value!r} is not a whole number") from None
        if n < 1:
            raise InputError(f"{flag} must be at least 1, got {n}")
        return n

    return parse



class OnnxExporter(Exporter):
    """Three ONNX graphs (vision, embed, decoder) with an expert-sparse MoE, for ONNX Runtime and TensorRT."""

    name = "onnx"
    artifact_kind = ArtifactKind.ONNX
    description = "ONNX opset 17: vision, embed and one decoder graph (preallocated KV), expert-sparse MoE in standard ops"
    precisions = (Precision.FP32, Precision.FP16)
    default_precision = Precision.FP32
    options = (ExportOption("max_batch", "--max-batch", positive_int("--max-batch"), 4), ExportOption("moe_dispatch", "--moe-dispatch", _moe_dispatch, "scatter"))

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import onnx
        except ImportError:
            return False, "the onnx package is missing: pip install 'medmoe-edge[onnx]'"
        return True, f"onnx {onnx.__version__}"

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        """The graphs compute in one dtype: a plan must give every tensor the bundle's precision."""
        if request.plan.is_uniform:
            return
        for key in released_state_dict(loaded.model):
            tid = checkpoint_id(key)
            p = plan_spec(request.plan, tid).precision
            if p is not request.precision:
                raise InputError(
                    f"the plan gives {tid} {p.value} but the bundle is {request.precision.value}: "
                    "ONNX bundles take one precision for every group (per-expert plans are not supported for ONNX yet); export with one --precision"
                )

    def load(self, model: str | Path, request: ExportRequest) -> LoadedModel:
        """As every exporter, but an fp32 export keeps a bf16/fp16 checkpoint's matrices as stored
        (`load_model(keep_stored=True)`): the graphs are traced without weights and each weight is
        widened when it is written, so the model takes half the memory and the files are the same."""
        from medmoe_edge.checkpoint import load_model

        p = request.precision
        dtype = p.torch if p.is_float else Precision.FP32.torch
        return load_model(model, dtype=dtype, vision_tower=request.vision_tower, keep_stored=dtype == torch.float32)

    def place_weights(self, proto: Any, sources: dict[str, WeightSource], params: dict[str, torch.Tensor], data: ExternalData) -> None:
        """Called with each traced graph before its float weights are written; a subclass writes
        other weights here (quantization codes). Here: nothing, every weight is written as it is."""

    def tensor_groups(self, bundle: Path, loaded: LoadedModel) -> tuple:
        """The written graphs' tensor groups (`tensor_groups`)."""
        return tensor_groups(bundle, loaded)

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        onnx = _require_onnx()
        m = loaded.model
        dispatch, dispatch_name = MOE_DISPATCHES[request.options["moe_dispatch"]]
        use_dispatch(m, dispatch)
        use_buffer_attention(m)
        spec, t = loaded.spec, loaded.spec.text
        dt = request.precision.torch
        dname = request.precision.torch_name
        n_layers, moe_layers = t.num_layers, tuple(sorted(spec.moe.layers))
        kv, d, h, v = t.num_kv_heads, t.head_dim, t.hidden_size, m.n_vocab
        k, e = spec.moe.top_k, spec.moe.num_experts
        size = spec.vision.image_size

        # vision: N images
        bf16_fix = fix_bf16_casts if request.precision is Precision.BF16 else None
        _export(VisionGraph(m), (torch.zeros(2, 3, size, size),), out / GRAPH_FILES["vision"], ["pixel_values"], ["image_embeds"], {"pixel_values": {0: "images"}, "image_embeds": {0: "images"}}, bf16_fix, dtype=dt, with_weights=True, place=self.place_weights)
        # embed: N ids
        _export(EmbedGraph(m), (torch.zeros(5, dtype=torch.int64),), out / GRAPH_FILES["embed"], ["input_ids"], ["embeds"], {"input_ids": {0: "tokens"}, "embeds": {0: "tokens"}}, dtype=dt, place=self.place_weights)
        # decoder: distinct trace sizes (B=2, T=3, past 4, capacity 9) so no two dynamic axes are confused.
        b0, t0, p0, c0 = 2, 3, 4, 9
        ins, outs = decoder_io_names(n_layers, moe_layers)
        args = [torch.randn(b0, t0, h).to(dt), torch.ones(b0, p0 + t0, dtype=torch.int64), torch.arange(p0, p0 + t0).expand(b0, t0).contiguous(), torch.full((b0,), t0 - 1, dtype=torch.int64)]
        args += [torch.zeros(b0, kv, c0, d, dtype=dt) for _ in range(2 * n_layers)]
        dyn: dict[str, dict[int, str]] = {"inputs_embeds": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}, "position_ids": {0: "batch", 1: "new"}, "last_index": {0: "batch"}, "logits": {0: "batch"}}
        for name in ins[4:]:
            dyn[name] = {0: "batch", 2: "capacity"}
        for name in outs[1:]:
            dyn[name] = {0: "batch", 1: "new"} if name.startswith(("experts_", "router_probs_")) else {0: "batch", 2: "new"}
        _export(DecoderGraph(m), tuple(args), out / GRAPH_FILES["decoder"], ins, outs, dyn, _rewrites(wrap_experts_in_if if dispatch is Dispatch.MASKED else None, bf16_fix), dtype=dt, place=self.place_weights)

        graphs = {
            "vision": GraphSpec(GRAPH_FILES["vision"], _io(["pixel_values"], ["float32"], [("images", 3, size, size)]), _io(["image_embeds"], [dname], [("images", spec.image_tokens, h)])),
            "embed": GraphSpec(GRAPH_FILES["embed"], _io(["input_ids"], ["int64"], [("tokens",)]), _io(["embeds"], [dname], [("tokens", h)])),
            "decoder": GraphSpec(
                GRAPH_FILES["decoder"],
                _io(ins, [dname, "int64", "int64", "int64"] + [dname] * (2 * n_layers), [("batch", "new", h), ("batch", "total"), ("batch", "new"), ("batch",)] + [("batch", kv, "capacity", d)] * (2 * n_layers)),
                _io(
                    outs,
                    ["float32"] + ["int64", "float32"] * len(moe_layers) + [dname] * (2 * n_layers),
                    [("batch", v)] + [("batch", "new", k), ("batch", "new", e)] * len(moe_layers) + [("batch", kv, "new", d)] * (2 * n_layers),
                ),
            ),
        }
        return ExportParts(
            roles={f: "graph" for f in GRAPH_FILES.values()} | {f + ".data": "weights" for f in GRAPH_FILES.values()},
            graphs=graphs,
            tensor_groups=self.tensor_groups(out, loaded),
            toolchain=_toolchain(onnx),
            layout={"dtype": dname, "moe_dispatch": dispatch_name},
            extra={"tensorrt_profiles": tensorrt_profiles(spec.image_tokens, t.max_position_embeddings, request.options["max_batch"])},
        )


def tensor_groups(bundle: Path, loaded: LoadedModel) -> tuple:
    """Per TensorId group and stored type, the parameters of the initializers of the written graphs.

    Every initializer is mapped through `tensor_ids.ONNX_NAMES` (derived ones by the scope of the
    nodes that read them) and every group must hold exactly the model's parameters.

    Raises:
        UnmappedTensor: an initializer no row names, or a group whose parameters differ from the model's.
    """
    onnx = _require_onnx()
    spec = loaded.spec
    stored = []
    for graph, file in GRAPH_FILES.items():
        proto = onnx.load(str(bundle / file), load_external_data=False)
        tmap = onnx_map(graph, proto, spec)
        for init in proto.graph.initializer:
            if init.data_type not in _ONNX_PRECISION:
                raise CheckpointError(f"ONNX initializer {init.name} of the {graph} graph has element type {init.data_type}, not a float weight")
            n = 1
            for dim in init.dims:
                n *= int(dim)
            # an initializer stored once for several equal tensors is all of each of them
            stored += [((tid,), _ONNX_PRECISION[init.data_type], n) for tid in tmap.ids(init.name)]
    state = released_state_dict(loaded.model)
    model_sizes = checkpoint_map(state, spec).group_sizes({k: t.numel() for k, t in state.items()})
    return stored_groups("ONNX", stored, model_sizes)


def _toolchain(onnx) -> dict:
    tc = {"onnx": onnx.__version__, "opset": OPSET, "torch_onnx": "TorchScript exporter (dynamo=False)"}
    try:
        import onnxruntime

        tc["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return tc


def export_onnx(model: str | Path, out: Path, precision: Precision | str = Precision.FP32, *, vision_tower: Path | None = None, max_batch: int = 4) -> Manifest:
    """Export `model` (checkpoint directory, hub id or "demo") to an ONNX bundle at `out`, through `OnnxExporter`.

    Args:
        precision: fp32 or fp16 weights and activations (the router and softmaxes stay fp32).
        vision_tower: CLIP directory overriding `mm_image_tower`.
        max_batch: largest batch in the TensorRT optimisation profiles written to the manifest.
    Returns:
        The manifest written into the bundle.
    Raises:
        InputError: `out` exists and is not empty, or a bad option.
        CheckpointError: the checkpoint cannot be loaded.
        RuntimeUnavailable: onnx is not installed.
    """
    request = OnnxExporter.request({"--precision": str(getattr(precision, "value", precision)), "--max-batch": max_batch}, vision_tower=vision_tower)
    return OnnxExporter().export(model, out, request)


def tensorrt_profiles(image_tokens: int, context: int, max_batch: int) -> dict:
    """Bounds (min, opt, max) of every symbolic dimension of the graphs, for TensorRT.

    TensorRT needs every dynamic dimension bounded by an optimisation profile; the full
    input shapes follow from the graph specs (`GraphSpec.profile_shapes`). One profile per
    graph; the decoder's is optimised for prefilling one image plus a short question.
    """
    opt_prompt = min(image_tokens + 64, context)
    return {
        "vision": {"images": [1, 1, max_batch]},
        "embed": {"tokens": [1, 64, context * max_batch]},
        "decoder": {"batch": [1, 1, max_batch], "new": [1, opt_prompt, context], "total": [1, opt_prompt, context], "capacity": [1, opt_prompt + 64, context]},
    }


__all__ = ["GRAPH_FILES", "OPSET", "OnnxExporter", "export_onnx", "positive_int", "tensor_groups", "tensorrt_profiles"]
