"""Workflows behind `medmoe-edge calibrate` and `medmoe-edge quantize`.

calibrate: a question set → teacher-forced statistics (`calib_stats.CalibStats`), cached by the
hashes of the weights, the set and the settings.

quantize: statistics → measured sensitivities (ΔKL per TensorId group and candidate precision,
`calibration.sensitivity`) → an exact multiple-choice knapsack under a byte budget
(`allocation`) → codes and scales once (`quantizer`) → the format's emitter writes a bundle
whose manifest carries the plan.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from dataclasses import dataclass, replace

import torch

from .allocation import BACKENDS, Allocation, Unit, budget_from, check_budget, guard, restrict, solve_routed
from .bundle import Manifest
from .calib_stats import CalibSettings, CalibStats, read_key
from .calibration.code_store import CodeStore, qtensor_bytes
from .calibration.collect import collect, plan_passes, select
from .calibration.delta import DeltaChoice
from .calibration.delta import choose as choose_deltas
from .calibration.routing import RoutedPlan, hold_routes
from .calibration.sensitivity import CodeBook, Deferred, GgmlCodeBook, Probe, SensitivityMode, sensitivities, swap, units_for, with_choices
from .calibration.sets import QuestionSet, check_trace_questions, resolve_set
from .calibration.teacher import prepare
from .checkpoint import LoadedModel, load_model, resolve_model_dir
from .ckpt_writer import atomic_dir, check_new_dir
from .errors import InputError, RuntimeUnavailable
from .llamacpp_lib import require_patched_llama_cpp
from .imaging import PreprocessMode
from .quant_plan import QuantMethod, QuantPlan, QuantRule, QuantSpec
from .ggml_codes import GgmlCodes
from .quantizer import DEFAULT_BLOCK, DeltaQTensor, QTensor
from .tensor_ids import checkpoint_id
from .support_files import checkpoint_source_sha256
from .vocab import OnnxOps, Precision, PrecisionKind

Status = Callable[[str], AbstractContextManager]
Progress = Callable[[int, int], None]

SPLIT_NAMES = ("eval", "calibration", "train")
SENSITIVITY_PER_DOMAIN = 8  # teacher-forced sequences per domain kept for ΔKL measurement


def _quiet(_m: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def resolve_calibration_set(set_name: str, *, status: Status = _quiet) -> QuestionSet:
    """`--set`: a split name, a .jsonl manifest, or a directory holding one (make-data's
    calibration.jsonl, or the only .jsonl in it, with images relative to it).

    Raises:
        InputError: a directory with no or several manifests, or what `resolve_set` refuses.
    """
    p = Path(set_name)
    if p.is_dir() and set_name not in SPLIT_NAMES:  # a split name wins over a folder of that name in the working directory
        if (p / "calibration.jsonl").is_file():
            return resolve_set(str(p / "calibration.jsonl"))
        found = sorted(p.glob("*.jsonl"))
        if len(found) != 1:
            raise InputError(f"--set {p} holds {len(found)} .jsonl question files: pass the one to calibrate on (--set {p}/NAME.jsonl)")
        return resolve_set(str(found[0]))
    return resolve_set(set_name, status=status)


def calibrate(
    model: str | Path,
    out: Path,
    *,
    set_name: str = "calibration",
    domains: Sequence[str] | None = None,
    per_domain: int | None = None,
    sensitivity_per_domain: int = SENSITIVITY_PER_DOMAIN,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    hessian_memory: int | None = None,
    status: Status = _quiet,
    progress: Progress | None = None,
) -> tuple[CalibStats, bool]:
    """Compute (or reuse) the calibration statistics of `model` on a set into the directory `out`.

    `hessian_memory` caps the bytes the Hessian accumulators and the hidden states carried between
    passes may hold at once (None: what is free, less headroom); a model whose Hessians exceed it
    is collected in several passes (`calibration.collect.plan_passes`), with the same result.

    Returns:
        (statistics, True when `out` already held statistics with the same cache key).
    Raises:
        InputError: `out` holds something else (other statistics included), a bad set or domain.
    """
    if per_domain is not None and per_domain < 1:
        raise InputError(f"--per-domain must be at least 1, got {per_domain}")
    model_dir = resolve_model_dir(model)
    qs = resolve_calibration_set(set_name, status=status)
    samples, kept_domains = select(qs.samples, domains, per_domain)
    settings = CalibSettings(qs.name, qs.sha256, kept_domains, per_domain, sensitivity_per_domain, preprocess.value)
    sha = checkpoint_source_sha256(model_dir)
    key = settings.key(sha)
    existing = read_key(out) if Path(out).is_dir() else None
    if existing == key:
        return CalibStats.load(out), True
    if existing is not None:
        raise InputError(f"{out} holds calibration statistics of another model, set, settings or medmoe-edge version: choose a new --out or remove {out}")
    check_new_dir(out)
    with status(f"loading {model}"):
        loaded = load_model(model_dir, keep_stored=True)
    seqs = prepare(loaded, samples, qs.root, preprocess)
    passes = plan_passes(loaded, seqs, hessian_memory if hessian_memory is not None else free_for_hessians(weight_bytes(loaded)))
    with atomic_dir(out) as tmp:
        stats = collect(loaded, seqs, settings, tmp, passes=passes, model_sha256=sha, label=model_dir.name if str(model) != "demo" else "demo", progress=progress)
        stats.save(tmp)
    return CalibStats.load(out), False


HESSIAN_HEADROOM = 1.25  # the forward's activations and the file being written, on top of the accumulators


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of the model's parameters. Counted against the free memory even though they are loaded:
    weights read from safetensors are mapped from the file and take memory only as the forward
    first touches them, which the free memory just after loading does not show yet."""
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def free_for_hessians(weights: int = 0) -> int | None:
    """Bytes calibrate's Hessians may hold at once by default: the free memory less the model's
    `weights` (`weight_bytes`), less headroom. None where the free memory cannot be read: one pass.

    Raises:
        InputError: the weights alone take all of the free memory.
    """
    from .diagnostics import available_memory

    free = available_memory()
    if free is not None and free <= weights:
        raise InputError(
            f"the model's weights ({weights / 2**30:.1f} GiB) take all of the {free / 2**30:.1f} GiB of free memory, leaving none for the calibration statistics: "
            "close other programs or calibrate on a machine with more memory, or give --hessian-memory GIB to try anyway"
        )
    return None if free is None else int((free - weights) / HESSIAN_HEADROOM)


