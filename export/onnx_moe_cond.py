"""Make a traced masked MoE expert-sparse: each routed expert runs inside an ONNX `If`.

`MoEFFN._dispatch_masked` traces every routed expert on every row and weights it by w_e, which
is zero on rows that did not choose e. This pass moves the nodes of each expert (scope
`…/mlp/deepspeed_experts.{e}/`) into the `then` branch of an `If` whose condition is
`max(w_e) > 0`: an expert no row chose is skipped, and its output is zeros of the input's shape
(`else` branch), which the weighting multiplies by 0 anyway. An expert coded as a delta from its
meta expert reads the meta expert's pre-activation too, from the main graph, like its weights. For one decoded token exactly the
selected expert(s) run, and no shape depends on the data: TensorRT's parser builds it (its
`IIfConditional` executes one branch), where NonZero (today's scatter dispatch) is rejected by
TensorRT-RTX. Prefill runs each chosen expert on all rows of the pass (masked dense).

The expert's weights stay initializers of the main graph (a subgraph reads outer-scope names),
so TensorId mapping and external data are unchanged.
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict
from typing import Any

_EXPERT_SCOPE = re.compile(r"^(?P<mlp>.*)/deepspeed_experts\.(?P<e>\d+)/")


def _outer_inputs(nodes: list[Any]) -> list[str]:
    """Names that `nodes` (and their subgraphs) read but do not produce, in first-use order."""
    made: set[str] = set()
    seen: dict[str, None] = {}
    for node in nodes:
        for name in node.input:
            if name and name not in made:
                seen.setdefault(name, None)
        made.update(node.output)
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                for name in _outer_inputs(list(attr.g.node)):
                    if name not in made:
                        seen.setdefault(name, None)
    return list(seen)


def wrap_experts_in_if(model: Any) -> int:
    """Rewrite `model` (an `onnx.ModelProto` of a masked-dispatch decoder) in place; returns the experts wrapped.

    Raises:
        ValueError: the graph does not have the shape `_dispatch_masked` traces to (an expert
            with several outputs, or whose output is not weighted by one Mul).
    """
    from onnx import TensorProto, helper

    g = model.graph
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, node in enumerate(g.node):
        m = _EXPERT_SCOPE.match(node.name)
        if m:
            groups[(m["mlp"], int(m["e"]))].append(i)
    if not groups:
        return 0
    initializers = {t.name: t for t in g.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in g.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in g.output}
    producers = {o: node.name for node in g.node for o in node.output}

    replaced: dict[int, list[Any]] = {}
    for (mlp, e), idx in groups.items():
        nodes = [g.node[i] for i in idx]
        members = {id(n) for n in nodes}
        made = {o for n in nodes for o in n.output}
        used_outside = sorted({o for o in made if o in graph_outputs or any(id(c) not in members for c in consumers[o])})
        if len(used_outside) != 1:
            raise ValueError(f"expert {mlp}/deepspeed_experts.{e} has outputs {used_outside} read outside it, expected one")
        y = used_outside[0]
        muls = [c for c in consumers[y] if id(c) not in members]
        if len(muls) != 1 or muls[0].op_type != "Mul":
            raise ValueError(f"the output of expert {mlp}/deepspeed_experts.{e} is not weighted by one Mul")
        weight = next(n for n in muls[0].input if n != y)
        outer = _outer_inputs(nodes)
        # a delta-coded expert (MoEFFN.delta_experts) also reads its meta expert's pre-activation;
        # the one other activation, its input rows, gives the skipped branch its shape
        acts = [n for n in outer if n not in initializers and not producers.get(n, "").startswith(f"{mlp}/meta_moe/")]
        weights = [initializers[n] for n in outer if n in initializers]
        if len(acts) != 1 or not weights:
            raise ValueError(f"expert {mlp}/deepspeed_experts.{e} reads {acts}, expected one activation")
        dtype = weights[0].data_type
        tag = f"{mlp}/expert_if.{e}"

        then_nodes = [_copy_renamed(n, y, f"{y}/then") for n in nodes]
        then_branch = helper.make_graph(then_nodes, f"{tag}/then", [], [helper.make_tensor_value_info(f"{y}/then", dtype, None)])
        zero = helper.make_tensor("zero", dtype, [1], [0])
        else_branch = helper.make_graph(
            [
                helper.make_node("Shape", [acts[0]], [f"{tag}/shape"], name=f"{tag}/else/Shape"),
                helper.make_node("ConstantOfShape", [f"{tag}/shape"], [f"{y}/else"], name=f"{tag}/else/Zeros", value=zero),
            ],
            f"{tag}/else",
            [],
            [helper.make_tensor_value_info(f"{y}/else", dtype, None)],
        )
        replaced[idx[0]] = [
            # max over rows of w_e > 0: some row chose this expert (w_e is 0 elsewhere)
            helper.make_node("Cast", [weight], [f"{tag}/w32"], name=f"{tag}/Cast", to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", [f"{tag}/w32"], [f"{tag}/wmax"], name=f"{tag}/ReduceMax", keepdims=0),
            helper.make_node("Constant", [], [f"{tag}/zero"], name=f"{tag}/Zero", value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Greater", [f"{tag}/wmax", f"{tag}/zero"], [f"{tag}/run"], name=f"{tag}/Greater"),
            helper.make_node("If", [f"{tag}/run"], [y], name=f"{tag}/If", then_branch=then_branch, else_branch=else_branch),
        ]
        for i in idx[1:]:
            replaced[i] = []

    new_nodes = []
    for i, node in enumerate(g.node):
        new_nodes += replaced.get(i, [node])
    del g.node[:]
    g.node.extend(_toposort(new_nodes, {i.name for i in g.input} | set(initializers)))
    return len(groups)


def _copy_renamed(node: Any, old: str, new: str) -> Any:
    from onnx import NodeProto

    out = NodeProto()
    out.CopyFrom(node)
    for i, name in enumerate(out.output):
        if name == old:
            out.output[i] = new
    return out


def _toposort(nodes: list[Any], available: set[str]) -> list[Any]:
    """Nodes in an order where each reads only names made before it (an `If` reads its branches' outer names)."""
    needs = [set(n for n in _outer_inputs([node]) if n not in available) for node in nodes]
    makers: dict[str, int] = {o: i for i, node in enumerate(nodes) for o in node.output}
    waiting: dict[int, set[int]] = {i: {makers[n] for n in need if n in makers} for i, need in enumerate(needs)}
    missing = {n for need in needs for n in need if n not in makers}
    if missing:
        raise ValueError(f"nodes read names nothing makes: {sorted(missing)[:5]}")
    users: dict[int, list[int]] = defaultdict(list)
    for i, deps in waiting.items():
        for d in deps:
            users[d].append(i)
    # Kahn's algorithm, taking the earliest ready node first so the traced order is kept where it can be
    ready = [i for i, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u].discard(i)
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")
    return [nodes[i] for i in order]


__all__ = ["wrap_experts_in_if"]
