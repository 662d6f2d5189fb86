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
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict
from enum import Enum
from pathlib import Path

import torch

from medmoe_edge import __version__
from medmoe_edge.bundle import GraphIO, GraphSpec, Manifest, TensorGroup, checkpoint_sha256, file_entries, write_manifest
from medmoe_edge.checkpoint import LoadedModel, load_model
from medmoe_edge.ckpt_writer import atomic_dir
from medmoe_edge.errors import InputError, RuntimeUnavailable
from medmoe_edge.imaging import PreprocessMode
from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.prompt import SYSTEM, build_prompt
from medmoe_edge.runtimes.base import ArtifactKind

from .onnx_graphs import DecoderGraph, EmbedGraph, VisionGraph, decoder_io_names, use_buffer_attention, use_static_dispatch
from medmoe_edge.support_files import copy_support_files, source_files

OPSET = 17
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "decoder": "decoder.onnx"}


class OnnxPrecision(str, Enum):
    """Weight and activation precision of an ONNX bundle (the router and softmaxes stay fp32)."""

    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return {OnnxPrecision.FP32: torch.float32, OnnxPrecision.FP16: torch.float16}[self]


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise RuntimeUnavailable("ONNX export needs the onnx package: pip install 'medmoe-edge[onnx]'") from None
    return onnx


def tensor_group(name: str) -> str:
    """The manifest tensor group of a `MedMoE` parameter name (see `medmoe_edge.bundle.TensorGroup`)."""
    if name.startswith("vision."):
        return "vision"
    if name.startswith("lm.lm_head."):
        return "lm_head"
    rest = name.removeprefix("lm.model.")
    if rest.startswith("mm_projector."):
        return "projector"
    if rest.startswith("embed_tokens."):
        return "embed"
    if rest.startswith(("final_layernorm.", "norm.")):
        return "final_norm"
    parts = rest.split(".")  # layers.{i}.<module>...
    i = parts[1]
    if parts[2] != "mlp":
        return f"layers.{i}.attn"  # attention and the layer norms
    if parts[3] == "deepspeed_moe":
        if parts[4] == "gate":
            return f"layers.{i}.router"
        return f"layers.{i}.expert.{parts[6]}"  # mlp.deepspeed_moe.experts.deepspeed_experts.{e}
    if parts[3] == "meta_moe":
        return f"layers.{i}.meta"
    if parts[3] == "coefficient":
        return f"layers.{i}.coefficient"
    return f"layers.{i}.ffn"


def tensor_groups(model: MedMoE, precision: str) -> tuple[TensorGroup, ...]:
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = tensor_group(name)
        counts[g] = counts.get(g, 0) + p.numel()
    return tuple(TensorGroup(g, precision, n) for g, n in counts.items())


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict[str, dict[int, str]]) -> None:
    """Trace `module` to `path` (weights in `path.name + '.data'`)."""
    onnx = _require_onnx()
    scratch = path.parent / f".{path.stem}-trace"
    scratch.mkdir()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; see the module docstring for why we use it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(scratch / path.name),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    proto = onnx.load(str(scratch / path.name), load_external_data=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)
    shutil.rmtree(scratch)


def _io(names: list[str], dtypes: list[str], shapes: list[tuple]) -> tuple[GraphIO, ...]:
    return tuple(GraphIO(n, d, s) for n, d, s in zip(names, dtypes, shapes))


def export_onnx(model: str | Path, out: Path, precision: OnnxPrecision = OnnxPrecision.FP32, *, vision_tower: Path | None = None, max_batch: int = 4) -> Manifest:
    """Export `model` (checkpoint directory, hub id or "demo") to an ONNX bundle at `out`.

    Args:
        model: the source checkpoint.
        out: bundle directory to create (must not exist or be empty).
        precision: fp32 or fp16 weights and activations.
        vision_tower: CLIP directory overriding `mm_image_tower`.
        max_batch: largest batch in the TensorRT optimisation profiles written to the manifest.
    Returns:
        The manifest written into the bundle.
    Raises:
        InputError: `out` exists and is not empty.
        CheckpointError: the checkpoint cannot be loaded.
        RuntimeUnavailable: onnx is not installed.
    """
    onnx = _require_onnx()
    if max_batch < 1:
        raise InputError(f"--max-batch must be at least 1, got {max_batch}")
    loaded: LoadedModel = load_model(model, dtype=precision.torch, vision_tower=vision_tower)
    m = loaded.model
    use_static_dispatch(m)
    use_buffer_attention(m)
    spec, t = loaded.spec, loaded.spec.text
    dt = precision.torch
    dname = {torch.float32: "float32", torch.float16: "float16"}[dt]
    n_layers, moe_layers = t.num_layers, tuple(sorted(spec.moe.layers))
    kv, d, h, v = t.num_kv_heads, t.head_dim, t.hidden_size, m.n_vocab
    k, e = spec.moe.top_k, spec.moe.num_experts
    size = spec.vision.image_size

    with atomic_dir(out) as tmp:
        # vision: N images
        _export(VisionGraph(m), (torch.zeros(2, 3, size, size),), tmp / GRAPH_FILES["vision"], ["pixel_values"], ["image_embeds"], {"pixel_values": {0: "images"}, "image_embeds": {0: "images"}})
        # embed: N ids
        _export(EmbedGraph(m), (torch.zeros(5, dtype=torch.int64),), tmp / GRAPH_FILES["embed"], ["input_ids"], ["embeds"], {"input_ids": {0: "tokens"}, "embeds": {0: "tokens"}})
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
        _export(DecoderGraph(m), tuple(args), tmp / GRAPH_FILES["decoder"], ins, outs, dyn)

        roles = {f: "graph" for f in GRAPH_FILES.values()} | {f + ".data": "weights" for f in GRAPH_FILES.values()}
        roles |= copy_support_files(loaded, tmp)

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
        ctx = t.max_position_embeddings
        manifest = Manifest(
            format=ArtifactKind.ONNX,
            precision=precision.value,
            files=file_entries(tmp, roles),
            tensor_groups=tensor_groups(m, precision.value),
            source={"path": str(loaded.checkpoint_dir.resolve()), "sha256": checkpoint_sha256(source_files(loaded)), "label": loaded.checkpoint_dir.name},
            toolchain=_toolchain(onnx),
            graphs=graphs,
            model={
                "variant": t.variant.value,
                "num_layers": n_layers,
                "hidden_size": h,
                "moe_layers": list(moe_layers),
                "num_experts": e,
                "top_k": k,
                "num_kv_heads": kv,
                "head_dim": d,
                "vocab_rows": v,
                "image_tokens": spec.image_tokens,
                "context_length": ctx,
                "dtype": dname,
                "moe_dispatch": "nonzero-gather-scatternd",
            },
            preprocessing={"processor": _processor_json(loaded), "default_mode": PreprocessMode.PAD.value},
            prompt={"system": SYSTEM, "template": build_prompt("{question}"), "image_placeholder_id": -200},
            extra={"tensorrt_profiles": tensorrt_profiles(spec.image_tokens, ctx, max_batch)},
        )
        write_manifest(tmp, manifest)
    return manifest


def _processor_json(loaded: LoadedModel) -> dict:
    d = asdict(loaded.processor)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _toolchain(onnx) -> dict:
    tc = {"medmoe_edge": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET, "exporter": "torch.onnx TorchScript"}
    try:
        import onnxruntime

        tc["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return tc


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


__all__ = ["OPSET", "OnnxPrecision", "export_onnx", "tensor_group", "tensorrt_profiles"]