def fp32_fits(loaded: LoadedModel) -> bool:
    """Whether `loaded` keeps narrower matrices (`load_model(keep_stored=True)`) and the whole
    model in fp32 would fit in the free memory (less headroom), so a decode-heavy step (the trace a
    bundle embeds) is better run on an fp32 load than on matrices widened at every token."""
    from .diagnostics import fits_in_memory

    return keeps_narrow(loaded) and fits_in_memory(sum(p.numel() for p in loaded.model.parameters()) * loaded.model.dtype.itemsize) is True


def keeps_narrow(loaded: LoadedModel) -> bool:
    """Whether some of `loaded`'s parameters are stored narrower than it computes (`load_model(keep_stored=True)`)."""
    return any(p.dtype != loaded.model.dtype for p in loaded.model.parameters())


def parse_gib(value: float | None, flag: str) -> int | None:
    """A memory option in GiB (--hessian-memory, --codes-memory) as bytes; None stays None.

    Raises:
        InputError: not a positive, finite number.
    """
    if value is None:
        return None
    if not 0 < value < math.inf:
        raise InputError(f"{flag} must be a positive, finite number of GiB, got {value:g}")
    return int(value * 2**30)


# quantize's candidate codes may take this share of the memory free once the model is loaded; the
# rest is for the probes' activations, a few Hessians and their GPTQ factors, and the picked codes
CODES_SHARE = 0.5


def free_for_codes(weights: int = 0) -> int | None:
    """Bytes quantize's candidate codes may hold at once by default: a share of the free memory
    less the model's `weights` (`weight_bytes`). None where the free memory cannot be read: no cap."""
    from .diagnostics import available_memory

    free = available_memory()
    return None if free is None else max(int((free - weights) * CODES_SHARE), 1)


def candidate_code_bytes(units: Sequence[Unit], block: int) -> int:
    """What the codes of every unit's every quantized choice take in memory (`code_store.qtensor_bytes`
    for integer codes; ggml codes their own bytes)."""
    total = 0
    for u in units:
        for c in u.choices:
            if c.precision.kind is PrecisionKind.INT:
                total += qtensor_bytes(u.params, block)
            elif not c.precision.is_float:
                total += c.nbytes
    return total


