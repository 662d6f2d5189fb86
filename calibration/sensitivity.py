"""Measured sensitivity: ΔKL of answer logits per allocation unit and candidate precision.

For every unit (a TensorId group, or a GGUF layer×projection stack) and every integer candidate
of the backend, only that unit's matrices are replaced by the dequantized codes the quantizer
core produces (the same codes the emitters will write), the kept teacher-forced calibration
sequences are run once, batched, and compared with the fp32 run:

* ΔD = mean over answer positions (answer tokens + EOS) of KL(p_fp32 ‖ p_quant);
* router agreement = share of (real position, MoE layer) whose top-1 expert is unchanged
  (EAQuant: a flipped route sends a token to an expert that never saw such tokens).

The vision tower stays in floating point, so its output is computed once. Codes are cached per
(matrix, bits), so the final plan's codes are those that were measured. Results are cached in the
statistics directory by (statistics key, backend, method, block, symmetric, mode).

`SensitivityMode.PROXY`, for models where a probe per unit and candidate is too slow for 2 cores
(a real-dimension model's probe is a forward of every kept sequence at full size), estimates
both numbers from the output energy the codes add over the calibration tokens,

    e(u, p) = Σ_matrices tr(ΔW H ΔWᵀ),   ΔW = dequantized codes − W,   H = Σ x xᵀ over the tokens that reach W,

scaled by one end-to-end probe per (layer, component): ΔD(u, p) ≈ ΔD(r, p₀) · e(u, p) / e(r, p₀),
and likewise the flipped routes, where r is the class's unit with the largest energy at its
smallest candidate p₀. A unit without a Hessian (the embedding, a lookup table) is probed at every
candidate. Because H counts an expert's own routed tokens, a rarely routed expert's energy is small
in proportion, as its share of the measured ΔD is. Its agreement with the measured mode on the
demo model is reported by `benchmarks/quantization_proxy.py` (docs/QUANTIZATION.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

import torch

from medmoe_edge.allocation import INT_BITS, Backend, Choice, Unit, unit_name
from medmoe_edge.calib_stats import CalibStats
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.model.linear import Linear
from medmoe_edge.ggml_codes import CODE_BITS, PACKABLE, GgmlCodes
from medmoe_edge.ggml_codes import pack as ggml_pack
from medmoe_edge.ggml_codes import nbytes as ggml_nbytes
from medmoe_edge.ggml_codes import quantize as ggml_quantize
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantizer import DEFAULT_BLOCK, GptqFactors, QTensor, QuantizerConfig, packed_bytes, quantize
from medmoe_edge.tensor_ids import checkpoint_id
from medmoe_edge.vocab import Component, Precision, PrecisionKind

from .code_store import CodeStore
from .collect import quantizable_linears
from .teacher import TeacherSequence, image_features

Progress = Callable[[int, int], None]
EMBED_KEY = "model.embed_tokens.weight"
ENERGY_ROWS = 4096  # rows of ΔW per block in `output_energy`


class SensitivityMode(str, Enum):
    """How `quantize` gets each unit's ΔD and router agreement per candidate."""

    MEASURED = "measured"  # one end-to-end probe per unit and candidate
    PROXY = "proxy"  # tr(ΔW H ΔWᵀ) scaled by one probe per (layer, component): see the module docstring


def units_for(loaded: LoadedModel, backend: Backend) -> list[Unit]:
    """The allocation units of a model for a backend, in TensorId order (choices not yet measured)."""
    keys = list(quantizable_linears(loaded))
    if backend.quantize_embed:
        keys.append(EMBED_KEY)
    groups: dict[str, list[str]] = {}
    order: dict[str, object] = {}
    for k in keys:
        tid = checkpoint_id(k)
        name = unit_name(tid, backend.stacked_experts)
        if name != str(tid.group):  # a stack: after the layer's other groups, by projection
            order.setdefault(name, tid.group.sort_key()[:3] + (99, ("fc1", "fc2", "gate", "up", "down").index(tid.proj)))
        else:
            order.setdefault(name, tid.group.sort_key())
        groups.setdefault(name, []).append(k)
    state = loaded.model.lm.state_dict()
    return [
        Unit(n, tuple(ks), sum(state[k].numel() for k in ks), rows=tuple(int(state[k].shape[-1]) for k in ks), component=checkpoint_id(ks[0]).component)
        for n, ks in ((n, groups[n]) for n in sorted(groups, key=lambda n: order[n]))
    ]


