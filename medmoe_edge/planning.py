"""`medmoe-edge plan`: which format and precision of a model fits a device, and how fast it would run.

Everything is computed from the model's config (no weights are read) and a `devices.DeviceProfile`.
For every candidate (runtime × precision the device supports) the memory it needs is itemised:

* **LLM weights**: every language-model parameter (all experts, the meta expert, gates, embeddings,
  lm_head; `info.count_params`) × `Precision.bits` / 8. The few F32 norms, biases and routers of a
  GGUF file (< 0.1 % of the parameters) are counted at the bundle's precision.
* **vision tower + projector**: the CLIP layers Med-MoE uses (up to `mm_vision_select_layer`) and the
  projector, at the candidate's float precision (torch, ONNX), or the mmproj's (llama.cpp: f16, f32
  for an f32 bundle).
* **KV cache** = 2 × layers × kv_heads × head_dim × context × bytes of the cache type (the compute
  dtype for torch and ONNX; f16, llama.cpp's default, for llama.cpp).
* **activations**: the peak buffers of one prefill of P = image rows + `PROMPT_TOKENS` tokens:
  P × (4·hidden + 2·ffn) activation values, fp32 attention scores heads × P², logits (every
  position for torch, which returns them all; one row for ONNX and llama.cpp), plus the same for
  the CLIP tower's 577 rows. ggml computes activations in F32.
* **runtime**: the Python process with medmoe-edge and torch imported (measured here), the
  runtime's library and buffers, and a CUDA context on GPUs (constants below). On a discrete GPU
  the process lives in host RAM and is not part of the VRAM total.

A candidate fits when total × (1 + `MARGIN`) ≤ memory − the OS reserve of the profile. The plan
picks the best-fidelity tier that fits (fp32/fp16/bf16 > q8_0 > q6_k > q5_k_m > q4_k_m > q4_0) and,
inside it, the fastest candidate.

Speed (a roofline times measured efficiencies):

* **decode tok/s** = efficiency × bandwidth / bytes read per token, where the bytes are the
  *activated* LLM weights (the routed top-k experts and the meta expert, not the other experts; no
  embedding table, of which one row is read) at the candidate's precision plus the whole KV cache
  at the requested context (the end of the context: a lower bound on speed).
* **TTFT** = vision encode + prefill, each max(FLOPs / (compute × efficiency), weight bytes /
  (bandwidth × decode efficiency)); FLOPs = 2 × parameters × rows + attention (4·T²·H per CLIP
  layer, 2·P²·H causal per decoder layer). FP32 candidates use the FP32 figure, others the FP16
  tensor figure (CPUs: the FP32 one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import canonical_tower_name, read_spec, resolve_model_dir, tower_tensor_used
from .demo import is_demo
from .devices import DeviceProfile, FigureKind, MemoryKind
from .errors import CheckpointError, InputError
from .info import ParamCounts, count_params
from .presets import PRESETS, Preset
from .spec import ModelSpec
from .vocab import ArtifactKind, DeviceKind, Precision
from .weights import TensorInfo

P = Precision
GIB = 2**30

# --- documented constants -------------------------------------------------------------------

PROMPT_TOKENS = 64  # text rows of a typical question with its template, besides the image rows
DEFAULT_CONTEXT = 2048  # capped at the model's max_position_embeddings
SHORT_ANSWER_TOKENS = 128  # the shortest context the plan suggests: image + prompt + this many answer tokens
MARGIN = 0.10  # headroom on top of the itemised total (fragmentation, allocator slack, longer answers)

# measured: RSS of `python -c "import medmoe_edge.cli.app"` (which imports torch) on this machine: 243 MiB
PROCESS_BASE_GIB = 0.25
# the runtime's own library and buffers beyond the itemised ones
RUNTIME_LIBRARY_GIB = {
    "torch": 0.0,  # inside the process base
    "onnxruntime": 0.05,  # measured: +19 MiB RSS on import; plus its CPU arena's slack (estimate)
    "llamacpp": 0.30,  # estimate: llama.cpp's scheduler/graph buffers and mtmd's context beyond the activations
    "tensorrt": 0.30,  # estimate: the TensorRT libraries and the engines' workspace beyond the activations
}
# estimate: a CUDA context with cuBLAS/cuDNN handles and workspaces; on Jetson the CUDA libraries'
# mappings also come out of the shared pool (NVIDIA forum reports: 0.5-1 GB)
CUDA_CONTEXT_GIB = {MemoryKind.DISCRETE: 0.5, MemoryKind.SHARED: 0.8}

# measured: decode tok/s as a share of the read roofline on this machine (toolchain-facts §5, dense
# StableLM-2-1.6B shape, 2 threads). Precisions not measured take the nearest measured figure.
DECODE_EFFICIENCY: dict[tuple[str, Precision], float] = {
    ("llamacpp", P.FP32): 0.89,
    ("llamacpp", P.FP16): 0.88,
    ("llamacpp", P.Q8_0): 0.82,
    ("llamacpp", P.Q6_K): 0.80,  # not measured: q4_k_m's figure (the lowest k-quant share)
    ("llamacpp", P.Q5_K_M): 0.80,  # not measured: q4_k_m's figure
    ("llamacpp", P.Q4_K_M): 0.80,
    ("llamacpp", P.Q4_0): 0.80,  # not measured: q4_k_m's figure
    ("torch", P.FP32): 0.49,
    ("torch", P.BF16): 0.41,
    ("torch", P.FP16): 0.41,  # not measured: bf16's figure
    # §5: one ORT fp32 decode step (4 layers) reached the 35 GB/s roofline, but no whole-model run
    # was measured: ORT is credited with the lowest llama.cpp share
    ("onnxruntime", P.FP32): 0.80,
    ("onnxruntime", P.FP16): 0.80,
    # not measured (no GPU here): TensorRT engines are credited with ONNX Runtime's share
    ("tensorrt", P.FP32): 0.80,
    ("tensorrt", P.FP16): 0.80,
}
# assumed (no GPU to measure on here): share of a datasheet/derived peak that prefill GEMMs reach.
# A measured compute figure (the cpu-x86 profile's GEMM rate) is used as it is.
COMPUTE_EFFICIENCY = 0.5

# what each runtime can run and which artifact it loads
RUNTIME_ARTIFACT = {"torch": ArtifactKind.CHECKPOINT, "onnxruntime": ArtifactKind.ONNX, "llamacpp": ArtifactKind.GGUF, "tensorrt": ArtifactKind.TENSORRT}
RUNTIME_PRECISIONS: dict[str, dict[DeviceKind, tuple[Precision, ...]]] = {
    "torch": {DeviceKind.CUDA: (P.FP32, P.FP16, P.BF16), DeviceKind.CPU: (P.FP32, P.BF16)},
    "onnxruntime": {DeviceKind.CUDA: (P.FP32, P.FP16), DeviceKind.CPU: (P.FP32, P.FP16)},
    "llamacpp": {k: (P.FP32, P.FP16, P.Q8_0, P.Q6_K, P.Q5_K_M, P.Q4_K_M, P.Q4_0) for k in DeviceKind},
    "tensorrt": {DeviceKind.CUDA: (P.FP32, P.FP16), DeviceKind.CPU: ()},
}
PLANNABLE_PRECISIONS = tuple(p for p in Precision if any(p in by_kind for r in RUNTIME_PRECISIONS.values() for by_kind in r.values()))
# fidelity tiers, best first (README/docs: fp16 ONNX and F16 GGUF answer like fp32; q8_0 99.9 %, q4_k_m 99.4 %)
FIDELITY_TIER = {P.FP32: 0, P.FP16: 0, P.BF16: 0, P.Q8_0: 1, P.Q6_K: 2, P.Q5_K_M: 3, P.Q4_K_M: 4, P.Q4_0: 5}


# --- model side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of a model, from its spec alone."""

    counts: ParamCounts
    embed: int  # the token-embedding table (read one row per token)

    @property
    def vision(self) -> int:
        return (self.counts.vision_used or 0) + self.counts.projector


