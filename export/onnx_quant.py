"""`medmoe-edge quantize --format onnx|tensorrt`: the ONNX exporter's graphs with planned weights as
blocked `DequantizeLinear` → `MatMul` (opset 21), written from the quantizer core's codes.

A pass over each graph `OnnxExporter` traces, run before its float weights are written
(`OnnxExporter.place_weights`), so a planned weight is never written in floating point: every
planned weight is found among the initializers read by a MatMul or Gemm node (by the parameter
each initializer holds, `onnx_weights.weight_sources`: W for a Gemm with transB=1, Wᵀ for a
MatMul), and

    MatMul(A, W_init)                    →  MatMul(A, DequantizeLinear(codes, scales, zero))
    Gemm(A, W_init, C, transB=1)         →  Add(MatMul(A, DequantizeLinear(codes, ...)), C)

DQ works on Wᵀ [K, N] with axis 0 and block_size = the quantizer's block: codes [K, N],
scales [K/bs, N] in the replaced weight's float type (DQ's output type is its scale's: fp32 in
ONNX bundles, fp16 in TensorRT's fp16 networks), zero points [K/bs, N] in the codes' type
(uint4/uint8; none for TensorRT's symmetric int4). ONNX Runtime 1.32 CPU fuses DQ +
MatMul into MatMulNBits, and DQ + Gemm it does not (quantization-study §3a), which is why the
experts' and meta experts' Gemm nodes become MatMul + Add. The new nodes take the scope of the
node they replace (`/text/layers.0/mlp/deepspeed_experts.1/fc1/DequantizeLinear`), so
`tensor_ids.onnx_map` names the new initializers by the same TensorIds.

With `OnnxOps.MATMULNBITS` (`quantize --ops matmulnbits`) the planned weights are written as ONNX
Runtime's own `com.microsoft.MatMulNBits` nodes instead, which is what ONNX Runtime fuses the DQ
pattern into, so the bundle runs only on ONNX Runtime but takes 2-bit codes too (ONNX has no 2-bit
DequantizeLinear that ORT fuses):

    MatMul(A, W_init) / Gemm(A, W_init, C, transB=1)  →  MatMulNBits(A, B, scales, zero)  (+ Add C)

B is the codes of W [N, K] as they are, [N, K/bs, bs·bits/8] bytes, element 0 in the low bits;
scales [N·K/bs] in the replaced weight's float type; zero points packed the same way per row
(absent for symmetric codes: MatMulNBits' default zero point 2^(bits−1) is theirs). The nodes say
`accuracy_level` 4 (int8 activations), the level ONNX Runtime gives the fused DQ pattern by default.

The rest of each graph is untouched; the opset import becomes 21 and the IR version 10 (int4
needs both). Between opset 17 and 21 none of the graphs' ops changed meaning (no Reduce* or Split
node, whose inputs changed at 18).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import CheckpointError, InputError
from medmoe_edge.exporter import ExportParts, ExportRequest, stored_groups
from medmoe_edge.delta_coding import to_delta_model
from medmoe_edge.quantizer import QTensor
from medmoe_edge.tensor_ids import _all_nodes, checkpoint_id, checkpoint_map, onnx_map, plan_spec, released_state_dict
from medmoe_edge.vocab import OnnxOps, Precision

from .onnx_export import GRAPH_FILES, OnnxExporter, _require_onnx
from .onnx_weights import ExternalData, WeightSource

QDQ_OPSET = 21
QDQ_IR_VERSION = 10
_BITS = {Precision.INT4: 4, Precision.INT8: 8}
MATMULNBITS_LEVEL = 4  # ONNX Runtime's default for the fused DQ pattern (session.qdq_matmulnbits_accuracy_level)


OPS_BITS = {OnnxOps.QDQ: _BITS, OnnxOps.MATMULNBITS: {Precision.INT2: 2, **_BITS}}
_NBITS_PRECISION = {2: Precision.INT2, 4: Precision.INT4, 8: Precision.INT8}
_FLOAT_TYPES = {1: Precision.FP32, 10: Precision.FP16, 16: Precision.BF16}
_NUMPY_FLOATS = {1: np.float32, 10: np.float16}  # the float types a quantized graph takes (fp32 ONNX, fp16 TensorRT)


def _code_type(onnx, q: QTensor):
    """ONNX element type of the codes (and zero points) of `q`."""
    T = onnx.TensorProto
    if q.bits == 4:
        return T.INT4 if q.symmetric else T.UINT4
    if q.bits == 8:
        return T.INT8 if q.symmetric else T.UINT8
    raise InputError(f"{q.bits}-bit codes have no DequantizeLinear type ONNX Runtime fuses: ONNX plans take int4 and int8")


def _pack(values: np.ndarray, bits: int) -> bytes:
    """Raw bytes of an ONNX tensor: 4-bit elements two per byte, the first in the low nibble (the
    whole tensor as one row of `pack_rows`; signed codes as their two's-complement bits)."""
    flat = values.reshape(1, -1).astype(np.int16) & ((1 << bits) - 1)
    return pack_rows(flat, bits).tobytes()


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' packing: each row of `values` [N, M] (integers below 2**bits) as
    ceil(M·bits/8) bytes, element 0 in the low bits of its byte."""
    n, m = values.shape
    per = 8 // bits
    v = np.concatenate([values.astype(np.uint8), np.zeros((n, (-m) % per), np.uint8)], 1).reshape(n, -1, per)
    out = np.zeros(v.shape[:2], np.uint8)
    for i in range(per):
        out |= v[..., i] << (bits * i)
    return out


def _tensor(onnx, name: str, values: np.ndarray, dtype: int, bits: int):
    return onnx.helper.make_tensor(name, dtype, list(values.shape), _pack(values, bits), raw=True)


def _scope(node_name: str) -> str:
    return node_name.rsplit("/", 1)[0] if "/" in node_name else node_name


def _dq_matmul(onnx, owner, node, q: QTensor, base: str, scope: str, dtype: np.dtype) -> list:
    """DequantizeLinear (blocked, axis 0) of the codes of `q`, then the MatMul (a Gemm becomes
    MatMul → Add) that read the weight; the codes, scales and zero points go into `owner`."""
    from onnx import numpy_helper

    code_type = _code_type(onnx, q)
    cvals = (q.signed_codes() if q.symmetric else q.codes).numpy().T  # [K, N]
    owner.initializer.append(_tensor(onnx, base + ".codes", np.ascontiguousarray(cvals), code_type, q.bits))
    # the quantizer's scales are fp16-exact, so an fp16 graph stores them without loss
    owner.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.scales.numpy().T.astype(dtype)), base + ".scales"))
    dq_inputs = [base + ".codes", base + ".scales"]
    if not q.symmetric:
        owner.initializer.append(_tensor(onnx, base + ".zero_point", np.ascontiguousarray(q.zeros.numpy().T), code_type, q.bits))
        dq_inputs.append(base + ".zero_point")
    dq_out = base + ".dequantized"
    out = [onnx.helper.make_node("DequantizeLinear", dq_inputs, [dq_out], name=f"{scope}/DequantizeLinear", axis=0, block_size=q.block)]
    if node.op_type == "MatMul":
        node.input[1] = dq_out
        return [*out, node]
    mm_out = node.output[0] + ".matmul" if len(node.input) > 2 else node.output[0]
    out.append(onnx.helper.make_node("MatMul", [node.input[0], dq_out], [mm_out], name=f"{scope}/MatMul"))
    if len(node.input) > 2 and node.input[2]:
        out.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{scope}/Add"))
    return out


def place_codes(proto: Any, sources: dict[str, WeightSource], params: dict[str, torch.Tensor], data: ExternalData, codes: dict[str, QTensor], keys: dict[int, str], ops: OnnxOps = OnnxOps.QDQ) -> dict[str, str]:
    """Write the planned weights of one traced graph as DQ → MatMul, or MatMulNBits (see the module
    docstring), before its float weights are written (`OnnxExporter.place_weights`): the planned
    float initializers are dropped, never written.

    Args:
        sources: initializer → the parameter it holds (`onnx_weights.weight_sources`).
        params: parameter name in the traced module → the model's parameter.
        data: the graph's external-data file, which takes the codes, scales and zero points.
        codes: checkpoint weight key → its codes, for every planned weight.
        keys: `id()` of each of the model's parameters → its checkpoint key.
    Returns:
        checkpoint key → the name of the node that now reads its codes.
    Raises:
        CheckpointError: a planned weight is read by a node this rewrite does not handle.
    """
    onnx = _require_onnx()
    g = proto.graph
    planned: dict[str, tuple[str, bool]] = {}
    for name, src in sources.items():
        key = keys.get(id(params[src.name]))
        if key in codes:
            planned[name] = (key, src.transposed)
    floats = {i.name: _NUMPY_FLOATS[i.data_type] for i in g.initializer if i.name in planned}
    readers: dict[str, int] = {}
    for node in _all_nodes(g):  # an If per expert (--moe-dispatch if) reads the expert's weights from inside its branch
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done: dict[str, str] = {}

    def rewrite(owner) -> None:
        """Rewrite the nodes of `owner` (the main graph or a subgraph) and of its subgraphs. The
        codes, scales and zero points become initializers of the graph that holds the DQ node:
        ONNX Runtime's DQ → MatMulNBits fusion looks its weights up there, not in outer scopes
        (an If branch reading the main graph's codes fails to load)."""
        new_nodes = []
        for node in owner.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    rewrite(sub)
            w_name = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
            if w_name not in planned:
                new_nodes.append(node)
                continue
            key, transposed = planned[w_name]
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Gemm":
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transB", 0) == int(transposed):
                    raise CheckpointError(f"{node.name} reads {key} as a Gemm this rewrite does not handle ({attrs}): plan that group in floating point")
            elif not transposed:
                raise CheckpointError(f"{node.name} reads {key} untransposed in a MatMul: the graph layout changed; plan that group in floating point")
            if readers[w_name] > 1:
                raise CheckpointError(f"{key} ({w_name}) is read by {readers[w_name]} nodes: a shared weight cannot be quantized for one of them")
            q = codes[key]
            write = _matmulnbits if ops is OnnxOps.MATMULNBITS else _dq_matmul
            before = len(owner.initializer)
            new_nodes += write(onnx, owner, node, q, f"{w_name}.q{q.bits}", _scope(node.name), floats[w_name])
            for init in owner.initializer[before:]:  # into the file now: one weight's codes in memory at a time
                data.put(init, init.raw_data)
            done[key] = node.name

        del owner.node[:]
        owner.node.extend(new_nodes)

    rewrite(g)
    keep = [i for i in g.initializer if i.name not in planned]
    del g.initializer[:]
    g.initializer.extend(keep)
    if done:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, QDQ_OPSET)
        if ops is OnnxOps.MATMULNBITS and not any(op.domain == "com.microsoft" for op in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        proto.ir_version = max(proto.ir_version, QDQ_IR_VERSION)
    return done


def _matmulnbits(onnx, owner, node, q: QTensor, base: str, scope: str, float_dtype) -> list:
    """The node(s) replacing a MatMul/Gemm that reads `q`'s weight, with their initializers added to `owner`."""
    from onnx import numpy_helper

    T = onnx.TensorProto
    n_out, k = q.shape
    b = pack_rows(q.codes.numpy(), q.bits).reshape(n_out, k // q.block, q.block * q.bits // 8)
    owner.initializer.append(onnx.helper.make_tensor(base + ".codes", T.UINT8, list(b.shape), b.tobytes(), raw=True))
    owner.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.scales.numpy().astype(float_dtype).reshape(-1)), base + ".scales"))
    inputs = [node.input[0], base + ".codes", base + ".scales"]
    if not q.symmetric:  # symmetric codes use MatMulNBits' default zero point, 2**(bits-1)
        z = pack_rows(q.zeros.round().to(torch.int64).numpy(), q.bits).reshape(-1)
        owner.initializer.append(onnx.helper.make_tensor(base + ".zero_point", T.UINT8, list(z.shape), z.tobytes(), raw=True))
        inputs.append(base + ".zero_point")
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    out = node.output[0] + ".matmul" if bias else node.output[0]
    made = [onnx.helper.make_node("MatMulNBits", inputs, [out], name=f"{scope}/MatMulNBits", domain="com.microsoft", K=k, N=n_out, bits=q.bits, block_size=q.block, accuracy_level=MATMULNBITS_LEVEL)]
    if bias:
        made.append(onnx.helper.make_node("Add", [out, bias], [node.output[0]], name=f"{scope}/Add"))
    return made


