"""`TensorId`: the canonical name of every Med-MoE weight group, and the tables that name it in each format.

A TensorId says which part of the model a tensor belongs to, in one spelling shared by manifests,
quantization plans (`QuantPlan` globs over these strings), tolerances and tools:

    vision                      the CLIP tower (the layers Med-MoE uses, spec §1.1)
    projector                   the mlp2x_gelu projector (§1.2)
    embed                       token embedding
    layers.3.attn               layer 3's attention with its layer norms
    layers.3.ffn                a dense layer's MLP                    (.fc1 / .fc2 / .gate / .up / .down)
    layers.3.router             the MoE gate (§2.3)
    layers.3.expert.2           routed expert 2 of layer 3             (and its projections, e.g. .fc1)
    layers.3.meta               the always-on meta expert (§2.3.6)     (and its projections)
    layers.3.coefficient        use_residual's mixing layer
    final_norm
    lm_head

Projections are spelled as the checkpoint names the modules: fc1/fc2 (Phi) and gate/up/down
(StableLM's gate_proj/up_proj/down_proj). Tables name tensors down to the projection; a manifest
records one group per TensorId without projection (`TensorId.group`), so per expert.

The tables follow gguf-py's TENSOR_NAMES / TensorNameMap: one row per component, a template per
tensor and a comment where a name comes from.

* `TENSOR_NAMES`: released checkpoint key (spec §2.6; for the tower, the key in the CLIP directory
  `mm_image_tower` names) ↔ GGUF tensor name (text file, or mmproj for vision and projector).
  The GGUF writers take their names from here (`gguf_target`).
* `ONNX_NAMES`: the graph, initializer names and node scopes of the ONNX export (`onnx_graphs`).

Template fields: {i} decoder layer, {e} routed expert, {p} projection (in the format's spelling,
`PROJ_SPELLING`), {w} weight|bias, and fields that stay inside one group: {b} CLIP block, {n}
projector Linear (0|2), {attn}/{ln} attention modules and norms, {op} an ONNX op, {rest} anything.

A format's names become a `TensorMap` (names ↔ TensorIds) through `checkpoint_map`, `onnx_map` or
`gguf_map`; every name must be matched by exactly one row, else `UnmappedTensor` names it.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .errors import InputError, UnmappedTensor
from .spec import ModelSpec, Variant
from .vocab import Component

if TYPE_CHECKING:
    from .quant_plan import QuantPlan, QuantSpec

# Components of one decoder layer; those that hold FFN projections; the one with an expert index.
_LAYERED = frozenset({Component.ATTN, Component.FFN, Component.ROUTER, Component.EXPERT, Component.META, Component.COEFFICIENT})
_PROJECTED = frozenset({Component.FFN, Component.EXPERT, Component.META})
PROJECTIONS = ("fc1", "fc2", "gate", "up", "down")  # Phi: fc2(gelu(fc1 x)); StableLM: down(silu(gate x) * up x)
_TOP = {Component.VISION: 0, Component.PROJECTOR: 1, Component.EMBED: 2, Component.FINAL_NORM: 4, Component.LM_HEAD: 5}
_IN_LAYER = {c: n for n, c in enumerate((Component.ATTN, Component.FFN, Component.ROUTER, Component.EXPERT, Component.META, Component.COEFFICIENT))}


@functools.total_ordering
@dataclass(frozen=True)
class TensorId:
    """One weight group (or one projection of an FFN-shaped group); `str()` is its canonical name.

    Ordered as the model runs: vision, projector, embed, layer by layer (attn, ffn, router,
    experts, meta, coefficient), final_norm, lm_head.
    """

    component: Component
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None

    def __post_init__(self) -> None:
        c = self.component
        if (self.layer is not None) != (c in _LAYERED) or (self.layer is not None and self.layer < 0):
            raise InputError(f"a {c.value} TensorId {'needs a layer index' if c in _LAYERED else 'has no layer'} (got layer={self.layer})")
        if (self.expert is not None) != (c is Component.EXPERT) or (self.expert is not None and self.expert < 0):
            raise InputError(f"a {c.value} TensorId {'needs an expert index' if c is Component.EXPERT else 'has no expert'} (got expert={self.expert})")
        if self.proj is not None and (c not in _PROJECTED or self.proj not in PROJECTIONS):
            raise InputError(f"{self.proj!r} is not a projection of a {c.value} TensorId: projections are {', '.join(PROJECTIONS)} of ffn, expert and meta")

    def __str__(self) -> str:
        s = self.component.value if self.layer is None else f"layers.{self.layer}.{self.component.value}"
        if self.expert is not None:
            s += f".{self.expert}"
        return s if self.proj is None else f"{s}.{self.proj}"

    @property
    def group(self) -> TensorId:
        """The manifest group: this id without its projection."""
        return self if self.proj is None else replace(self, proj=None)

    def sort_key(self) -> tuple[int, ...]:
        if self.layer is None:
            return (_TOP[self.component], -1, -1, -1, -1)
        return (3, self.layer, _IN_LAYER[self.component], -1 if self.expert is None else self.expert, -1 if self.proj is None else PROJECTIONS.index(self.proj))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, TensorId):
            return NotImplemented
        return self.sort_key() < other.sort_key()

    @classmethod
    def parse(cls, text: str) -> TensorId:
        """The TensorId of its canonical string ("layers.3.expert.2.fc1" → TensorId(EXPERT, 3, 2, "fc1")).

        Raises:
            InputError: not a TensorId string.
        """
        m = _ID_PATTERN.match(text.strip())
        if m is None:
            raise InputError(f"{text!r} is not a TensorId: use vision, projector, embed, layers.N.attn|ffn|router|meta|coefficient, layers.N.expert.E, final_norm or lm_head (ffn, expert and meta may end in a projection, e.g. .fc1)")
        if m["top"]:
            return cls(Component(m["top"]))
        layer, expert = int(m["layer"]), None if m["expert"] is None else int(m["expert"])
        return cls(Component.EXPERT if expert is not None else Component(m["comp"]), layer, expert, m["proj"])


_ID_PATTERN = re.compile(r"^(?:(?P<top>vision|projector|embed|final_norm|lm_head)|layers\.(?P<layer>\d+)\.(?:(?P<comp>attn|ffn|router|meta|coefficient)|expert\.(?P<expert>\d+))(?:\.(?P<proj>\w+))?)$")


def model_groups(spec: ModelSpec) -> tuple[TensorId, ...]:
    """Every weight group of a model with this spec, in order (what a manifest lists)."""
    ids = [TensorId(Component.VISION), TensorId(Component.PROJECTOR), TensorId(Component.EMBED)]
    moe = set(spec.moe.layers)
    for i in range(spec.text.num_layers):
        ids.append(TensorId(Component.ATTN, i))
        if i not in moe:
            ids.append(TensorId(Component.FFN, i))
            continue
        ids.append(TensorId(Component.ROUTER, i))
        ids += [TensorId(Component.EXPERT, i, e) for e in range(spec.moe.num_experts)]
        ids.append(TensorId(Component.META, i))
        if spec.moe.use_residual:
            ids.append(TensorId(Component.COEFFICIENT, i))
    return (*ids, TensorId(Component.FINAL_NORM), TensorId(Component.LM_HEAD))


# ---------------------------------------------------------------------------------------------
# The tables

# TensorId.proj → its spelling in each format. Checkpoint and ONNX use the module names; GGUF uses
# llama.cpp's FFN roles (LLM_TENSOR_FFN_UP / _DOWN / _GATE), where Phi's fc1 is up and fc2 is down.
PROJ_SPELLING: dict[str, dict[str, str]] = {
    "checkpoint": {"fc1": "fc1", "fc2": "fc2", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "gguf": {"fc1": "up", "fc2": "down", "gate": "gate", "up": "up", "down": "down"},
}
# GGUF spelling → TensorId.proj, which depends on the variant (both write ffn_up).
_GGUF_PROJ = {Variant.PHI: {"up": "fc1", "down": "fc2"}, Variant.STABLELM: {"gate": "gate", "up": "up", "down": "down"}}


@dataclass(frozen=True)
class Names:
    """One tensor of a component: its released checkpoint key and its GGUF name (templates).

    Attributes:
        checkpoint: the key in the checkpoint (or, for the tower, in the CLIP directory).
        gguf: the GGUF tensor name; None: the format does not store it. A GGUF template without
            the checkpoint's {e} is one tensor stacked over the experts ([E, out, in]).
        f32: GGUF keeps this weight in F32 whatever the file type (biases always are): norms,
            the router, CLIP's class and position embeddings.
    """

    checkpoint: str
    gguf: str | None
    f32: bool = False


# One row per component (gguf-py TENSOR_NAMES style). GGUF names: the text model's from the
# patched llama.cpp's LLM_TENSOR_NAMES (src/llama-arch.cpp, archs medmoe-phi2 / medmoe-stablelm);
# the mmproj's from tools/mtmd/clip-impl.h (TN_*), read by clip_graph_llava.
TENSOR_NAMES: dict[Component, tuple[Names, ...]] = {
    # HF CLIPVisionModel keys (transformers' modeling_clip); the checkpoint's own copy of the tower
    # (model.image_tower.*) is discarded on load (§2.6) and never mapped.
    Component.VISION: (
        Names("vision_model.embeddings.class_embedding", "v.class_embd", f32=True),  # TN_CLASS_EMBD
        Names("vision_model.embeddings.patch_embedding.weight", "v.patch_embd.weight"),  # TN_PATCH_EMBD; conv kernel [C,3,p,p]
        Names("vision_model.embeddings.position_embedding.weight", "v.position_embd.weight", f32=True),  # TN_POS_EMBD
        Names("vision_model.pre_layrnorm.{w}", "v.pre_ln.{w}", f32=True),  # sic: HF's spelling; TN_LN_PRE
        Names("vision_model.encoder.layers.{b}.self_attn.q_proj.{w}", "v.blk.{b}.attn_q.{w}"),  # TN_ATTN_Q
        Names("vision_model.encoder.layers.{b}.self_attn.k_proj.{w}", "v.blk.{b}.attn_k.{w}"),
        Names("vision_model.encoder.layers.{b}.self_attn.v_proj.{w}", "v.blk.{b}.attn_v.{w}"),
        Names("vision_model.encoder.layers.{b}.self_attn.out_proj.{w}", "v.blk.{b}.attn_out.{w}"),  # `attn_out`, not the text `attn_output`
        Names("vision_model.encoder.layers.{b}.layer_norm1.{w}", "v.blk.{b}.ln1.{w}", f32=True),
        Names("vision_model.encoder.layers.{b}.layer_norm2.{w}", "v.blk.{b}.ln2.{w}", f32=True),
        # named by meaning (fc1 = up): legacy llava converters swap the two and the loader swaps back
        Names("vision_model.encoder.layers.{b}.mlp.fc1.{w}", "v.blk.{b}.ffn_up.{w}"),
        Names("vision_model.encoder.layers.{b}.mlp.fc2.{w}", "v.blk.{b}.ffn_down.{w}"),
        # in every CLIP directory, unused by Med-MoE (features are taken before it, §1.1); mtmd
        # would apply a v.post_ln to the selected features, so it is never exported
        Names("vision_model.post_layernorm.{w}", None),
    ),
    # §1.2 / §2.6 `model.mm_projector.image_spatial_proj.{0,2}` (not LLaVA-1.5's mm_projector.{0,2});
    # mtmd TN_LLAVA_PROJ "mm.%d.%s": mm.2(gelu(mm.0 x))
    Component.PROJECTOR: (Names("model.mm_projector.image_spatial_proj.{n}.{w}", "mm.{n}.{w}"),),
    Component.EMBED: (Names("model.embed_tokens.weight", "token_embd.weight"),),
    Component.ATTN: (
        Names("model.layers.{i}.input_layernorm.{w}", "blk.{i}.attn_norm.{w}", f32=True),
        Names("model.layers.{i}.self_attn.q_proj.{w}", "blk.{i}.attn_q.{w}"),
        Names("model.layers.{i}.self_attn.k_proj.{w}", "blk.{i}.attn_k.{w}"),
        Names("model.layers.{i}.self_attn.v_proj.{w}", "blk.{i}.attn_v.{w}"),
        Names("model.layers.{i}.self_attn.dense.{w}", "blk.{i}.attn_output.{w}"),  # Phi (with bias)
        Names("model.layers.{i}.self_attn.o_proj.{w}", "blk.{i}.attn_output.{w}"),  # StableLM (no bias)
        Names("model.layers.{i}.post_attention_layernorm.{w}", "blk.{i}.ffn_norm.{w}", f32=True),  # StableLM only: Phi's block is parallel
    ),
    Component.FFN: (Names("model.layers.{i}.mlp.{p}.{w}", "blk.{i}.ffn_{p}.{w}"),),
    # §2.2: the frozen domain router's fc1 became gate.wg (with a bias); z = W x + b in fp32, softmax (§2.3.1-2)
    Component.ROUTER: (Names("model.layers.{i}.mlp.deepspeed_moe.gate.wg.{w}", "blk.{i}.ffn_gate_inp.{w}", f32=True),),
    # DeepSpeed MOELayer.experts.deepspeed_experts (§2.5); llama.cpp's mul_mat_id reads them stacked
    # per layer and projection, so GGUF stores one type per layer x projection for all experts
    Component.EXPERT: (Names("model.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.{w}", "blk.{i}.ffn_{p}_exps.{w}"),),
    Component.META: (
        Names("model.layers.{i}.mlp.meta_moe.{p}.{w}", "blk.{i}.ffn_{p}_shexp.{w}"),  # §2.3.6 always on, weight 1: llama.cpp's shared expert
        # use_residual checkpoints repeat the meta expert as mlp.mlp.* (same storage, §2.6); the loader drops the copy
        Names("model.layers.{i}.mlp.mlp.{p}.{w}", None),
    ),
    # §2.3.6 use_residual only: no llama.cpp graph for the coefficient mix (GGUF export refuses it)
    Component.COEFFICIENT: (Names("model.layers.{i}.mlp.coefficient.{w}", None),),
    Component.FINAL_NORM: (
        Names("model.final_layernorm.{w}", "output_norm.{w}", f32=True),  # Phi
        Names("model.norm.{w}", "output_norm.{w}", f32=True),  # StableLM
    ),
    Component.LM_HEAD: (Names("lm_head.weight", "output.weight"),),  # §1.3: no bias in either variant
}


@dataclass(frozen=True)
class OnnxNames:
    """Where the ONNX export (`onnx_graphs`, torch.onnx TorchScript at opset 17) puts a component.

    Attributes:
        graph: the graph that holds it (vision, embed, decoder).
        initializers: names of parameters stored as they are: the traced wrapper's module path.
        scopes: names of the nodes that read a *derived* initializer. Constant folding replaces a
            parameter by a computed copy named `onnx::<Op>_<n>`: the transposed weight of every
            Linear lowered to MatMul, the fp32 router weight (`wg.weight.float()`), the expanded
            class embedding, the position embedding gathered by constant ids. Such a copy is
            identified by the scope of the node that reads it. TorchScript scopes list the modules
            whose forward ran, so `vision_model`, `encoder` and `deepspeed_moe.experts`
            (containers whose forward is never called) are absent from them, and a module called
            again gets a call number (`fc1_1`), which is dropped before matching.
    """

    graph: str
    initializers: tuple[str, ...]
    scopes: tuple[str, ...]


# One row per component: the wrappers' attribute names (VisionGraph.vision/.projector,
# EmbedGraph.embed_tokens, DecoderGraph.text/.lm_head) prefix the reference module paths.
ONNX_NAMES: dict[Component, OnnxNames] = {
    Component.VISION: OnnxNames("vision", ("vision.vision_model.{rest}",), ("/vision/{rest}",)),
    Component.PROJECTOR: OnnxNames("vision", ("projector.image_spatial_proj.{n}.{w}",), ("/projector/image_spatial_proj/image_spatial_proj.{n}/{op}",)),
    Component.EMBED: OnnxNames("embed", ("embed_tokens.weight",), ("/embed_tokens/{op}",)),
    Component.ATTN: OnnxNames(
        "decoder",
        ("text.layers.{i}.{ln}.{w}", "text.layers.{i}.self_attn.{attn}.{w}"),
        ("/text/layers.{i}/{ln}/{op}", "/text/layers.{i}/self_attn/{attn}/{op}"),
    ),
    Component.FFN: OnnxNames("decoder", ("text.layers.{i}.mlp.{p}.{w}",), ("/text/layers.{i}/mlp/{p}/{op}",)),
    # `moe.route` calls F.linear on wg.weight.float() in the MoE block's own scope: its one Gemm
    Component.ROUTER: OnnxNames("decoder", ("text.layers.{i}.mlp.deepspeed_moe.gate.wg.{w}",), ("/text/layers.{i}/mlp/{op}",)),
    # MoEFFN calls experts[e] directly, so the scope is mlp/deepspeed_experts.{e}
    Component.EXPERT: OnnxNames("decoder", ("text.layers.{i}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.{p}.{w}",), ("/text/layers.{i}/mlp/deepspeed_experts.{e}/{p}/{op}",)),
    Component.META: OnnxNames("decoder", ("text.layers.{i}.mlp.meta_moe.{p}.{w}",), ("/text/layers.{i}/mlp/meta_moe/{p}/{op}",)),
    Component.COEFFICIENT: OnnxNames("decoder", ("text.layers.{i}.mlp.coefficient.{w}",), ("/text/layers.{i}/mlp/coefficient/{op}",)),
    Component.FINAL_NORM: OnnxNames("decoder", ("text.final_layernorm.{w}", "text.norm.{w}"), ("/text/final_layernorm/{op}", "/text/norm/{op}")),
    Component.LM_HEAD: OnnxNames("decoder", ("lm_head.weight",), ("/lm_head/{op}",)),
}

# What each template field matches ({p} is set per format from PROJ_SPELLING).
_FIELDS = {
    "i": r"\d+",
    "e": r"\d+",
    "b": r"\d+",
    "w": "weight|bias",
    "n": "0|2",
    "attn": "q_proj|k_proj|v_proj|dense|o_proj",  # Phi `dense`, StableLM `o_proj` (§2.6)
    "ln": "input_layernorm|post_attention_layernorm",
    "op": r"[A-Za-z]+(?:_\d+)?",  # MatMul, Gemm_1
    "rest": r".+",
}
_FIELD = re.compile(r"\{(\w+)\}")


class _Template:
    """A name template of the tables, matched and filled in."""

    def __init__(self, text: str, spelling: str) -> None:
        self.text = text
        self.fields = tuple(_FIELD.findall(text))
        proj = "|".join(sorted(set(PROJ_SPELLING[spelling].values()), key=len, reverse=True))
        parts = _FIELD.split(text)  # literal, field, literal, ...
        regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{proj if p == 'p' else _FIELDS[p]})" for k, p in enumerate(parts))
        self._re = re.compile(f"^{regex}$")

    def match(self, name: str) -> dict[str, str] | None:
        m = self._re.match(name)
        return None if m is None else m.groupdict()

    def fill(self, fields: Mapping[str, str]) -> str:
        return _FIELD.sub(lambda m: str(fields[m.group(1)]), self.text)


def _tensor_id(component: Component, fields: Mapping[str, str], proj: str | None) -> TensorId:
    layer = int(fields["i"]) if "i" in fields else None
    expert = int(fields["e"]) if "e" in fields else None
    return TensorId(component, layer, expert, proj)


_CKPT_PROJ = {v: k for k, v in PROJ_SPELLING["checkpoint"].items()}


@dataclass(frozen=True)
class _Row:
    component: Component
    names: Names
    checkpoint: _Template
    gguf: _Template | None

    @property
    def stacked(self) -> bool:
        """One GGUF tensor holds every expert's copy of this tensor."""
        return self.gguf is not None and "e" in self.checkpoint.fields and "e" not in self.gguf.fields


