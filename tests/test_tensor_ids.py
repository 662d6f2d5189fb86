"""TensorId and its tables: every tensor of the demo model, both tiny presets and both real-dimension
configs maps to exactly one TensorId in each format's table, and back; unmapped tensors are named errors."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import onnx
import pytest
import torch

from medmoe_edge.errors import InputError, UnmappedTensor
from medmoe_edge.exporter import stored_groups
from medmoe_edge.export.gguf_io import table_tensors
from medmoe_edge.export.onnx_export import GRAPH_FILES, export_onnx
from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.presets import DEMO, PRESETS, Preset
from medmoe_edge.quant_plan import QuantPlan, QuantRule, QuantSpec
from medmoe_edge.random_init import write_random_checkpoint
from medmoe_edge.tensor_ids import (
    TensorId,
    checkpoint_id,
    checkpoint_map,
    gguf_map,
    gguf_target,
    model_groups,
    onnx_map,
    plan_rule,
    plan_spec,
    released_state_dict,
)
from medmoe_edge.vocab import Component, Precision

SPECS = {"demo": DEMO, **{p.value: PRESETS[p] for p in Preset}}  # tiny-phi, tiny-stablelm, phi, stablelm (real dimensions)


def _meta_model(spec) -> MedMoE:
    with torch.device("meta"):  # shapes and names only: a real-dimension model costs nothing
        return MedMoE(spec)


def test_canonical_strings_parse_and_order():
    cases = {
        "vision": TensorId(Component.VISION),
        "projector": TensorId(Component.PROJECTOR),
        "embed": TensorId(Component.EMBED),
        "layers.3.attn": TensorId(Component.ATTN, 3),
        "layers.3.ffn": TensorId(Component.FFN, 3),
        "layers.3.ffn.down": TensorId(Component.FFN, 3, proj="down"),
        "layers.3.router": TensorId(Component.ROUTER, 3),
        "layers.3.expert.2": TensorId(Component.EXPERT, 3, 2),
        "layers.3.expert.2.fc1": TensorId(Component.EXPERT, 3, 2, "fc1"),
        "layers.3.meta": TensorId(Component.META, 3),
        "layers.3.meta.fc2": TensorId(Component.META, 3, proj="fc2"),
        "layers.3.coefficient": TensorId(Component.COEFFICIENT, 3),
        "final_norm": TensorId(Component.FINAL_NORM),
        "lm_head": TensorId(Component.LM_HEAD),
    }
    for text, tid in cases.items():
        assert str(tid) == text and TensorId.parse(text) == tid
    assert TensorId.parse("layers.3.expert.2.fc1").group == TensorId(Component.EXPERT, 3, 2)
    order = ["vision", "projector", "embed", "layers.0.attn", "layers.0.router", "layers.0.expert.0", "layers.0.expert.0.fc1", "layers.0.expert.1", "layers.0.meta", "layers.1.attn", "layers.1.ffn", "layers.10.attn", "final_norm", "lm_head"]
    assert [str(t) for t in sorted(TensorId.parse(s) for s in reversed(order))] == order
    for bad in ("layers.x.attn", "layers.1.expert", "vision.1", "layers.1.attn.fc1", "layers.1.expert.0.q", "head"):
        with pytest.raises(InputError):
            TensorId.parse(bad)
    with pytest.raises(InputError, match="needs a layer index"):
        TensorId(Component.ROUTER)


@pytest.mark.parametrize("name", list(SPECS))
def test_every_checkpoint_and_gguf_tensor_maps_to_one_tensor_id_and_back(name):
    spec = SPECS[name]
    state = released_state_dict(_meta_model(spec))
    cmap = checkpoint_map(state, spec)  # raises on any key no row (or more than one row) names
    assert cmap.groups() == model_groups(spec)
    for key in state:
        (tid,) = cmap.ids(key)
        assert key in cmap.names(tid) and key in cmap.names(tid.group)
        assert (tid.proj is not None) == (tid.component in (Component.FFN, Component.EXPERT, Component.META))
    # the groups' names partition the state dict
    assert sorted(k for g in cmap.groups() for k in cmap.names(g)) == sorted(state)

    # GGUF: the writers' names (gguf_target), read back through gguf_map
    targets: dict[str, set[TensorId]] = {}
    for key in state:
        t = gguf_target(key)
        targets.setdefault(t.name, set()).add(t.tensor_id)
    gmap = gguf_map(targets, spec)
    assert gmap.groups() == model_groups(spec)
    for gname, ids in gmap.items():
        assert set(ids) == targets[gname]
        assert all(gname in gmap.names(i) for i in ids)
    stacked = [n for n, ids in gmap.items() if len(ids) > 1]
    moe, e = spec.moe.layers, spec.moe.num_experts
    per_layer = 2 if spec.variant.value == "phi" else 3  # up/down (Phi) or gate/up/down weights
    assert len([n for n in stacked if n.endswith(".weight")]) == len(moe) * per_layer
    assert all(len(gmap.ids(n)) == e for n in stacked)
    mm = {n for n in targets if n.startswith(("v.", "mm."))}
    assert {i.group for n in mm for i in gmap.ids(n)} == {TensorId(Component.VISION), TensorId(Component.PROJECTOR)}


def test_gguf_names_and_projections():
    tiny_phi, tiny_slm = PRESETS[Preset.TINY_PHI], PRESETS[Preset.TINY_STABLELM]
    assert gguf_target("model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight").name == "blk.2.ffn_up_exps.weight"
    assert gguf_target("model.layers.2.mlp.meta_moe.down_proj.weight").name == "blk.2.ffn_down_shexp.weight"
    assert gguf_target("model.layers.2.mlp.deepspeed_moe.gate.wg.bias").f32
    assert gguf_target("vision_model.encoder.layers.1.mlp.fc2.weight").name == "v.blk.1.ffn_down.weight"
    assert gguf_target("model.mm_projector.image_spatial_proj.2.bias").mmproj
    assert [str(i) for i in gguf_map(["blk.2.ffn_up_exps.weight"], tiny_phi).ids("blk.2.ffn_up_exps.weight")] == [f"layers.2.expert.{e}.fc1" for e in range(4)]
    assert [str(i) for i in gguf_map(["blk.1.ffn_up.weight"], tiny_slm).ids("blk.1.ffn_up.weight")] == ["layers.1.ffn.up"]
    assert str(gguf_map(["blk.1.ffn_up.weight"], tiny_phi).ids("blk.1.ffn_up.weight")[0]) == "layers.1.ffn.fc1"
    assert str(checkpoint_id("model.layers.1.self_attn.dense.bias")) == "layers.1.attn"
    assert str(checkpoint_id("model.layers.0.mlp.mlp.fc1.weight")) == "layers.0.meta.fc1"  # use_residual's alias of the meta expert


def test_unmapped_tensors_are_named_errors():
    tiny_phi = PRESETS[Preset.TINY_PHI]
    with pytest.raises(UnmappedTensor, match="model.layers.0.mlp.wo.weight is not a Med-MoE tensor"):
        checkpoint_id("model.layers.0.mlp.wo.weight")
    with pytest.raises(UnmappedTensor, match="model.layers.0.mlp.wo.weight"):
        checkpoint_map(["model.embed_tokens.weight", "model.layers.0.mlp.wo.weight"])
    with pytest.raises(UnmappedTensor, match="layers.1.router, which this model does not have"):
        checkpoint_map(["model.layers.1.mlp.deepspeed_moe.gate.wg.weight"], tiny_phi)  # layer 1 is dense
    with pytest.raises(UnmappedTensor, match="GGUF tensor blk.0.ffn_gate.weight is not a phi Med-MoE tensor"):
        gguf_map(["blk.0.ffn_gate.weight"], tiny_phi)  # Phi has no gate projection
    with pytest.raises(UnmappedTensor, match="blk.0.attn_qkv.weight"):
        gguf_map(["blk.0.attn_qkv.weight"], tiny_phi)
    with pytest.raises(UnmappedTensor, match="has no GGUF tensor"):
        gguf_target("model.layers.0.mlp.coefficient.weight")
    # the GGUF walk consumes every tensor of the state dict, or names the one it could not
    state = released_state_dict(_meta_model(tiny_phi))
    with pytest.raises(UnmappedTensor, match="vision_model.post_layernorm.weight .*has no GGUF tensor"):
        table_tensors(state | {"vision_model.post_layernorm.weight": torch.zeros(1)}, tiny_phi)
    del state["model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight"]
    with pytest.raises(UnmappedTensor, match=r"blk.0.ffn_up_exps.weight stacks experts \[0, 1, 2\]"):
        table_tensors(state, tiny_phi)
    # an ONNX initializer that neither its name nor its readers' scopes place
    proto = SimpleNamespace(graph=SimpleNamespace(initializer=[SimpleNamespace(name="onnx::MatMul_7")], node=[SimpleNamespace(name="/text/rotary/MatMul", op_type="MatMul", input=["x", "onnx::MatMul_7"], output=["y"])]))
    with pytest.raises(UnmappedTensor, match="onnx::MatMul_7 of the decoder graph is read by /text/rotary/MatMul, whose scope no row"):
        onnx_map("decoder", proto)
    # a group whose stored parameters differ from the model's
    g = TensorId(Component.EMBED)
    with pytest.raises(UnmappedTensor, match="hold 10 parameters of embed, the model 12"):
        stored_groups("ONNX", [((g,), Precision.FP32, 10)], {g: 12})


def test_plan_rules_over_tensor_ids():
    plan = QuantPlan(QuantSpec(Precision.Q4_K_M), (QuantRule("layers.2.expert.1", QuantSpec(Precision.Q8_0)), QuantRule("layers.*.meta.fc2", QuantSpec(Precision.Q6_K))))
    assert plan_spec(plan, TensorId.parse("layers.2.expert.1.fc1")).precision is Precision.Q8_0  # a group's rule covers its projections
    assert plan_spec(plan, TensorId.parse("layers.0.meta.fc2")).precision is Precision.Q6_K
    assert plan_rule(plan, TensorId.parse("layers.0.meta.fc1")) is None
    assert plan_spec(plan, TensorId.parse("layers.2.expert.0")).precision is Precision.Q4_K_M


@pytest.fixture(scope="module")
def onnx_exports(tiny_ckpts, tmp_path_factory):
    """Real ONNX exports: both tiny presets, the demo model, and a use_residual top-2 model (the coefficient row)."""
    root = tmp_path_factory.mktemp("onnx-ids")
    base = PRESETS[Preset.TINY_STABLELM]
    residual = write_random_checkpoint(replace(base, moe=replace(base.moe, use_residual=True, top_k=2)), root / "residual-ckpt", seed=0)
    sources = {"tiny-phi": (tiny_ckpts[Preset.TINY_PHI], PRESETS[Preset.TINY_PHI]), "tiny-stablelm": (tiny_ckpts[Preset.TINY_STABLELM], base), "demo": ("demo", DEMO), "residual": (residual, replace(base, moe=replace(base.moe, use_residual=True, top_k=2)))}
    out = {}
    for name, (src, spec) in sources.items():
        manifest = export_onnx(src, root / name, Precision.FP16 if name == "tiny-phi" else Precision.FP32)
        out[name] = (root / name, spec, manifest)
    return out


@pytest.mark.parametrize("name", ["tiny-phi", "tiny-stablelm", "demo", "residual"])
def test_every_onnx_initializer_maps_to_one_tensor_id_and_back(name, onnx_exports):
    bundle, spec, manifest = onnx_exports[name]
    groups, shared = set(), set()
    for graph, file in GRAPH_FILES.items():
        proto = onnx.load(str(bundle / file), load_external_data=False)
        omap = onnx_map(graph, proto, spec)
        assert len(omap) == len(proto.graph.initializer)
        for init, ids in omap.items():
            assert ids and all(init in omap.names(i) and init in omap.names(i.group) for i in ids)
            # several ids only where torch.onnx stored equal tensors once (read through Identity nodes)
            assert len(ids) == 1 or all(i.component is Component.ROUTER for i in ids), (init, ids)
            shared.update(init for _ in ids[1:])
        groups |= set(omap.groups())
    assert sorted(groups) == list(model_groups(spec))
    if name == "residual":
        assert TensorId(Component.COEFFICIENT, 0) in groups
    # one initializer per parameter (merged by source, not by value: onnx_weights.merge_copies), so
    # the demo's equal routers (one router file, spec §2.2) are stored per layer, not shared
    assert len(shared) == 0
    # the manifest's groups are these TensorIds, with exactly the model's parameters (checked by the export)
    # one type per group in ONNX: the bundle's, but the router's weight is the fp32 copy `route` makes
    assert [g.name for g in manifest.tensor_groups] == [str(g) for g in model_groups(spec)]
    assert all(g.precision is (Precision.FP32 if g.name.endswith("router") else manifest.precision) for g in manifest.tensor_groups)