def _subgraphs(graph) -> list:
    """Every subgraph of `graph`'s nodes, recursively (the If branches of --moe-dispatch if)."""
    out = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out += [sub, *_subgraphs(sub)]
    return out


def _code_maps(onnx, graph: str, proto, spec) -> list:
    """(initializers, TensorMap) of the main graph and of every subgraph that holds DQ codes; a
    subgraph's map covers only the initializers its DequantizeLinear nodes read (named by their scope)."""
    maps = [({i.name: i for i in proto.graph.initializer}, onnx_map(graph, proto, spec))]
    for sub in _subgraphs(proto.graph):
        dq_inputs = {n for node in sub.node for n in _code_inputs(node)}
        own = [i for i in sub.initializer if i.name in dq_inputs]
        if not own:
            continue
        view = onnx.GraphProto()
        view.node.extend(sub.node)
        view.initializer.extend(own)
        maps.append(({i.name: i for i in own}, onnx_map(graph, type("SubgraphView", (), {"graph": view})(), spec)))
    return maps


def _code_inputs(node) -> list[str]:
    """The codes, scales and zero points a DequantizeLinear or MatMulNBits node reads."""
    if node.op_type == "DequantizeLinear":
        return list(node.input)
    if node.op_type == "MatMulNBits":
        return list(node.input[1:4])
    return []