# --- quantize -------------------------------------------------------------------------------

FORMATS = ("onnx", "gguf", "tensorrt")
DELTA_BACKENDS = ("onnx", "onnx-matmulnbits", "torch")  # where delta-from-meta coding is written (GGUF would need an architecture patch)
ROUTER_GUARD = 0.995  # least router agreement a unit's choice, and the whole plan less one standard error, may keep (EAQuant)
METHODS = {"gptq": QuantMethod.GPTQ, "rtn": QuantMethod.RTN, "imatrix-rtn": QuantMethod.IMATRIX_RTN}


@dataclass(frozen=True)
class PlanResult:
    """A measured allocation, the plan it makes and the codes of every quantized matrix."""

    allocation: Allocation
    plan: QuantPlan
    codes: dict[str, QTensor | GgmlCodes]  # checkpoint key → codes (QTensor: int backends; GgmlCodes: gguf)
    units: tuple[Unit, ...]
    routing: RoutedPlan | None = None  # the whole plan's router agreement, measured (calibration.routing)
    deltas: tuple[DeltaChoice, ...] = ()  # experts coded both ways, direct and as the delta from their meta expert (calibration.delta)
    spilled: CodeMemory | None = None  # set when the candidate codes did not fit in memory at once


@dataclass(frozen=True)
class CodeMemory:
    """The candidate codes of a plan that did not fit in memory: what they take in all, the cap
    they were held to, and how many were read back from the spill directory instead of being made again."""

    need: int
    cap: int
    read_back: int


# --method when none is given: GPTQ for the integer codes of ONNX and TensorRT; llama.cpp's own
# imatrix-weighted rounding for ggml types (--method gptq packs GPTQ codes into q4_0/q8_0 blocks)
DEFAULT_METHOD = {"onnx": QuantMethod.GPTQ, "tensorrt": QuantMethod.GPTQ, "gguf": QuantMethod.IMATRIX_RTN}


def parse_sensitivity(text: str | None) -> SensitivityMode:
    """--sensitivity: measured (default) or proxy.

    Raises:
        InputError: anything else.
    """
    if text is None:
        return SensitivityMode.MEASURED
    try:
        return SensitivityMode(text.lower())
    except ValueError:
        raise InputError(f"--sensitivity {text!r} is not a sensitivity mode: use {' or '.join(m.value for m in SensitivityMode)}") from None