@functools.lru_cache(maxsize=8)
def model_sizes(spec: ModelSpec) -> ModelSizes:
    """Counts of `spec` through `info.count_params` over its tensor shapes, built on torch's meta
    device (no memory, no weights)."""
    import torch

    from .ckpt_writer import full_tower_names
    from .model.medmoe import MedMoELM

    with torch.device("meta"):
        infos = [TensorInfo(k, tuple(v.shape), "meta") for k, v in MedMoELM(spec).state_dict().items()]
    total, activated, projector = count_params(infos, spec.moe)
    tower = [(canon, TensorInfo(n, s, "meta").numel) for n, s in full_tower_names(spec) if (canon := canonical_tower_name(n))]
    v_total = sum(n for _, n in tower)
    v_used = sum(n for c, n in tower if tower_tensor_used(c, spec.vision.layers_used))
    embed = next(t.numel for t in infos if t.name == "model.embed_tokens.weight")
    return ModelSizes(ParamCounts(total, activated, projector, v_total, v_used), embed)


def resolve_model(model: str, vision_tower: str | Path | None = None) -> tuple[str, ModelSpec, bool]:
    """(label, spec, is_preset) for `--model`: 'demo', a checkpoint directory (config.json and the
    tower's config.json suffice), a preset name (phi, stablelm: the released variants at real
    dimensions, no files needed; used when no directory of that name exists), or a hub id.

    Raises:
        CheckpointError: none of those.
    """
    if not is_demo(model) and not Path(model).expanduser().is_dir() and model in {p.value for p in Preset}:
        return f"preset {model}", PRESETS[Preset(model)], True
    try:
        directory = resolve_model_dir(model)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; or name a preset: {', '.join(p.value for p in Preset)}") from None
    spec, _cfg, _tower = read_spec(directory, vision_tower)
    return ("demo" if is_demo(model) else str(directory)), spec, False