def code_bits(precision: Precision) -> int:
    """Bits of one code of an integer or ggml type (what the few-token floor compares)."""
    return INT_BITS[precision] if precision in INT_BITS else CODE_BITS[precision]


def choice_bytes(params: int, precision: Precision, backend: Backend, block: int) -> int:
    """Bytes of `params` weights at `precision` as the backend stores them."""
    if precision.is_float:
        return params * int(precision.bits) // 8
    if precision.kind is PrecisionKind.GGML:
        return ggml_nbytes(params, precision)
    return packed_bytes(params, INT_BITS[precision], block, scale_bytes=backend.scale_bytes, zero_point=backend.zero_point)


@dataclass
class CodeBook:
    """Codes of every (matrix, bits) computed so far, so each is quantized exactly once."""

    stats: CalibStats
    method: QuantMethod
    block: int = DEFAULT_BLOCK
    symmetric: bool = False
    codes: CodeStore = field(default_factory=CodeStore, repr=False)  # by (key, bits); capped and spilled on a full-size model
    factors: GptqFactors = field(default_factory=GptqFactors, repr=False)

    def method_for(self, key: str, precision: Precision | None = None) -> QuantMethod:
        """How the codes of `key` are made (what the plan records): the embedding is a lookup
        table, not a matrix fed by calibrated inputs, so RTN; every other matrix by the book's method."""
        return QuantMethod.RTN if key == EMBED_KEY or key not in self.stats.hessians else self.method

    def get(self, key: str, weight: torch.Tensor, bits: int) -> QTensor:
        cfg = QuantizerConfig(bits, self.block, self.method_for(key), self.symmetric)
        return self.codes.get((key, bits), lambda: quantize(weight, cfg, self.stats.hessians.get(key), self.stats.tokens.get(key, 0), self.factors))

    def codes_for(self, key: str, weight: torch.Tensor, precision: Precision) -> QTensor:
        return self.get(key, weight, INT_BITS[precision])


@dataclass
class GgmlCodeBook:
    """The GGUF backend's codes: ggml's own quantizer (`ggml_codes.quantize`), each matrix rounded
    with its own importance vector (imatrix-rtn: a routed expert's is over its routed tokens) or
    without one (rtn). The embedding never has one (llama-imatrix collects none for a lookup table).

    With GPTQ, the types whose blocks hold the quantizer core's codes (`ggml_codes.PACKABLE`: q4_0,
    q8_0) get GPTQ on each matrix's own Hessian, packed bit for bit; the k-quants (per-sub-block
    scales and mins GPTQ does not produce) stay ggml's imatrix-weighted rounding."""

    stats: CalibStats
    method: QuantMethod
    block: int | None = None  # ggml types fix their own blocks
    codes: CodeStore = field(default_factory=CodeStore, repr=False)  # by (key, precision)
    factors: GptqFactors = field(default_factory=GptqFactors, repr=False)

    def method_for(self, key: str, precision: Precision) -> QuantMethod:
        """How the codes of `key` at `precision` are made (what the plan records)."""
        if key == EMBED_KEY or key not in self.stats.hessians:
            return QuantMethod.RTN
        if self.method is QuantMethod.GPTQ:
            return QuantMethod.GPTQ if precision in PACKABLE else QuantMethod.IMATRIX_RTN
        return self.method

    def codes_for(self, key: str, weight: torch.Tensor, precision: Precision) -> GgmlCodes:
        def make() -> GgmlCodes:
            method = self.method_for(key, precision)
            if method is QuantMethod.GPTQ:
                q = quantize(weight, QuantizerConfig(PACKABLE[precision], 32, QuantMethod.GPTQ, symmetric=True), self.stats.hessians[key], self.stats.tokens.get(key, 0), self.factors)
                return ggml_pack(q, precision)
            use = method is QuantMethod.IMATRIX_RTN
            return ggml_quantize(weight, precision, self.stats.imatrix(key) if use else None)

        return self.codes.get((key, precision), make)