_ROWS = tuple(_Row(c, n, _Template(n.checkpoint, "checkpoint"), None if n.gguf is None else _Template(n.gguf, "gguf")) for c, rows in TENSOR_NAMES.items() for n in rows)
_ONNX_ROWS = tuple(
    (c, o.graph, tuple(_Template(t, "checkpoint") for t in o.initializers), tuple(_Template(t, "checkpoint") for t in o.scopes)) for c, o in ONNX_NAMES.items()
)
MMPROJ_COMPONENTS = frozenset({Component.VISION, Component.PROJECTOR})  # in mmproj.gguf; the rest in the text GGUF


def _checkpoint_row(key: str) -> tuple[_Row, dict[str, str], TensorId]:
    hits = [(row, f) for row in _ROWS if (f := row.checkpoint.match(key)) is not None]
    if not hits:
        raise UnmappedTensor(f"tensor {key} is not a Med-MoE tensor: no row of medmoe_edge.tensor_ids.TENSOR_NAMES names it (a checkpoint of another model?)")
    if len(hits) > 1:
        raise UnmappedTensor(f"tensor {key} matches {len(hits)} rows of TENSOR_NAMES ({', '.join(r.names.checkpoint for r, _ in hits)}): the table is ambiguous")
    row, fields = hits[0]
    return row, fields, _tensor_id(row.component, fields, _CKPT_PROJ[fields["p"]] if "p" in fields else None)