def _nbits(onnx, node) -> tuple[Precision, int, int]:
    """(precision, block, weights) of a MatMulNBits node, from its attributes."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    if int(a["bits"]) not in _NBITS_PRECISION:
        raise CheckpointError(f"{node.name} is a {a['bits']}-bit MatMulNBits: medmoe-edge writes 2, 4 or 8 bits")
    return _NBITS_PRECISION[int(a["bits"])], int(a["block_size"]), int(a["N"]) * int(a["K"])


def quantized_tensor_groups(bundle: Path, loaded: LoadedModel) -> tuple:
    """Per TensorId group and stored type, the parameters read back from the rewritten graphs:
    a DQ's codes count as the weight's parameters at int4/int8, its scales and zero points as none."""
    onnx = _require_onnx()
    T = onnx.TensorProto
    code_precision = {T.UINT4: Precision.INT4, T.INT4: Precision.INT4, T.UINT8: Precision.INT8, T.INT8: Precision.INT8}
    spec = loaded.spec
    stored = []
    for graph, file in GRAPH_FILES.items():
        proto = onnx.load(str(bundle / file), load_external_data=False)
        nodes = _all_nodes(proto.graph)
        aux = {n for node in nodes for n in _code_inputs(node)[1:]}
        packed = {node.input[1]: _nbits(onnx, node) for node in nodes if node.op_type == "MatMulNBits"}  # B holds N·K codes in bytes
        for inits, tmap in _code_maps(onnx, graph, proto, spec):
            for init in inits.values():
                if init.name in aux:
                    continue
                if init.name in packed:
                    p, _block, n = packed[init.name]
                    stored += [((tid,), p, n) for tid in tmap.ids(init.name)]
                    continue
                p = code_precision.get(init.data_type) or _FLOAT_TYPES.get(init.data_type)
                if p is None:
                    raise CheckpointError(f"ONNX initializer {init.name} of the {graph} graph has element type {init.data_type}, neither a float weight nor int4/int8 codes")
                n = int(np.prod([int(d) for d in init.dims])) if init.dims else 1
                stored += [((tid,), p, n) for tid in tmap.ids(init.name)]
    state = released_state_dict(loaded.model)
    model_sizes = checkpoint_map(state, spec).group_sizes({k: t.numel() for k, t in state.items()})
    return stored_groups("ONNX", stored, model_sizes)


def read_back(bundle: Path, spec=None) -> dict[str, tuple[Precision, int, int]]:
    """What the written graphs store for every quantized TensorId group, read from the files:
    group → (precision of its DequantizeLinear codes, their block size, bytes of codes + scales +
    zero points). The size check compares these bytes with the plan's prediction.

    Raises:
        CheckpointError: a group whose DequantizeLinear nodes disagree on type or block size.
    """
    onnx = _require_onnx()
    T = onnx.TensorProto
    code_precision = {T.UINT4: Precision.INT4, T.INT4: Precision.INT4, T.UINT8: Precision.INT8, T.INT8: Precision.INT8}
    found: dict[str, tuple[Precision, int, int]] = {}
    for graph, file in GRAPH_FILES.items():
        proto = onnx.load(str(bundle / file), load_external_data=False)
        maps = _code_maps(onnx, graph, proto, spec)
        inits = {k: v for m, _ in maps for k, v in m.items()}
        owner = {k: t for m, t in maps for k in m}
        for node in _all_nodes(proto.graph):
            own = _code_inputs(node)
            if not own or own[0] not in inits:
                continue
            tmap = owner[own[0]]
            codes = inits[own[0]]
            if node.op_type == "MatMulNBits":
                p, block, _n = _nbits(onnx, node)
            else:
                p = code_precision.get(codes.data_type)
                if p is None:
                    raise CheckpointError(f"{node.name} in {file} dequantizes element type {codes.data_type}, not int4/int8 codes")
                block = next((int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == "block_size"), 0)
            nbytes = sum(_stored_bytes(inits[n], bundle) for n in own if n in inits)
            for tid in tmap.ids(codes.name):
                key = str(tid.group)
                if key in found and found[key][:2] != (p, block):
                    raise CheckpointError(f"{key} is stored as {found[key][0].value} block {found[key][1]} and as {p.value} block {block} in {file}: a group has one type")
                found[key] = (p, block, found.get(key, (p, block, 0))[2] + nbytes)
    return found


def _stored_bytes(init, bundle: Path) -> int:
    """Bytes an initializer takes in its file (external data: the length it records)."""
    if init.raw_data:
        return len(init.raw_data)
    ext = {e.key: e.value for e in init.external_data}
    if "length" in ext:
        return int(ext["length"])
    raise CheckpointError(f"initializer {init.name} records no length of its external data: export the bundle again")


class OnnxQuantExporter(OnnxExporter):
    """The ONNX exporter plus the DQ → MatMul rewrite of a quantization plan's weights.

    Constructed with the codes of every planned weight (checkpoint key → `QTensor`): nothing is
    quantized here, the codes are copied.
    """

    def __init__(self, codes: dict[str, QTensor], summary: dict[str, Any] | None = None, ops: OnnxOps = OnnxOps.QDQ) -> None:
        self.codes = dict(codes)
        self.summary = dict(summary or {})
        self.ops = ops

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        """Float groups at the bundle's precision; quantized groups int4/int8 (MatMulNBits: int2
        too), with codes of the planned width for every matrix (their norms and biases stay in
        floating point)."""
        bits = OPS_BITS[self.ops]
        for key, t in released_state_dict(loaded.model).items():
            tid = checkpoint_id(key)
            p = plan_spec(request.plan, tid).precision
            if p.is_float:
                if p is not request.precision:
                    raise InputError(f"the plan gives {tid} {p.value} but the bundle is {request.precision.value}: float groups take the bundle's precision")
                continue
            if p not in bits:
                widths = "/".join(q.value for q in bits)
                raise InputError(f"--format onnx --ops {self.ops.value} stores {widths} codes, not {p.value} ({tid}): use a plan of {widths}/fp32")
            if t.dim() == 2 and (key not in self.codes or self.codes[key].bits != bits[p]):
                raise InputError(f"the plan gives {key} {p.value} but no {bits[p]}-bit codes were given for it: quantize it first")

    def tensor_groups(self, bundle: Path, loaded: LoadedModel) -> tuple:
        return quantized_tensor_groups(bundle, loaded)

    def place_weights(self, proto: Any, sources: dict[str, WeightSource], params: dict[str, torch.Tensor], data: ExternalData) -> None:
        self._done |= place_codes(proto, sources, params, data, self.codes, self._keys, self.ops)

    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        # experts coded as deltas from their meta expert are traced as such (they add the meta
        # expert's pre-activation); their weights become the D their codes were made from
        to_delta_model(loaded, self.codes)
        self._keys = {id(t): k for k, t in loaded.model.lm.state_dict(keep_vars=True).items()}
        self._done: dict[str, str] = {}
        parts = super().write(loaded, out, request)
        done = self._done
        missing = sorted(set(self.codes) - set(done))
        if missing:
            raise CheckpointError(f"{len(missing)} planned weights were not found in the ONNX graphs (first: {missing[0]}): the exporter's graph layout changed; plan those groups in floating point")
        how = f"com.microsoft.MatMulNBits (accuracy_level {MATMULNBITS_LEVEL})" if self.ops is OnnxOps.MATMULNBITS else "DequantizeLinear(blocked, axis 0) -> MatMul"
        toolchain: dict[str, Any] = dict(parts.toolchain, opset=QDQ_OPSET, quantization=how)
        extra = dict(parts.extra, quantization=self.summary | {"quantized_weights": len(done)})
        return ExportParts(parts.roles, parts.graphs, parts.tensor_groups, toolchain, parts.layout, extra)


__all__ = ["MATMULNBITS_LEVEL", "OPS_BITS", "QDQ_OPSET", "OnnxOps", "OnnxQuantExporter", "pack_rows", "place_codes", "quantized_tensor_groups", "read_back"]