def check_request(fmt: str, *, budget_mb: float | None, avg_bits: float | None) -> None:
    """What `quantize` can check before reading anything: the format and the budget's form.

    Raises:
        InputError: an unknown format; neither or both of --budget-mb and --avg-bits; a value
            that is not positive.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} cannot be quantized: use --format {', '.join(FORMATS)}")
    if (budget_mb is None) == (avg_bits is None):
        raise InputError("give exactly one of --budget-mb and --avg-bits")
    value = budget_mb if budget_mb is not None else avg_bits
    if value is None or not value > 0:
        raise InputError(f"{'--budget-mb' if budget_mb is not None else '--avg-bits'} must be positive, got {value}")


def parse_method(text: str | None, fmt: str = "onnx") -> QuantMethod:
    """--method: gptq, rtn or imatrix-rtn (every format takes each; for GGUF, gptq packs GPTQ codes
    into q4_0/q8_0 and leaves the k-quants to ggml's imatrix rounding); None: the format's default.

    Raises:
        InputError: anything else.
    """
    if text is None:
        return DEFAULT_METHOD.get(fmt, QuantMethod.GPTQ)
    if text.lower() not in METHODS:
        raise InputError(f"--method {text!r} is not a quantization method: use one of {', '.join(METHODS)}")
    return METHODS[text.lower()]


TENSORRT_BLOCKS = (32, 64, 128)  # TensorRT's blocked int4 weight-only quantization (32 and 128 built here, export/tensorrt_quant.py)


def check_block(fmt: str, block: int | None, backend: str | None = None) -> int:
    """--block: weights per scale block of the integer codes (default 32); ggml types fix their own.

    Raises:
        InputError: a block for --format gguf, one TensorRT's int4 does not take, or one that is not positive.
    """
    if block is None:
        return DEFAULT_BLOCK
    if fmt == "gguf":
        raise InputError("--block does not apply to --format gguf: ggml types fix their own blocks (32 weights for q8_0, 256 for the k-quants); drop --block")
    if block < 1:
        raise InputError(f"--block must be at least 1, got {block}")
    if fmt == "tensorrt" and block not in TENSORRT_BLOCKS:
        raise InputError(f"--block {block} is not a TensorRT int4 block: use one of {', '.join(map(str, TENSORRT_BLOCKS))}")
    if backend == OnnxOps.MATMULNBITS.backend and (block < 16 or block & (block - 1)):
        raise InputError(f"--block {block} is not a MatMulNBits block: use a power of two of at least 16 (e.g. 32)")
    return block


OPS = tuple(o.value for o in OnnxOps)


def check_delta(fmt: str, delta_from_meta: bool | None) -> bool:
    """Whether to code experts as deltas from their meta expert: by default for ONNX bundles, where
    it is written; asked for with another format, a one-line error."""
    if delta_from_meta is None:
        return fmt == "onnx"
    if delta_from_meta and fmt != "onnx":
        why = "llama.cpp stores a layer's experts stacked in one tensor and would need an architecture patch" if fmt == "gguf" else "its engines are not built with it yet"
        raise InputError(f"--delta-from-meta is written for --format onnx only ({fmt}: {why}): drop the flag or use --no-delta-from-meta")
    return delta_from_meta


def check_ops(fmt: str, ops: str | None) -> str:
    """--ops: qdq (DequantizeLinear → MatMul, the default) or matmulnbits (ONNX Runtime's own
    MatMulNBits nodes, 2-bit codes too); ONNX bundles only. Returns the allocation backend's name.

    Raises:
        InputError: another value, or --ops for another format.
    """
    if ops is None:
        return fmt
    if fmt != "onnx":
        raise InputError(f"--ops applies to --format onnx, not {fmt}: drop --ops")
    if ops.lower() not in OPS:
        raise InputError(f"--ops {ops!r} is not one of {', '.join(OPS)}")
    return OnnxOps(ops.lower()).backend


def check_types(fmt: str, types: str | None, backend: str | None = None) -> tuple[Precision, ...] | None:
    """--types: the quantized types a plan may choose from, comma-separated (e.g. q4_k,q6_k,q8_0),
    among the format's own (`allocation.BACKENDS`; `backend`: the one --ops picked). Floating
    point, the plan's default, is always allowed. None: every type of the format.

    Raises:
        InputError: an empty list, or a type the format (with its --ops) does not store.
    """
    if types is None:
        return None
    b = BACKENDS[backend or fmt]
    where = f"--format {fmt}" + next((f" --ops {o.value}" for o in OnnxOps if o.backend == b.name and b.name != fmt), "")
    offered = ", ".join(p.value for p in b.candidates if not p.is_float)
    names = [t.strip() for t in types.split(",") if t.strip()]
    if not names:
        raise InputError(f"--types is empty: list some of {offered} (comma-separated)")
    picked = []
    for name in names:
        p = next((c for c in b.candidates if c.value == name.lower()), None)
        if p is None:
            raise InputError(f"--types {name!r} is not a type of {where}: use some of {offered}, comma-separated (floating point is always allowed)")
        picked.append(p)
    return tuple(dict.fromkeys(picked))


def load_stats(stats_dir: Path, model_dir: Path, model: str | Path, set_name: str | None = None) -> CalibStats:
    """The statistics of `stats_dir`, refused when they were computed from another checkpoint or
    on another calibration set: `set_name` when given, else the set the statistics record, whose
    manifest must still hash as it did when they were computed.

    Raises:
        InputError: no statistics there, another model, another (or a changed) set.
    """
    stats = CalibStats.load(stats_dir)
    stats.check_model(checkpoint_source_sha256(model_dir), str(model), stats_dir)
    recorded = stats.settings.set_name
    try:
        qs = resolve_calibration_set(set_name if set_name is not None else recorded)
    except InputError as e:
        if set_name is not None:
            raise
        raise InputError(f"--stats {stats_dir} was computed on calibration set {recorded!r}, which cannot be read now ({e}): restore it, or run `medmoe-edge calibrate --model {model} --set SET --out NEW_STATS`") from None
    if set_name is not None:
        stats.check_set(qs.sha256, set_name, stats_dir)
    elif qs.sha256 != stats.settings.set_sha256:
        raise InputError(f"--stats {stats_dir} was computed on calibration set {recorded!r}, whose manifest has changed since (SHA-256 differs): run `medmoe-edge calibrate --model {model} --set {recorded} --out NEW_STATS` and pass that")
    return stats


def make_plan(
    loaded: LoadedModel,
    stats: CalibStats,
    backend: str,
    *,
    method: QuantMethod = QuantMethod.GPTQ,
    budget_mb: float | None = None,
    avg_bits: float | None = None,
    block: int = DEFAULT_BLOCK,
    router_guard: float = ROUTER_GUARD,
    sensitivity: SensitivityMode = SensitivityMode.MEASURED,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    delta_from_meta: bool = False,
    types: Sequence[Precision] | None = None,
    codes_memory: int | None = None,
    spill_dir: Path | None = None,
) -> PlanResult:
    """Measure (or, `SensitivityMode.PROXY`, estimate) sensitivities (cached in `cache_dir`),
    solve the knapsack and quantize the chosen groups. With `delta_from_meta` (ONNX and PyTorch
    backends), each quantized routed expert's input projections are coded as the delta from the
    meta expert's where that adds less output error at the same bytes (`calibration.delta`).
    `types` (`check_types`) narrows the quantized types the knapsack may pick.
    `codes_memory` caps the bytes the candidate codes hold at once (None: `free_for_codes`); past
    it they are spilled to a temporary directory in `spill_dir` (None: the system's), removed after.

    The budget covers the planned matrices (LLM matrices and projector, scales included); norms,
    biases, routers and the vision tower stay in floating point outside it.

    Raises:
        InputError: a budget below the smallest types, an unknown backend, candidate codes that
            neither the memory cap nor the disk beside `spill_dir` can hold.
    """
    if backend not in BACKENDS:
        raise InputError(f"no allocation backend {backend!r}: use one of {', '.join(BACKENDS)}")
    b = BACKENDS[backend]
    book = GgmlCodeBook(stats, method) if b.name == "gguf" else CodeBook(stats, method, block, symmetric=not b.zero_point)
    offered = with_choices(units_for(loaded, b), stats, b, book)  # bytes only: the budget is checked before minutes of measuring
    sized = restrict(offered, types)
    also = f", or allow smaller types than --types {','.join(p.value for p in types)}" if types is not None else ""
    if b.name == "onnx":  # DequantizeLinear has no 2-bit codes that ONNX Runtime fuses; MatMulNBits has
        also += ", or write ONNX Runtime-only MatMulNBits with --ops matmulnbits (int2 codes, smaller plans)"
    check_budget(sized, budget_from(sized, budget_mb=budget_mb, avg_bits=avg_bits), also)
    # the candidate codes (every unit at every quantized type) are made once and read again by the
    # sensitivities, the router check and the picks; where they would not fit in memory they are
    # held to a cap and the rest read back from a spill directory (calibration.code_store)
    need = candidate_code_bytes(offered, book.block or DEFAULT_BLOCK)  # every type is measured, --types or not
    cap = codes_memory if codes_memory is not None else free_for_codes(weight_bytes(loaded))
    spilling = cap is not None and need > cap
    with contextlib.ExitStack() as stack:
        if spilling:
            where = Path(spill_dir or tempfile.gettempdir())
            free = shutil.disk_usage(where).free
            if free < need:
                raise InputError(
                    f"the candidate codes ({need / 2**30:.2f} GiB) do not fit in the {cap / 2**30:.2f} GiB of memory they may hold, and {where} has only {free / 2**30:.2f} GiB free to hold the rest: "
                    "free disk space there (quantize writes them beside --out), or raise --codes-memory if more memory is free"
                )
            book.codes = CodeStore(cap, Path(stack.enter_context(tempfile.TemporaryDirectory(dir=where, prefix=".medmoe-codes-"))))
        # one probe of the kept calibration sequences serves the sensitivities and the whole-plan router check
        probe = Probe.from_stats(loaded, stats) if stats.sequences and loaded.spec.moe.layers else None
        measured = restrict(sensitivities(sensitivity, loaded, stats, b, book, cache_dir=cache_dir, progress=progress, probe=probe), types)
        units = tuple(replace(u, choices=guard(u.choices, router_guard)) for u in measured)
        budget = budget_from(units, budget_mb=budget_mb, avg_bits=avg_bits)
        smallest = sum(min(c.nbytes for c in u.choices) for u in units)
        if smallest > budget:  # the bytes alone fitted (checked above): the router guard dropped the small types
            held = [u.name for u, m in zip(units, measured) if min(c.nbytes for c in u.choices) > min(c.nbytes for c in m.choices)]
            params = max(sum(u.params for u in units), 1)
            raise InputError(
                f"the budget {budget / 1e6:.3f} MB is below the smallest plan that keeps router agreement >= {router_guard:.1%} ({smallest / 1e6:.3f} MB, {8 * smallest / params:.2f} bits per weight; "
                f"{len(held)} group{' flips' if len(held) == 1 else 's flip'} routes at their smallest type, first {held[0]}): raise --budget-mb to at least {math.ceil(smallest / 1e3) / 1e3:.3f} or --avg-bits to at least {math.ceil(800 * smallest / params) / 100:.2f}"
            )
        # the guard holds per unit, the plan's summed flips are held to the same share
        # (allocation.solve_routed), and the whole plan, measured, too (calibration.routing)
        state = loaded.model.lm.state_dict()
        routed = None
        if probe is not None:
            def deferred(u: Unit, c) -> dict[str, Deferred]:  # each matrix made from its codes while its layer runs
                return {k: Deferred(lambda k=k, p=c.precision: book.codes_for(k, state[k], p).dequantize()) for k in u.keys}

            routed = hold_routes(loaded, probe, units, budget, 1.0 - router_guard, deferred, estimated=sensitivity is SensitivityMode.PROXY)
            alloc, units = routed.allocation, routed.units
        else:  # nothing to measure a plan's routes on
            alloc = solve_routed(units, budget, 1.0 - router_guard)
        rules, codes = [], {}
        picked: dict[str, Precision] = {}  # checkpoint key → the type its group was given
        for u, c in zip(units, alloc.picks):
            if c.precision is b.float_precision:  # the plan's default
                continue
            note = {"delta_kl": c.delta, "router_agreement": c.router_agreement, "sensitivity": sensitivity.value, "bytes": c.nbytes, "params": u.params, "calibration_set_sha256": stats.settings.set_sha256}
            # a float pick (GGUF's fp16) is a rule too, so the file stores what the budget counted; ggml
            # types fix their own block (32 for q8_0, 256 for k-quants): no group size of ours
            rules.append(QuantRule(u.name, QuantSpec(c.precision, c.method, block if c.precision.kind is PrecisionKind.INT else None), note))
            if c.precision.is_float:
                continue
            for k in u.keys:
                codes[k] = book.codes_for(k, state[k], c.precision)
                picked[k] = c.precision
        deltas: list[DeltaChoice] = []
        if delta_from_meta:
            if b.name not in DELTA_BACKENDS:
                raise InputError(f"delta-from-meta coding is written for --format onnx only, not the {b.name} backend: leave it off")
            codes, deltas = choose_deltas(loaded, stats, codes, book.factors)
            # a rule per delta-coded projection, ahead of its expert's group rule (first match wins)
            # to 6 digits: float32 matmuls reorder their sums with the thread count, and a plan is compared whole
            energy = {f"layers.{d.layer}.expert.{d.expert}": {"direct": float(f"{d.direct:.6g}"), "delta": float(f"{d.delta:.6g}")} for d in deltas}
            first = [
                QuantRule(
                    str(checkpoint_id(k)),
                    QuantSpec(picked[k], q.method, q.block, base=str(checkpoint_id(q.base_key))),
                    {"delta_from_meta": True, "output_energy": energy[str(checkpoint_id(k).group)]},  # the expert's, both codings, over its routed tokens
                )
                for k, q in codes.items()
                if isinstance(q, DeltaQTensor)
            ]
            rules = first + rules
        plan = QuantPlan(QuantSpec(b.float_precision), tuple(rules), calibration=stats.key)
        return PlanResult(alloc, plan, codes, units, routed, tuple(deltas), CodeMemory(need, cap, book.codes.read_back) if spilling else None)


def fake_quantize(loaded: LoadedModel, codes: dict[str, QTensor]) -> dict[str, torch.Tensor]:
    """The PyTorch oracle: put the dequantized codes into the reference model; returns the
    parameters they replaced (pass them to `restore`)."""
    return swap(loaded, {k: q.dequantize() for k, q in codes.items()})


def restore(loaded: LoadedModel, original: dict[str, torch.Tensor]) -> None:
    swap(loaded, original)


def _embedded_trace(model_dir: Path, questions: int, loaded: LoadedModel | None = None):
    """The eval trace every export embeds (so `verify BUNDLE` works without the checkpoint), of
    `loaded` when given (the reference as `make_plan` left it), else of the checkpoint loaded again."""
    from .api import Pipeline, load
    from .runtimes.torch_runtime import TorchRuntime
    from .trace import record, trace_questions

    samples, root = resolve_set("eval")
    with Pipeline(TorchRuntime(loaded)) if loaded is not None else load(model_dir, runtime="torch") as ref:
        qs = trace_questions(ref, samples[:questions], root, PreprocessMode.PAD)  # `questions` checked against the split by quantize_bundle
        return record(ref.runtime, qs, source_sha256=checkpoint_source_sha256(model_dir), max_new_tokens=32, preprocess=PreprocessMode.PAD.value, set_name="eval")


def quantize_bundle(
    model: str | Path,
    fmt: str,
    stats_dir: Path,
    out: Path,
    *,
    budget_mb: float | None = None,
    avg_bits: float | None = None,
    method: QuantMethod | None = None,
    block: int | None = None,
    trace_questions: int = 16,
    set_name: str | None = None,
    moe_dispatch: str | None = None,
    ops: str | None = None,
    sensitivity: SensitivityMode = SensitivityMode.MEASURED,
    delta_from_meta: bool | None = None,
    types: str | None = None,
    codes_memory: int | None = None,
    status: Status = _quiet,
    progress: Progress | None = None,
) -> tuple[Manifest, PlanResult]:
    """`medmoe-edge quantize`: statistics → plan → codes → a bundle of `fmt` whose manifest carries the plan.

    Raises:
        InputError: an unknown or unimplemented format, a bad budget (neither or both, not positive,
            below the smallest types), a type the format does not store in `types`, a `codes_memory`
            (bytes the candidate codes may hold at once, `make_plan`) that is not positive, a non-empty
            or unwritable `out`, statistics of another model or set, `trace_questions` (the
            embedded trace's eval questions; 0: none) below 0 or above the split's. Every one of
            them before anything is written.
    """
    check_request(fmt, budget_mb=budget_mb, avg_bits=avg_bits)
    if codes_memory is not None and codes_memory <= 0:
        raise InputError(f"--codes-memory must be a positive number of GiB, got {codes_memory / 2**30:g}")
    method = parse_method(None if method is None else method.value, fmt)
    backend = check_ops(fmt, ops)
    allowed = check_types(fmt, types, backend)
    delta_from_meta = check_delta(fmt, delta_from_meta)
    block = check_block(fmt, block, backend)
    from .export.gguf_quant import GgufQuantExporter
    from .export.onnx_quant import OnnxQuantExporter
    from .export.tensorrt_quant import TensorRTQuantExporter

    exporter_cls = {"gguf": GgufQuantExporter, "onnx": OnnxQuantExporter, "tensorrt": TensorRTQuantExporter}[fmt]
    given = {"--moe-dispatch": moe_dispatch} if moe_dispatch is not None else {}
    exporter_cls.request(given)  # the format's own flags, checked before any work
    ok, why = exporter_cls.availability()
    if not ok:
        raise RuntimeUnavailable(why)
    if fmt == "gguf":  # ggml's quantizer lives in the patched llama-cpp-python: say so before minutes of measuring
        require_patched_llama_cpp()
    model_dir = resolve_model_dir(model)
    check_new_dir(out)
    check_trace_questions(trace_questions, status)  # before minutes of planning, after which the trace is recorded
    stats = load_stats(stats_dir, model_dir, model, set_name)

    with status(f"loading {model}"):
        loaded = load_model(model_dir, keep_stored=True)
    with status(f"{method.value} codes at every candidate type, {'estimated' if sensitivity is SensitivityMode.PROXY else 'measured'} sensitivities, allocation"):
        result = make_plan(
            loaded, stats, backend, method=method, budget_mb=budget_mb, avg_bits=avg_bits, block=block, sensitivity=sensitivity, cache_dir=stats_dir, progress=progress, delta_from_meta=delta_from_meta, types=allowed,
            codes_memory=codes_memory, spill_dir=Path(out).absolute().parent,  # beside the bundle, on the disk the user chose for it
        )
    # the trace is recorded on the model the plan was made with (every planned weight put back:
    # `swap` restores the very parameters) unless it keeps bf16 matrices and the fp32 model fits:
    # decoding widens every matrix at every token (2.4x the time on the real-dimension proxy). The
    # exporter loads the checkpoint itself, after this one is let go (not held twice)
    on = None if fp32_fits(loaded) else loaded
    del loaded  # `on` holds it where the trace needs it
    gc.collect()
    trace = None
    if trace_questions:
        how = " on the model as stored (its fp32 weights do not fit in memory: slower)" if on is not None and keeps_narrow(on) else ""
        with status(f"recording the reference trace ({trace_questions} eval questions) the bundle embeds{how}"):
            trace = _embedded_trace(model_dir, trace_questions, on)
    del on
    gc.collect()
    a = result.allocation
    summary = {
        "backend": backend,
        "method": method.value,
        "block": None if fmt == "gguf" else block,
        "sensitivity": sensitivity.value,
        "types": None if allowed is None else [p.value for p in allowed],  # None: every type of the format
        "symmetric": not BACKENDS[backend].zero_point,
        "quantizer": ("ggml_quantize_chunk (llama.cpp)" + ("; q4_0/q8_0: medmoe_edge.quantizer GPTQ codes, packed" if method is QuantMethod.GPTQ else "")) if fmt == "gguf" else "medmoe_edge.quantizer",
        "budget_bytes": a.budget,
        "predicted_bytes": a.nbytes,
        "predicted_delta_kl": a.predicted_delta,
        "bits_per_weight": a.bits_per_weight,
        "planned_params": a.params,
        "calibration": {"key": stats.key, "set": stats.settings.set_name, "set_sha256": stats.settings.set_sha256, "domains": list(stats.settings.domains)},
    }
    if delta_from_meta:
        summary["delta_from_meta"] = {
            "compared": len(result.deltas),
            "coded_as_delta": [f"layers.{d.layer}.expert.{d.expert}" for d in result.deltas if d.chosen],
            "output_energy": {f"layers.{d.layer}.expert.{d.expert}": {"direct": d.direct, "delta": d.delta} for d in result.deltas},
        }
    if result.routing is not None:  # the whole plan's routes, measured on the probe sequences (calibration.routing)
        r = result.routing
        summary["router_check"] = {
            "sequences": len(stats.sequences), "flips": r.check.flips, "flips_stderr": r.check.stderr, "delta_kl": r.check.delta_kl,
            "max_flips": 1.0 - ROUTER_GUARD, "held": r.held, "hold_kl_cost": r.hold_cost, "plans_measured": r.rounds, "picks_measured": r.measured_picks,
            "pick_probes": r.pick_probes,
        }
    exporter = OnnxQuantExporter(result.codes, summary, next(o for o in OnnxOps if o.backend == backend)) if fmt == "onnx" else exporter_cls(result.codes, summary)
    request = exporter_cls.request(given, plan=result.plan)

    def embed(tmp: Path) -> dict[str, str]:
        return {p.name: "reference-trace" for p in trace.save(tmp)} if trace is not None else {}

    with status(f"writing the {fmt} bundle"):
        manifest = exporter.export(model_dir, out, request, embed=embed)
    return manifest, result


__all__ = ["CODES_SHARE", "CodeMemory", "candidate_code_bytes", "free_for_codes", "fp32_fits", "parse_gib", "weight_bytes", "DEFAULT_METHOD", "DELTA_BACKENDS", "OPS", "ROUTER_GUARD", "check_delta", "check_block", "check_ops", "check_types", "FORMATS", "check_request", "SENSITIVITY_PER_DOMAIN", "PlanResult", "calibrate", "fake_quantize", "load_stats", "make_plan", "parse_method", "parse_sensitivity", "quantize_bundle", "resolve_calibration_set", "restore"]