class Probe:
    """The kept calibration sequences, batched, with the fp32 answer distributions and routes.

    A probe of a decoder layer's weights starts from the reference hidden states entering that
    layer (the layers below it are unchanged, so they are not run again), and the lm_head is
    applied to the answer rows only: on a real-dimension model a full pass per probe spent half
    its time on logits of image rows that nothing reads.
    """

    def __init__(self, loaded: LoadedModel, sequences: Sequence[TeacherSequence]) -> None:
        self.loaded = loaded
        self.sequences = list(sequences)
        self.features = [image_features(loaded, s) for s in self.sequences]
        m = loaded.model
        with torch.inference_mode():
            self.batch = m.make_batch(self._rows())
        self.inputs: list[torch.Tensor] = []  # reference hidden states entering each layer, then the last layer's output
        self.ref_routes: dict[int, torch.Tensor] = {}
        self.ref_logp, self.ref_routes = self.run(0, keep=self.inputs)
        self.ref_p = self.ref_logp.exp()

    @classmethod
    def from_stats(cls, loaded: LoadedModel, stats: CalibStats) -> Probe:
        """The probe of the calibration sequences the statistics kept for measuring."""
        return cls(loaded, [TeacherSequence.from_json(s) for s in stats.sequences])

    def kl(self, logp: torch.Tensor) -> float:
        """Mean KL(p_fp32 ‖ p) over the answer positions, of log-probs `logp` from `run`."""
        return max(float((self.ref_p * (self.ref_logp - logp)).sum(-1).mean()), 0.0)

    def _rows(self) -> list[torch.Tensor]:
        m = self.loaded.model
        return [m.splice(s.token_ids, m.lm.model.mm_projector(f)) for s, f in zip(self.sequences, self.features)]

    def run(self, from_layer: int = 0, keep: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(log-probs of the answer positions [A, V], top-1 experts of every real position per MoE
        layer) of the model as it is now, the decoder run from layer `from_layer` on (the layers
        below it keep the reference's hidden states and routes)."""
        m, b = self.loaded.model, self.batch
        with torch.inference_mode():
            # from layer 0 the embeddings are rebuilt: the projector or the embedding may be the probed weights
            h0 = m.make_batch(self._rows()).embeds if from_layer == 0 else self.inputs[from_layer]
            h, routing = m.lm.model(h0, b.positions, b.mask, None, from_layer=from_layer, layer_inputs=keep)
            picks = torch.cat([h[i, s.answer_start - 1 : n - 1] for i, (s, n) in enumerate(zip(self.sequences, b.lengths))])
            valid = b.mask.reshape(-1).bool()
            routes = {**self.ref_routes, **{layer: r.experts[:, 0][valid] for layer, r in routing.items()}}
            return m.lm.lm_head(picks).float().log_softmax(-1), routes

    def measure(self, from_layer: int = 0) -> tuple[float, float]:
        """(mean KL(p_fp32 ‖ p_now) over answer positions, router agreement) of the model as it is now."""
        logp, routes = self.run(from_layer)
        same = sum(int((routes[k] == self.ref_routes[k]).sum()) for k in routes)
        total = sum(v.numel() for v in routes.values())
        return self.kl(logp), same / max(total, 1)


@dataclass(frozen=True)
class Deferred:
    """A weight made when its layer is called (`model.linear.Linear`), not when `swap` puts it in:
    a whole plan measured at once holds its codes, not every planned matrix in fp32 (twice a
    bf16 checkpoint's weights at full size)."""

    make: Callable[[], torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        return self.make()


def swap(loaded: LoadedModel, weights: dict[str, torch.Tensor | Deferred]) -> dict[str, torch.Tensor | Deferred]:
    """Put `weights` (checkpoint key → tensor, or a `Deferred` one) into the model; return what
    they replaced (pass it back to restore the model exactly).

    Tensors are put in as they are, not copied into the old parameters: dequantized codes stay
    exact in fp32 where the model keeps a checkpoint's matrices in bf16 (`load_model(keep_stored=True)`),
    and nothing is cloned. Each takes the model's compute dtype and device unless it is a kept
    parameter being put back. A `Deferred` weight stays deferred in a `Linear` and is made at once
    elsewhere (an embedding)."""
    lm, m, old = loaded.model.lm, loaded.model, {}
    for k, w in weights.items():
        module, _, name = k.rpartition(".")
        owner = lm.get_submodule(module)
        old[k] = getattr(owner, name)
        if isinstance(w, Deferred) and not isinstance(owner, Linear):
            w = w.dequantize()
        if isinstance(w, torch.nn.Parameter) or isinstance(w, Deferred):
            if name in owner._parameters:  # a plain attribute can only take a parameter's name once it is gone
                delattr(owner, name)
            setattr(owner, name, w)
        else:
            setattr(owner, name, torch.nn.Parameter(w.detach().to(device=m.device, dtype=m.dtype), requires_grad=False))
    return old


def cache_name(stats: CalibStats, backend: Backend, method: QuantMethod, block: int, mode: SensitivityMode = SensitivityMode.MEASURED) -> str:
    blob = [stats.key, backend.name, [p.value for p in backend.candidates], backend.zero_point, method.value, block if backend.name != "gguf" else None, 1]
    if mode is not SensitivityMode.MEASURED:  # the measured mode keeps its earlier cache names
        blob.append(mode.value)
    return f"sensitivity-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]}.json"


def _read_cache(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _write_cache(path: Path | None, cached: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)  # a cache_dir the caller named but did not create
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(cached, f, indent=1)
    os.replace(tmp, path)


def first_layer(unit: Unit, num_layers: int) -> int:
    """The first decoder layer whose input a unit's weights change (where its probe starts): its
    layer; `num_layers` (the final norm) for the lm_head; 0 for the projector and the embedding."""
    tids = [checkpoint_id(k) for k in unit.keys]
    if all(t.component is Component.LM_HEAD for t in tids):
        return num_layers
    if all(t.layer is not None for t in tids):
        return min(t.layer for t in tids if t.layer is not None)
    return 0


def probe_one(loaded: LoadedModel, probe: Probe, unit: Unit, weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(ΔD, router agreement) with `weights` (the unit's codes) in the model, which is then restored."""
    old = swap(loaded, weights)
    try:
        return probe.measure(first_layer(unit, loaded.spec.text.num_layers))
    finally:
        swap(loaded, old)


def output_energy(stats: CalibStats, key: str, weight: torch.Tensor, dequantized: torch.Tensor) -> float | None:
    """tr(ΔW H ΔWᵀ): the squared output error the codes add, summed over the calibration tokens
    that reach the matrix (None: no Hessian, e.g. the embedding)."""
    h = stats.hessians.get(key)
    if h is None:
        return None
    h = h.float()  # float32 matmul: a real-dimension down projection is 2048 x 5632 @ 5632²
    total = 0.0
    # a block of rows at a time: the whole of a 100k-row lm_head's ΔW, ΔW·H and their product took
    # 4 GB at once on the real-dimension proxy, the largest transient of `quantize`
    for i in range(0, weight.shape[0], ENERGY_ROWS):
        dw = dequantized[i : i + ENERGY_ROWS].float() - weight[i : i + ENERGY_ROWS].float()
        total += float(((dw @ h) * dw).sum(dtype=torch.float64))
    return total


def offered_types(units: Sequence[Unit], stats: CalibStats, backend: Backend) -> dict[str, list[Precision]]:
    """The quantized types `with_choices` will offer each unit (by name): a type below a
    few-token floor (`CalibStats.min_bits`) is never made, probed nor estimated."""
    out = {}
    for u in units:
        floor = max((stats.min_bits(k) or 0) for k in u.keys)
        out[u.name] = [p for p in backend.candidates if not p.is_float and backend.offers(p, u) and code_bits(p) >= floor]
    return out


def probe_class(unit: Unit) -> tuple:
    """The units that share one end-to-end probe in the proxy: same layer, same component."""
    tid = checkpoint_id(unit.keys[0])
    return (tid.layer, tid.component.value)


def measure(
    loaded: LoadedModel,
    stats: CalibStats,
    backend: Backend,
    book: CodeBook | GgmlCodeBook,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    probe: Probe | None = None,
) -> list[Unit]:
    """Every unit of `backend` with its measured choices (fp32 is ΔD = 0).

    A unit with a few-token linear (`CalibStats.min_bits`) offers no choice below that floor.
    """
    units = units_for(loaded, backend)
    path = cache_dir / cache_name(stats, backend, book.method, book.block) if cache_dir is not None else None
    cached = _read_cache(path)
    state = loaded.model.lm.state_dict()
    offered = offered_types(units, stats, backend)
    todo = [(u, p) for u in units for p in offered[u.name] if f"{u.name}|{p.value}" not in cached]
    probe = probe if probe is not None or not todo else Probe.from_stats(loaded, stats)
    for n, (u, p) in enumerate(todo):
        assert probe is not None
        cached[f"{u.name}|{p.value}"] = list(probe_one(loaded, probe, u, {k: book.codes_for(k, state[k], p).dequantize() for k in u.keys}))
        if progress:
            progress(n + 1, len(todo))
    if todo:
        _write_cache(path, cached)
    return with_choices(units, stats, backend, book, cached)


def estimate(
    loaded: LoadedModel,
    stats: CalibStats,
    backend: Backend,
    book: CodeBook | GgmlCodeBook,
    *,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    probe: Probe | None = None,
) -> list[Unit]:
    """Every unit of `backend` with proxy sensitivities (`SensitivityMode.PROXY`, module docstring).

    The cache also records, under "probes", which unit and candidate each class was probed at
    with its measured (ΔD, agreement) and energy, so a report can show what the scale rests on.
    """
    units = units_for(loaded, backend)
    path = cache_dir / cache_name(stats, backend, book.method, book.block, SensitivityMode.PROXY) if cache_dir is not None else None
    cached = _read_cache(path)
    if "probes" in cached:
        return with_choices(units, stats, backend, book, cached["values"])
    state = loaded.model.lm.state_dict()
    offered = offered_types(units, stats, backend)
    energy: dict[str, float | None] = {}
    steps = sum(len(v) for v in offered.values())
    done = 0
    for u in units:
        for p in offered[u.name]:
            parts = [output_energy(stats, k, state[k], book.codes_for(k, state[k], p).dequantize()) for k in u.keys]
            energy[f"{u.name}|{p.value}"] = None if any(e is None for e in parts) else sum(parts)  # type: ignore[misc]
            done += 1
            if progress:
                progress(done, steps)
    classes: dict[tuple, list[Unit]] = {}
    for u in units:
        if offered[u.name]:
            classes.setdefault(probe_class(u), []).append(u)
    probe = probe if probe is not None or not classes else Probe.from_stats(loaded, stats)
    values: dict[str, list[float]] = {}
    probes: dict[str, dict] = {}

    def run(u: Unit, p: Precision) -> tuple[float, float]:
        assert probe is not None
        return probe_one(loaded, probe, u, {k: book.codes_for(k, state[k], p).dequantize() for k in u.keys})

    for cls, members in classes.items():
        lowest = {u.name: min(offered[u.name], key=lambda p: p.bits) for u in members}
        if any(energy[f"{u.name}|{lowest[u.name].value}"] is None for u in members):
            for u in members:  # no Hessian, no energy: measured end to end at every candidate
                for p in offered[u.name]:
                    values[f"{u.name}|{p.value}"] = list(run(u, p))
            continue
        rep = max(members, key=lambda u: energy[f"{u.name}|{lowest[u.name].value}"] or 0.0)
        p0 = lowest[rep.name]
        kl, agree = run(rep, p0)
        e0 = energy[f"{rep.name}|{p0.value}"] or 0.0
        probes[f"{rep.name}|{p0.value}"] = {"delta_kl": kl, "router_agreement": agree, "energy": e0, "class": list(cls)}
        for u in members:
            for p in offered[u.name]:
                share = (energy[f"{u.name}|{p.value}"] or 0.0) / e0 if e0 > 0 else 0.0
                values[f"{u.name}|{p.value}"] = [kl * share, max(0.0, 1.0 - (1.0 - agree) * share)]
    _write_cache(path, {"values": values, "probes": probes, "energy": energy})
    return with_choices(units, stats, backend, book, values)


def sensitivities(mode: SensitivityMode, *args, **kwargs) -> list[Unit]:
    """`measure` or `estimate`, by mode (same arguments)."""
    return (estimate if mode is SensitivityMode.PROXY else measure)(*args, **kwargs)


def with_choices(units: Sequence[Unit], stats: CalibStats, backend: Backend, book: CodeBook | GgmlCodeBook, measured: dict | None = None) -> list[Unit]:
    """`units` with their choices: every candidate of `backend` the unit can take (`Backend.offers`)
    at or above its few-token floor (`CalibStats.min_bits`), with its bytes and, from `measured` ("unit|precision" →
    [ΔD, router agreement]), its sensitivity. Without `measured` the ΔD are 0: bytes only,
    what the budget check before measuring needs."""
    out = []
    for u in units:
        floor = max((stats.min_bits(k) or 0) for k in u.keys)
        choices = []
        for p in backend.candidates:
            if p.is_float:
                choices.append(Choice(p, QuantMethod.CAST, choice_bytes(u.params, p, backend, book.block), 0.0, 1.0))
            elif backend.offers(p, u) and code_bits(p) >= floor:
                kl, agree = measured[f"{u.name}|{p.value}"] if measured is not None else (0.0, 1.0)
                method = book.method_for(u.keys[0], p)
                choices.append(Choice(p, method, choice_bytes(u.params, p, backend, book.block), kl, agree))
        out.append(replace(u, choices=tuple(choices)))
    return out


__all__ = ["Deferred", "CodeBook", "EMBED_KEY", "GgmlCodeBook", "SensitivityMode", "code_bits", "Probe", "choice_bytes", "estimate", "measure", "output_energy", "probe_class", "probe_one", "first_layer", "sensitivities", "swap", "units_for", "with_choices"]