# --- plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: int
    detail: str

    def to_json(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "gib": round(self.bytes / GIB, 4), "detail": self.detail}


@dataclass(frozen=True)
class Candidate:
    """One runtime × precision on the device, with its itemised memory and estimated speed."""

    runtime: str
    artifact: ArtifactKind
    precision: Precision
    vision_precision: Precision
    kv_precision: Precision
    items: tuple[MemoryItem, ...]
    usable_bytes: int
    decode_tok_s: float
    ttft_s: float
    ttft_vision_s: float
    ttft_prefill_s: float
    host_bytes: int  # discrete GPUs: the process in host RAM, outside the VRAM total

    @property
    def total_bytes(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def required_bytes(self) -> int:
        return round(self.total_bytes * (1 + MARGIN))

    @property
    def fits(self) -> bool:
        return self.required_bytes <= self.usable_bytes

    @property
    def tier(self) -> int:
        return FIDELITY_TIER[self.precision]

    @property
    def label(self) -> str:
        return f"{self.runtime} {self.artifact.value} {self.precision.value}"

    def reason(self, profile: DeviceProfile) -> str:
        need = f"needs {gib(self.total_bytes)} + {MARGIN:.0%} margin = {gib(self.required_bytes)}"
        has = f"{profile.title} has {profile.memory.value:g} GiB, {profile.os_reserve.value:g} GiB kept by the OS/display: {gib(self.usable_bytes)} usable"
        if self.fits:
            return f"fits: {need}; {has}, {gib(self.usable_bytes - self.required_bytes)} to spare"
        return f"does not fit: {need}; {has} ({gib(self.required_bytes - self.usable_bytes)} short)"

    def to_json(self, profile: DeviceProfile) -> dict:
        return {
            "runtime": self.runtime,
            "format": self.artifact.value,
            "precision": self.precision.value,
            "vision_precision": self.vision_precision.value,
            "kv_cache_type": self.kv_precision.value,
            "memory": [i.to_json() for i in self.items],
            "total_bytes": self.total_bytes,
            "total_gib": round(self.total_bytes / GIB, 4),
            "required_with_margin_gib": round(self.required_bytes / GIB, 4),
            "usable_gib": round(self.usable_bytes / GIB, 4),
            "host_ram_gib": round(self.host_bytes / GIB, 4) if self.host_bytes else None,
            "fits": self.fits,
            "reason": self.reason(profile),
            "estimated_decode_tok_s": round(self.decode_tok_s, 2),
            "estimated_ttft_s": round(self.ttft_s, 3),
            "estimated_ttft_parts_s": {"vision": round(self.ttft_vision_s, 3), "prefill": round(self.ttft_prefill_s, 3)},
        }


@dataclass(frozen=True)
class Plan:
    model: str
    spec: ModelSpec
    is_preset: bool
    profile: DeviceProfile
    context: int
    prefill_tokens: int
    sizes: ModelSizes
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    notes: tuple[str, ...] = field(default=())

    @property
    def summary(self) -> str:
        if self.chosen is not None:
            c = self.chosen
            return (
                f"{c.label} fits {self.profile.name} with margin: {gib(c.total_bytes)} of {gib(c.usable_bytes)} usable; "
                f"about {c.decode_tok_s:.1f} tok/s decode and {c.ttft_s:.2f} s to the first token (estimates)"
            )
        if not self.candidates:
            return f"nothing to plan: {self.profile.name} runs none of the requested runtime/precision combinations"
        smallest = min(self.candidates, key=lambda c: c.total_bytes)
        return f"nothing fits {self.profile.name}: the smallest candidate, {smallest.label}, {smallest.reason(self.profile)}"

    def commands(self) -> list[str]:
        """The commands that produce and run the chosen candidate."""
        c = self.chosen
        if c is None:
            return []
        model = "CHECKPOINT" if self.is_preset else self.model
        dev = "cuda" if self.profile.device_kind is DeviceKind.CUDA else "cpu"
        q = "--question '...' --image IMAGE"
        if c.runtime == "torch":
            return [f"medmoe-edge run --model {model} --device {dev} --dtype {c.precision.torch_name} {q}"]
        if c.runtime == "onnxruntime":
            out = f"medmoe-onnx-{c.precision.value}"
            provider = "cuda" if dev == "cuda" else "cpu"
            return [f"medmoe-edge export --format onnx --model {model} --out {out} --precision {c.precision.value}", f"medmoe-edge run --runtime onnxruntime --model {out} --provider {provider} {q}"]
        if c.runtime == "tensorrt":
            out = f"medmoe-trt-{c.precision.value}"
            # Jetson builds with JetPack's TensorRT on the device; discrete GPUs take TensorRT-RTX engines built anywhere
            target = "jetson" if self.profile.memory_kind is MemoryKind.SHARED else "rtx"
            return [f"medmoe-edge export --format tensorrt --target {target} --model {model} --out {out} --precision {c.precision.value}", f"medmoe-edge run --runtime tensorrt --model {out} --device cuda {q}"]
        quant = {P.FP32: "f32", P.FP16: "f16"}.get(c.precision, c.precision.value)
        out = f"medmoe-gguf-{quant}"
        return [
            f"medmoe-edge export --format gguf --model {model} --out {out} --quant {quant} --mmproj-dtype {'f32' if c.vision_precision is P.FP32 else 'f16'}",
            f"medmoe-edge run --runtime llamacpp --model {out} --device {dev} {q}",
        ]

    def to_json(self) -> dict:
        c = self.sizes.counts
        return {
            "model": self.model,
            "variant": self.spec.variant.value,
            "device": self.profile.to_json(),
            "context": self.context,
            "prefill_tokens": self.prefill_tokens,
            "parameters": {"llm_total": c.llm_total, "llm_activated_per_token": c.llm_activated, "embedding": self.sizes.embed, "projector": c.projector, "vision_used": c.vision_used},
            "margin": MARGIN,
            "fits": self.chosen is not None,
            "summary": self.summary,
            "chosen": None if self.chosen is None else self.chosen.to_json(self.profile),
            "commands": self.commands(),
            "candidates": [x.to_json(self.profile) for x in self.candidates],
            "notes": list(self.notes),
        }


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _bytes(p: Precision) -> float:
    return p.bits / 8


def _candidate(runtime: str, precision: Precision, spec: ModelSpec, sizes: ModelSizes, profile: DeviceProfile, context: int, prefill: int) -> Candidate:
    t, v, c = spec.text, spec.vision, sizes.counts
    gguf = runtime == "llamacpp"
    vision_p = (P.FP32 if precision is P.FP32 else P.FP16) if gguf else precision
    kv_p = P.FP16 if gguf else precision
    act_b = 4 if gguf else _bytes(precision)
    vis_act_b = 4 if gguf else _bytes(vision_p)

    weights = c.llm_total * _bytes(precision)
    vision = sizes.vision * _bytes(vision_p)
    kv = 2 * t.num_layers * t.num_kv_heads * t.head_dim * context * _bytes(kv_p)
    logit_rows, logit_b = (prefill, 4 + act_b) if runtime == "torch" else (1, 4)
    llm_act = prefill * (4 * t.hidden_size + 2 * t.intermediate_size) * act_b + t.num_heads * prefill**2 * 4 + logit_rows * t.vocab_size * logit_b
    rows_v = v.num_patches + 1
    vis_act = rows_v * (4 * v.hidden_size + 2 * v.intermediate_size) * vis_act_b + v.num_heads * rows_v**2 * 4
    items = [
        MemoryItem("LLM weights", round(weights), f"{c.llm_total:,} parameters (all {spec.moe.num_experts} experts + meta) × {precision.bits:g} bits ({precision.value})"),
        MemoryItem("vision tower + projector", round(vision), f"{c.vision_used:,} CLIP + {c.projector:,} projector parameters × {vision_p.bits:g} bits ({vision_p.value}{', mmproj' if gguf else ''})"),
        MemoryItem("KV cache", round(kv), f"2 × {t.num_layers} layers × {t.num_kv_heads} kv heads × {t.head_dim} × {context} tokens × {_bytes(kv_p):g} B ({kv_p.value})"),
        MemoryItem("activations", round(llm_act + vis_act), f"one prefill of {prefill} rows ({spec.image_tokens} image + {prefill - spec.image_tokens} text) and the CLIP pass of {rows_v} rows, {act_b:g} B values, fp32 scores"),
    ]
    cuda = profile.device_kind is DeviceKind.CUDA
    process = (PROCESS_BASE_GIB + RUNTIME_LIBRARY_GIB[runtime]) * GIB
    host_bytes = 0
    if profile.memory_kind is MemoryKind.DISCRETE:
        host_bytes = round(process)
        items.append(MemoryItem("runtime", round(CUDA_CONTEXT_GIB[MemoryKind.DISCRETE] * GIB), f"CUDA context and library workspaces ({CUDA_CONTEXT_GIB[MemoryKind.DISCRETE]:g} GiB, estimate); the process's {PROCESS_BASE_GIB + RUNTIME_LIBRARY_GIB[runtime]:g} GiB is host RAM"))
    else:
        ctx = CUDA_CONTEXT_GIB[profile.memory_kind] if cuda else 0.0
        detail = f"process with torch imported {PROCESS_BASE_GIB:g} GiB (measured) + {runtime} {RUNTIME_LIBRARY_GIB[runtime]:g} GiB" + (f" + CUDA context {ctx:g} GiB (estimate)" if cuda else "")
        items.append(MemoryItem("runtime", round(process + ctx * GIB), detail))
    usable = round((profile.memory.value - profile.os_reserve.value) * GIB)

    # speed
    eff = DECODE_EFFICIENCY[(runtime, precision)]
    bw = profile.bandwidth.value * 1e9
    non_embed_active = c.llm_activated - sizes.embed
    decode = eff * bw / (non_embed_active * _bytes(precision) + kv)

    def rate(p: Precision) -> float:
        fig = profile.fp32_tflops if p is P.FP32 or profile.fp16_tflops is None else profile.fp16_tflops
        return fig.value * 1e12 * (1.0 if fig.kind is FigureKind.MEASURED else COMPUTE_EFFICIENCY)

    vis_flops = 2 * (c.vision_used or 0) * rows_v + 4 * rows_v**2 * v.hidden_size * v.layers_used + 2 * c.projector * spec.image_tokens
    pre_flops = 2 * non_embed_active * prefill + 2 * prefill**2 * t.hidden_size * t.num_layers
    t_vis = max(vis_flops / rate(vision_p), vision / (bw * eff))
    t_pre = max(pre_flops / rate(precision), (c.llm_total - sizes.embed) * _bytes(precision) / (bw * eff))
    return Candidate(runtime, RUNTIME_ARTIFACT[runtime], precision, vision_p, kv_p, tuple(items), usable, decode, t_vis + t_pre, t_vis, t_pre, host_bytes)


def plan(
    spec: ModelSpec,
    profile: DeviceProfile,
    *,
    model: str = "model",
    is_preset: bool = False,
    context: int | None = None,
    precisions: tuple[Precision, ...] | None = None,
    runtimes: tuple[str, ...] | None = None,
) -> Plan:
    """Plan `spec` on `profile`.

    Args:
        context: tokens the KV cache holds (default min(2048, max_position_embeddings)).
        precisions / runtimes: consider only these (default: everything the device supports).
    Raises:
        InputError: a context the model cannot take, or a runtime no profile knows.
    """
    max_ctx = spec.text.max_position_embeddings
    ctx = min(DEFAULT_CONTEXT, max_ctx) if context is None else context
    if not spec.image_tokens < ctx <= max_ctx:
        raise InputError(f"--context {ctx} is outside {spec.image_tokens + 1}..{max_ctx}: the prompt holds {spec.image_tokens} image rows and the model's context is {max_ctx}")
    known = set(RUNTIME_ARTIFACT)
    for r in runtimes or ():
        if r not in known:
            raise InputError(f"--runtime {r!r} is not one plan knows: use {', '.join(sorted(known))}")
    prefill = min(ctx, spec.image_tokens + PROMPT_TOKENS)
    sizes = model_sizes(spec)
    notes: list[str] = []
    cands: list[Candidate] = []
    for runtime in profile.runtimes:
        if runtimes and runtime not in runtimes:
            continue
        for p in RUNTIME_PRECISIONS[runtime][profile.device_kind]:
            if p in profile.precisions and (not precisions or p in precisions):
                cands.append(_candidate(runtime, p, spec, sizes, profile, ctx, prefill))
    if runtimes and not any(r in profile.runtimes for r in runtimes):
        notes.append(f"{profile.name} runs {', '.join(profile.runtimes)}; not {', '.join(runtimes)}")
    if precisions and not cands:
        notes.append(f"{', '.join(p.value for p in precisions)} is not a precision {profile.name} runs with these runtimes ({', '.join(p.value for p in profile.precisions)})")
    fitting = [c for c in cands if c.fits]
    chosen = min(fitting, key=lambda c: (c.tier, -c.decode_tok_s, c.total_bytes)) if fitting else None
    if chosen is None and precisions:
        alt = plan(spec, profile, model=model, is_preset=is_preset, context=ctx, runtimes=runtimes).chosen
        if alt is not None:
            notes.append(f"without --precision, {alt.label} would fit: {gib(alt.total_bytes)} of {gib(alt.usable_bytes)} usable")
    if chosen is None and cands:
        for shorter in (1024, spec.image_tokens + PROMPT_TOKENS + SHORT_ANSWER_TOKENS):
            if shorter < ctx:
                alt = plan(spec, profile, model=model, is_preset=is_preset, context=shorter, precisions=precisions, runtimes=runtimes).chosen
                if alt is not None:
                    notes.append(f"with --context {shorter} (a smaller KV cache) {alt.label} would fit: {gib(alt.total_bytes)} of {gib(alt.usable_bytes)} usable")
                    break
    if profile.memory_kind is MemoryKind.DISCRETE:
        notes.append("VRAM only: loading also needs host RAM for the process and one copy of the weights being read")
    return Plan(model, spec, is_preset, profile, ctx, prefill, sizes, tuple(cands), chosen, tuple(notes))


__all__ = ["MARGIN", "PLANNABLE_PRECISIONS", "Candidate", "MemoryItem", "ModelSizes", "Plan", "model_sizes", "plan", "resolve_model"]
