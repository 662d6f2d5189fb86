"""ONNX graphs traced without their weights, and the weights written into them one at a time.

Tracing a model with its weights (`torch.onnx.export(export_params=True)`) holds them several
times over: the model's own, a transposed copy of every matrix a MatMul reads (constant folding),
and the whole graph once more when it is loaded to be rewritten: 1.8x the fp32 weights on the
real-dimension proxy, some 44 GiB for a full-size Phi-2 Med-MoE, on a machine that has 24. So the
embedding and decoder graphs are traced on stand-ins (`stand_ins`): every parameter becomes a zero-stride view of one zero of its
shape and the export dtype (no memory), the graph is traced with `export_params=False`, and
every graph input that stands for a weight is turned into an initializer without data
(`as_placeholders`). Passes that rewrite the graph see the same initializers as before; at
the end each one is given its value from the model, cast and transposed as the graph reads it,
and appended to the graph's external-data file (`ExternalData`, `fill`), one tensor in memory at a time.

Where a weight comes from (`weight_sources`): a parameter by its name, or a constant the exporter
folded from one, which is traced back through the node that reads it. Two folds occur: Wᵀ for a
MatMul (a Linear applied to rows of a 3-D input) and W cast for a Gemm (the router's `.float()`,
§2.3.1); the source is the one parameter of the reading node's module whose shape is the
initializer's (or its transpose, for a MatMul). Anything else is refused: the graph layout changed.

Torch's deduplication of equal initializers is off for stand-in traces (every stand-in is zero);
`merge_copies` keeps one initializer per parameter instead (by source, not by value), so two
parameters that happen to be equal are stored twice, and one read by two MatMuls once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmoe_edge.errors import CheckpointError

ALIGN = 64  # every tensor starts at a multiple of this many bytes of the external-data file
TORCH_TYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}  # onnx.TensorProto element types
_CALL_SUFFIX = re.compile(r"_\d+$")  # TorchScript numbers a module's repeated calls: q_proj_1


@dataclass(frozen=True)
class WeightSource:
    """The parameter a graph initializer holds.

    Attributes:
        name: the parameter's name in the traced module (`text.layers.0.self_attn.q_proj.weight`).
        transposed: the initializer is the parameter transposed (the B of a MatMul).
    """

    name: str
    transposed: bool


@contextlib.contextmanager
def _replaced(module: nn.Module, make: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[dict[str, torch.Tensor]]:
    """Every parameter `p` of `module` for which `make(p)` gives a tensor replaced by it, for the
    duration (a tied parameter by one replacement, so the trace still ties it). Yields name → the
    real parameter, for every name of every parameter; the real ones are put back on exit."""
    real: dict[str, torch.Tensor] = {}
    made: dict[int, nn.Parameter | None] = {}
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    try:
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            real[name] = p
            if id(p) not in made:
                new = make(p)
                made[id(p)] = None if new is None else nn.Parameter(new, requires_grad=False)
            if made[id(p)] is not None:
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                swapped.append((owner, attr, p))
                setattr(owner, attr, made[id(p)])
        yield real
    finally:
        for owner, attr, p in reversed(swapped):
            setattr(owner, attr, p)


def stand_ins(module: nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """Every parameter of `module` replaced, for the duration, by a stand-in taking no memory: a
    zero-stride view of one zero, of the parameter's shape, in `dtype` (floats; the export's
    dtype, also for a bf16 matrix kept as stored). Yields name → the real parameter (every name of
    a tied parameter); the real parameters are put back on exit."""
    return _replaced(module, lambda p: torch.zeros((), dtype=dtype if p.is_floating_point() else p.dtype).expand(p.shape))


def widened(module: nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """The float parameters of `module` stored narrower than `dtype` (a bf16 checkpoint's kept
    matrices) replaced by `dtype` copies for the duration, so a trace with weights reads them as the
    model computes with them (no Cast). Yields name → the real parameter; put back on exit."""
    return _replaced(module, lambda p: p.detach().to(dtype) if p.is_floating_point() and p.dtype != dtype else None)


def as_placeholders(graph: Any, inputs: list[str]) -> None:
    """Turn the inputs of a graph traced with `export_params=False` that are not among `inputs`
    (its parameters and the constants folded from them) into initializers without data."""
    from onnx import TensorProto

    keep = []
    for value in graph.input:
        if value.name in inputs:
            keep.append(value)
            continue
        t = value.type.tensor_type
        init = graph.initializer.add()
        init.name = value.name
        init.data_type = t.elem_type
        init.dims.extend(int(d.dim_value) for d in t.shape.dim)
        init.data_location = TensorProto.EXTERNAL
    del graph.input[:]
    graph.input.extend(keep)


def is_placeholder(init: Any) -> bool:
    """An initializer made by `as_placeholders` and not filled yet."""
    return init.data_location == init.EXTERNAL and not init.external_data


def _scope_path(node_name: str) -> list[list[str]]:
    """The modules of a node's scope, each as its dotted names: `/text/layers.0/mlp/fc1/MatMul` →
    [[text], [layers, 0], [mlp], [fc1]] (call numbers dropped)."""
    return [_CALL_SUFFIX.sub("", s).split(".") for s in node_name.strip("/").split("/")[:-1]]


def _within(scope: list[list[str]], path: list[str]) -> bool:
    """Whether a parameter's module `path` goes through `scope`: each scope entry occurs in it as a
    run of names, in order. A scope names modules as they were called, which can skip containers
    (`MoEFFN` calls `experts.deepspeed_experts[e]` itself: `mlp/deepspeed_experts.0`) or repeat one
    (a Sequential's child: `image_spatial_proj/image_spatial_proj.0`), so a run may start where the
    previous one did."""
    if not scope:  # a node of the traced module itself
        return True
    if path[:1] != scope[0][:1]:
        return False
    start = 0
    for names in scope:
        n = len(names)
        start = next((i for i in range(start, len(path) - n + 1) if path[i : i + n] == names), -1)
        if start < 0:
            return False
    return True


def weight_sources(graph: Any, params: dict[str, torch.Tensor]) -> dict[str, WeightSource]:
    """The source parameter of each initializer of `graph` (top level) that holds one of `params`,
    as it is or folded; initializers that trace back to none (the vision tower's folded position
    embeddings, which an Add reads) are left out, and it is for the caller to require them.

    Raises:
        CheckpointError: a folded initializer that several parameters could be.
    """
    readers: dict[str, list[tuple[Any, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, slot))
    out: dict[str, WeightSource] = {}
    for init in graph.initializer:
        if init.name in params:
            out[init.name] = WeightSource(init.name, False)
            continue
        found = {s for node, slot in readers.get(init.name, []) if (s := _folded(init, node, slot, params)) is not None}
        if len(found) > 1:
            raise CheckpointError(f"ONNX initializer {init.name} traces back to {sorted(s.name for s in found)}: the exporter's graph layout changed")
        if found:
            out[init.name] = found.pop()
    return out


def _folded(init: Any, node: Any, slot: int, params: dict[str, torch.Tensor]) -> WeightSource | None:
    """The parameter a folded initializer read by `node` at input `slot` holds, or None."""
    if node.op_type == "MatMul" and slot == 1:
        transposed = True
    elif node.op_type == "Gemm" and slot in (1, 2):
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        transposed = slot == 1 and not trans_b
    else:
        return None
    shape = tuple(int(d) for d in init.dims)
    want = tuple(reversed(shape)) if transposed else shape
    scope = _scope_path(node.name)
    fits = [(n, n.split(".")[:-1]) for n, p in params.items() if tuple(p.shape) == want]
    fits = [(n, path) for n, path in fits if _within(scope, path)]
    # the node's own module's parameter; else one of a child's (the router's Gemm is in the MoE block's scope)
    hits = [n for n, path in fits if scope and path[-len(scope[-1]) :] == scope[-1]] or [n for n, _ in fits]
    if len({id(params[n]) for n in hits}) > 1:
        raise CheckpointError(f"ONNX initializer {init.name} read by {node.name} could be any of {sorted(hits)}: the exporter's graph layout changed")
    return WeightSource(hits[0], transposed) if hits else None


def merge_copies(graph: Any, sources: dict[str, WeightSource]) -> None:
    """Keep one initializer per parameter, as the graph reads it (same source, same type), and point
    every reader at it. Constant folding makes a copy of Wᵀ for each MatMul that reads W: an expert
    called twice (top-2 routing) would otherwise be stored twice. (Torch's deduplication, off for
    stand-in traces, merged them by value, so after a trace with weights there is nothing left to
    merge.) Call it before the graph has subgraphs."""
    first: dict[tuple[WeightSource, int], str] = {}
    rename: dict[str, str] = {}
    for init in graph.initializer:
        src = sources.get(init.name)
        if src is not None:
            rename[init.name] = first.setdefault((src, init.data_type), init.name)
    rename = {a: b for a, b in rename.items() if a != b}
    if not rename:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    keep = [i for i in graph.initializer if i.name not in rename]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for name in rename:
        del sources[name]


class ExternalData:
    """One graph's external-data file, written tensor by tensor (`<graph>.onnx.data`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._offset = 0

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def put(self, init: Any, data: bytes | memoryview) -> None:
        """Append `data` as the value of initializer `init` and point `init` at it."""
        pad = -self._offset % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        self._file.write(data)
        length = len(memoryview(data).cast("B"))
        init.ClearField("raw_data")
        init.data_location = init.EXTERNAL
        del init.external_data[:]
        for key, value in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(length))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
        self._offset += length

    def put_raw(self, graph: Any) -> None:
        """Move the bytes of every initializer of `graph` and its subgraphs that holds them in the
        proto (`raw_data`: the traced vision graph's weights, quantization codes) into the file."""
        for init in graph.initializer:
            if init.HasField("raw_data"):
                self.put(init, init.raw_data)
        for node in graph.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    self.put_raw(sub)

    def tensor(self, init: Any, value: torch.Tensor) -> None:
        """Write `value` as initializer `init`, in its element type."""
        dtype = TORCH_TYPES.get(init.data_type)
        if dtype is None:
            raise CheckpointError(f"ONNX initializer {init.name} has element type {init.data_type}, not a float weight")
        t = value.detach().to(dtype).contiguous().reshape(-1)
        self.put(init, t.view(torch.uint8).numpy().data)


def fill(graph: Any, sources: dict[str, WeightSource], params: dict[str, torch.Tensor], data: ExternalData) -> None:
    """Give every placeholder initializer of `graph` its parameter's value, written to `data`.

    Raises:
        CheckpointError: a placeholder that traces back to no parameter.
    """
    for init in graph.initializer:
        if not is_placeholder(init):
            continue
        src = sources.get(init.name)
        if src is None:
            raise CheckpointError(f"ONNX graph input {init.name} is neither a parameter nor folded from one: the exporter's graph layout changed")
        value = params[src.name].t() if src.transposed else params[src.name]
        if tuple(value.shape) != tuple(init.dims):
            raise CheckpointError(f"ONNX initializer {init.name} is {list(init.dims)} but {src.name} is {list(value.shape)}: the exporter's graph layout changed")
        data.tensor(init, value)


__all__ = ["ExternalData", "WeightSource", "as_placeholders", "fill", "is_placeholder", "merge_copies", "stand_ins", "weight_sources", "widened"]