def checkpoint_id(key: str) -> TensorId:
    """The TensorId of a released checkpoint key (or a CLIP directory key), down to the projection.

    Raises:
        UnmappedTensor: no row names the key.
    """
    return _checkpoint_row(key)[2]


@dataclass(frozen=True)
class GgufTarget:
    """Where a checkpoint tensor goes in a GGUF bundle.

    Attributes:
        name: the GGUF tensor name.
        mmproj: in mmproj.gguf (vision tower, projector), else in the text model file.
        tensor_id: the checkpoint tensor's TensorId.
        f32: stored F32 whatever the file type (norms, biases, the router, CLIP embeddings).
        stacked: one slice (`tensor_id.expert`) of a tensor stacked over the experts.
    """

    name: str
    mmproj: bool
    tensor_id: TensorId
    f32: bool
    stacked: bool


def gguf_target(key: str) -> GgufTarget:
    """The GGUF tensor a checkpoint tensor is written as (the GGUF writers' names come from here).

    Raises:
        UnmappedTensor: no row names the key, or GGUF does not store it (e.g. use_residual's coefficient).
    """
    row, fields, tid = _checkpoint_row(key)
    if row.gguf is None:
        raise UnmappedTensor(f"tensor {key} ({tid}) has no GGUF tensor: llama.cpp's medmoe architectures cannot use it")
    gguf_fields = dict(fields) | ({"p": PROJ_SPELLING["gguf"][tid.proj]} if tid.proj else {})
    return GgufTarget(row.gguf.fill(gguf_fields), row.component in MMPROJ_COMPONENTS, tid, row.names.f32 or fields.get("w") == "bias", row.stacked)


class TensorMap:
    """The names of one format's tensors ↔ TensorIds, for one model (see the module docstring).

    A name maps to one TensorId, or to several: a GGUF tensor stacked over experts (`ffn_*_exps`:
    one projection of every expert of a layer), or an ONNX initializer the exporter stored once
    for several equal tensors (`onnx_map`).
    """

    def __init__(self, fmt: str, ids: Mapping[str, tuple[TensorId, ...]]) -> None:
        self.format = fmt
        self._ids = dict(ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def items(self) -> Iterable[tuple[str, tuple[TensorId, ...]]]:
        return self._ids.items()

    def ids(self, name: str) -> tuple[TensorId, ...]:
        """The TensorIds a tensor holds.

        Raises:
            UnmappedTensor: a name this map does not hold.
        """
        if name not in self._ids:
            raise UnmappedTensor(f"{self.format} tensor {name} is not in this model's {self.format} tensors")
        return self._ids[name]

    def names(self, tensor_id: TensorId) -> tuple[str, ...]:
        """Every tensor that holds `tensor_id` (a group: any of its projections)."""
        return tuple(n for n, ids in self._ids.items() if any(i == tensor_id or i.group == tensor_id for i in ids))

    def groups(self) -> tuple[TensorId, ...]:
        """Every group the tensors belong to, in order."""
        return tuple(sorted({i.group for ids in self._ids.values() for i in ids}))

    def group_sizes(self, sizes: Mapping[str, int]) -> dict[TensorId, int]:
        """Parameters per group from each tensor's size; a tensor of several ids (stacked) is split evenly over them."""
        out: dict[TensorId, int] = {}
        for name, n in sizes.items():
            ids = self.ids(name)
            for g in (i.group for i in ids):
                out[g] = out.get(g, 0) + n // len(ids)
        return out


def _check_in_model(fmt: str, name: str, ids: tuple[TensorId, ...], spec: ModelSpec | None) -> tuple[TensorId, ...]:
    if spec is not None:
        known = set(model_groups(spec))
        bad = [i for i in ids if i.group not in known]
        if bad:
            raise UnmappedTensor(f"{fmt} tensor {name} maps to {bad[0]}, which this model does not have (layers {spec.text.num_layers}, MoE layers {list(spec.moe.layers)}, {spec.moe.num_experts} experts)")
    return ids


def checkpoint_map(keys: Iterable[str], spec: ModelSpec | None = None) -> TensorMap:
    """Released checkpoint keys (and CLIP directory keys) ↔ TensorIds.

    Raises:
        UnmappedTensor: a key no row names, or (with `spec`) one of a group the model does not have.
    """
    return TensorMap("checkpoint", {k: _check_in_model("checkpoint", k, (checkpoint_id(k),), spec) for k in keys})


def released_state_dict(model: Any) -> dict[str, Any]:
    """A `MedMoE`'s tensors under their released names: the checkpoint's (`model.*`, `lm_head.weight`)
    and the CLIP directory's (`vision_model.*`), exactly the keys `checkpoint.load_model` loads."""
    return {**model.lm.state_dict(), **model.vision.state_dict()}


def gguf_map(names: Iterable[str], spec: ModelSpec) -> TensorMap:
    """GGUF tensor names (text and mmproj files) ↔ TensorIds; a stacked `ffn_*_exps` tensor maps
    to that projection of every expert of its layer.

    Raises:
        UnmappedTensor: a name no row names, or one of a group the model does not have.
    """
    to_proj = _GGUF_PROJ[spec.variant]
    out: dict[str, tuple[TensorId, ...]] = {}
    for name in names:
        found: set[tuple[TensorId, ...]] = set()
        for row in _ROWS:
            fields = row.gguf.match(name) if row.gguf is not None else None
            if fields is None or ("p" in fields and fields["p"] not in to_proj):
                continue
            proj = to_proj[fields["p"]] if "p" in fields else None
            if row.stacked:
                found.add(tuple(_tensor_id(row.component, fields | {"e": str(e)}, proj) for e in range(spec.moe.num_experts)))
            else:
                found.add((_tensor_id(row.component, fields, proj),))
        if len(found) != 1:
            why = "no row of medmoe_edge.tensor_ids.TENSOR_NAMES names it" if not found else f"rows of several TensorIds match it ({sorted(map(str, found))})"
            raise UnmappedTensor(f"GGUF tensor {name} is not a {spec.variant.value} Med-MoE tensor: {why}")
        out[name] = _check_in_model("GGUF", name, found.pop(), spec)
    return TensorMap("GGUF", out)


def onnx_map(graph: str, model: Any, spec: ModelSpec | None = None) -> TensorMap:
    """The initializers of one exported ONNX graph (`onnx.ModelProto`, external data not needed) ↔ TensorIds.

    A parameter stored as it is matches an initializer template; a derived one (`onnx::MatMul_12`)
    is identified by the scopes of the nodes that read it (see `OnnxNames`). The exporter stores
    equal tensors once (torch.onnx deduplicates initializers by value; Med-MoE's routers all come
    from one router file, §2.2) and feeds the other readers through Identity nodes: such a shared
    initializer maps to the TensorId of every group that reads it, and each holds all of it.

    Raises:
        UnmappedTensor: an initializer no row names, or read by a node whose scope no row names,
            or (with `spec`) of a group the model does not have.
    """
    direct: dict[str, list[Any]] = {}
    for node in _all_nodes(model.graph):
        for name in node.input:
            direct.setdefault(name, []).append(node)

    def readers(name: str) -> list[str]:  # through Identity nodes
        out = []
        for node in direct.get(name, []):
            out += readers(node.output[0]) if node.op_type == "Identity" else [node.name]
        return out

    rows = [(c, inits, scopes) for c, g, inits, scopes in _ONNX_ROWS if g == graph]
    out: dict[str, tuple[TensorId, ...]] = {}
    for init in model.graph.initializer:
        named = _onnx_named(init.name, rows)
        found = set() if named is None else {named}
        nodes = readers(init.name)
        for node in nodes:
            tid = _onnx_named(_scope(node), rows, scopes=True)
            if tid is None:
                raise UnmappedTensor(f"ONNX initializer {init.name} of the {graph} graph is read by {node}, whose scope no row of medmoe_edge.tensor_ids.ONNX_NAMES names")
            found.add(tid)
        if not found:
            raise UnmappedTensor(f"ONNX initializer {init.name} of the {graph} graph is not named by medmoe_edge.tensor_ids.ONNX_NAMES and no node reads it")
        out[init.name] = _check_in_model("ONNX", init.name, tuple(sorted(found)), spec)
    return TensorMap("ONNX", out)


def _all_nodes(graph: Any) -> list[Any]:
    """The nodes of an ONNX graph and of the subgraphs in their attributes (an `If` per expert reads
    the expert's initializers from inside its branch)."""
    out = []
    for node in graph.node:
        out.append(node)
        for attr in getattr(node, "attribute", ()):
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out += _all_nodes(sub)
    return out


_CALL_SUFFIX = re.compile(r"_\d+$")


def _scope(node_name: str) -> str:
    """A node name with the call numbers TorchScript gives a module's repeated calls dropped
    (top-2 runs an expert once per slot: `/text/layers.0/mlp/deepspeed_experts.0/fc1_1/MatMul`)."""
    *scopes, op = node_name.split("/")
    return "/".join([_CALL_SUFFIX.sub("", s) for s in scopes] + [op])


def _onnx_named(name: str, rows, *, scopes: bool = False) -> TensorId | None:
    hits = {_tensor_id(c, f, _CKPT_PROJ[f["p"]] if "p" in f else None) for c, inits, sc in rows for t in (sc if scopes else inits) if (f := t.match(name)) is not None}
    if len(hits) > 1:
        raise UnmappedTensor(f"ONNX name {name} matches rows of several TensorIds ({sorted(map(str, hits))}): ONNX_NAMES is ambiguous")
    return hits.pop() if hits else None


# ---------------------------------------------------------------------------------------------
# Plans over TensorIds


def plan_rule(plan: QuantPlan, tensor_id: TensorId) -> QuantSpec | None:
    """The spec of the first rule of `plan` that matches `tensor_id`, None when no rule does.

    A rule matches an id when its glob matches the id's string or its group's, so a rule for
    "layers.3.expert.2" covers that expert's projections.
    """
    names = {str(tensor_id), str(tensor_id.group)}
    return next((r.spec for r in plan.rules if any(fnmatch.fnmatchcase(n, r.pattern) for n in names)), None)


def plan_spec(plan: QuantPlan, tensor_id: TensorId) -> QuantSpec:
    """The spec `plan` gives `tensor_id` (its first matching rule, else the default)."""
    return plan_rule(plan, tensor_id) or plan.default


__all__ = [
    "MMPROJ_COMPONENTS",
    "ONNX_NAMES",
    "PROJECTIONS",
    "PROJ_SPELLING",
    "TENSOR_NAMES",
    "GgufTarget",
    "Names",
    "OnnxNames",
    "TensorId",
    "TensorMap",
    "checkpoint_id",
    "checkpoint_map",
    "gguf_map",
    "gguf_target",
    "model_groups",
    "onnx_map",
    "plan_rule",
    "plan_spec",
    "released_state_dict",
]
