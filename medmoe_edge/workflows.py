"""Library workflows behind the CLI commands that combine layers (exporters, runtimes, data sets).

The CLI parses, calls one of these and prints; `medmoe_edge.api` is the smaller
load-and-answer API. Both sit above the core, `medmoe_edge.export`, `medmoe_edge.runtimes` and
`medmoe_edge.calibration` (the layer contracts in pyproject.toml say so and CI checks them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .api import Pipeline, load
from .bundle import Manifest, read_manifest
from .calibration.sets import check_trace_questions, first, resolve_set
from .checkpoint import fp32_bytes, load_model, resolve_model_dir
from .ckpt_writer import atomic_dir, check_new_dir
from .diagnostics import fits_in_memory
from .errors import CheckpointError, InputError, RuntimeUnavailable
from .exporter import get_exporter, registered
from .imaging import PreprocessMode
from .quant_plan import QuantPlan
from .runtime_contract import RuntimeOptions
from .runtimes.registry import runtime_for
from .runtimes.torch_runtime import TorchRuntime
from .support_files import checkpoint_source_sha256
from .trace import TRACE_STEM, Trace, record, trace_questions
from .verify import VerifyReport, replay, tolerances_for
from .vocab import ArtifactKind

Status = Callable[[str], AbstractContextManager]
Progress = Callable[[int, int], None]

EMBEDDED_TRACE_QUESTIONS = 16  # eval questions of the trace every export embeds
TRACE_MAX_NEW_TOKENS = 32


def _quiet(_message: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def record_trace(
    model: str | Path,
    *,
    set_name: str = "eval",
    data: Path | None = None,
    limit: int | None = EMBEDDED_TRACE_QUESTIONS,
    max_new_tokens: int = TRACE_MAX_NEW_TOKENS,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    options: RuntimeOptions | None = None,
    status: Status = _quiet,
    progress: Progress | None = None,
    keep_stored: bool = False,
    limit_flag: str | None = None,
) -> Trace:
    """Run the PyTorch reference on `model` over a question set and record its trace.

    With `keep_stored` the reference keeps a bf16 checkpoint's matrices as stored
    (`load_model(keep_stored=True)`): the same trace bit for bit in half the memory, and slower
    (every matrix is widened at every decoded token: 2.4x on the real-dimension proxy).

    `limit` is at most that many questions (a default, e.g. verify's 64, on a smaller set); with
    `limit_flag`, the user's flag that asked for exactly that many.

    Raises:
        InputError: a bad set, `limit` < 1, or, with `limit_flag`, more than the set's questions.
        CheckpointError: the checkpoint cannot be loaded.
    """
    if limit is not None and limit < 1:  # before the set is generated
        raise InputError(f"{limit_flag or '--limit'} must be at least 1, got {limit}")
    samples, root = resolve_set(set_name, data, status=status)
    samples = first(samples, limit, flag=limit_flag, set_name=f"the {set_name} set") if limit_flag else samples[:limit]
    opts = options or RuntimeOptions()
    model_dir = resolve_model_dir(model)
    reference = Pipeline(TorchRuntime(load_model(model_dir, vision_tower=opts.vision_tower, keep_stored=True))) if keep_stored else load(model_dir, runtime="torch", options=opts)
    how = " on the model as stored (its fp32 weights do not fit in memory: slower)" if keep_stored else ""
    with status(f"recording the reference trace of {len(samples)} questions{how}"), reference as ref:
        questions = trace_questions(ref, samples, root, preprocess)
        return record(
            ref.runtime,
            questions,
            source_sha256=checkpoint_source_sha256(model_dir, opts.vision_tower),
            max_new_tokens=max_new_tokens,
            preprocess=preprocess.value,
            set_name=set_name,
            progress=progress,
        )


def export_bundle(
    fmt: str,
    model: str | Path,
    out: Path,
    given: dict[str, Any] | None = None,
    *,
    plan: QuantPlan | None = None,
    vision_tower: Path | None = None,
    trace_questions: int = EMBEDDED_TRACE_QUESTIONS,
    status: Status = _quiet,
) -> Manifest:
    """Export `model` to a bundle of format `fmt` at `out`, with an embedded reference trace.

    Args:
        fmt: a registered exporter name (`--format`).
        given: the format's options as the user gave them, CLI flag → value (e.g. {"--quant": "q8_0"}).
        plan: a quantization plan instead of a uniform `--precision`/`--quant`.
        trace_questions: eval questions of the reference trace to embed (0: none), so that
            `verify BUNDLE` works where the checkpoint is not (`--trace-questions`).
    Raises:
        InputError: unknown format, an option of another format, a bad value, a non-empty `out`,
            `trace_questions` below 0 or above the eval split's questions.
        CheckpointError / RuntimeUnavailable: as the exporter raises them.
    """
    exporter = get_exporter(fmt)
    request = exporter.request(dict(given or {}), plan=plan, vision_tower=vision_tower)
    ok, why = exporter.availability()
    if not ok:  # before minutes of tracing
        raise RuntimeUnavailable(f"--format {fmt} cannot export here: {why}")
    check_new_dir(out)  # before minutes of tracing and exporting
    check_trace_questions(trace_questions, status)
    trace = None
    if trace_questions:
        # a full-size checkpoint whose fp32 weights do not fit (Phi: 23 GiB) is traced as stored
        keep = fits_in_memory(fp32_bytes(resolve_model_dir(model))) is False
        trace = record_trace(model, limit=trace_questions, options=RuntimeOptions(vision_tower=vision_tower), status=status, keep_stored=keep)  # its length checked above

    def embed(tmp: Path) -> dict[str, str]:
        return {p.name: "reference-trace" for p in trace.save(tmp)} if trace is not None else {}

    with status(f"exporting {model} to {fmt}"):
        return exporter().export(model, out, request, embed=embed)


def reference_dir(manifest: Manifest, reference: str | None) -> Path | None:
    """The checkpoint to compare against: --reference (hash-checked), else the manifest's source
    when it is here and unchanged, else None.

    Raises:
        CheckpointError: --reference is not the checkpoint the bundle was exported from.
    """
    if reference is None:
        path = Path(manifest.source.get("path", ""))
        if not (path / "config.json").is_file():
            return None
        try:
            same = checkpoint_source_sha256(path) == manifest.source.get("sha256")
        except CheckpointError:
            return None
        return path if same else None
    path = resolve_model_dir(reference)
    if checkpoint_source_sha256(path) != manifest.source.get("sha256"):
        raise CheckpointError(f"{path} is not the checkpoint this bundle was exported from (SHA-256 differs from the manifest's source): pass the right --reference")
    return path


@dataclass(frozen=True)
class VerifyOutcome:
    """A verification report and what it was measured against (for the printed title)."""

    report: VerifyReport
    against: str  # e.g. "the embedded reference trace (16 eval questions)"
    runtime: str
    trace_source: str  # the reference checkpoint's hash, from the trace
    set_name: str  # the question set the trace was recorded on


def verify_bundle(
    bundle: Path,
    *,
    reference: str | None = None,
    set_name: str = "eval",
    data: Path | None = None,
    limit: int | None = 64,
    limit_flag: str | None = None,
    explicit_set: bool = False,
    trace_dir: Path | None = None,
    max_new_tokens: int = TRACE_MAX_NEW_TOKENS,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    options: RuntimeOptions | None = None,
    runtime: str | None = None,
    status: Status = _quiet,
    progress: Progress | None = None,
) -> VerifyOutcome:
    """Replay a reference trace against the bundle's runtime.

    The trace is the bundle's embedded one when it covers the request (same set, enough
    questions, same generation settings) and no --reference is given; else one recorded now
    from the reference checkpoint (--reference, or the manifest's source when it is here); else,
    when the user did not ask for a particular set or size (`explicit_set`), the embedded one.
    `trace_dir` replays a trace saved by `medmoe-edge trace` instead (its first `limit` questions).
    `limit` is at most that many questions; with `limit_flag` (the user's flag that asked for it),
    exactly that many, else an error. `runtime` overrides the bundle's own runtime (onnxruntime
    for a TensorRT bundle's graphs).

    Raises:
        InputError: no tolerances for the bundle, a set that needs the absent checkpoint, or
            (with `limit_flag`) more questions than the set or trace has.
        CheckpointError: not a bundle, corrupt, or a --reference that is not its source.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    manifest = read_manifest(bundle)  # the runtime verifies every file's SHA-256 when it loads the bundle
    tolerances = tolerances_for(manifest.format, manifest.precision, manifest.plan)
    if tolerances is None and manifest.format is ArtifactKind.PLUGIN:
        maker = str(manifest.toolchain.get("exporter"))
        if maker not in registered():
            raise RuntimeUnavailable(f"{bundle} was written by the {maker!r} exporter plugin, which is not installed here: install it to verify its bundles")
        tolerances = registered()[maker].tolerances
    if tolerances is None:
        raise InputError(f"no fidelity tolerances are defined for {manifest.format.value} {manifest.precision.value} bundles")
    opts = options or RuntimeOptions()
    embedded = Trace.load(bundle) if (bundle / f"{TRACE_STEM}.json").is_file() else None
    h = embedded.header if embedded else None
    covers = embedded is not None and h.set_name == set_name and data is None and h.max_new_tokens == max_new_tokens and h.preprocess == preprocess.value and (limit is not None and limit <= len(embedded.items))
    ref = None if (covers and reference is None) or trace_dir is not None else reference_dir(manifest, reference)
    trace: Trace | None = None
    if trace_dir is not None:
        if reference is not None:
            raise InputError("--trace and --reference contradict each other: give one")
        trace, n = Trace.load(trace_dir), limit
        if limit_flag and n is not None and n > len(trace.items):
            raise InputError(f"{limit_flag} {n} is more than the {len(trace.items)} questions of the trace in {trace_dir}: use {limit_flag} {len(trace.items)} or fewer")
        against = f"the reference trace in {trace_dir} ({len(trace.items[:n])} {trace.header.set_name} questions)"
    elif ref is not None:
        against, n = f"the PyTorch reference {ref.name}", None  # recorded below, once the bundle has loaded
        if limit_flag:  # the set's size checked here, once, not after the bundle has loaded
            first(resolve_set(set_name, data, status=status).samples, limit, flag=limit_flag, set_name=f"the {set_name} set")
    elif embedded is not None and (covers or not explicit_set):
        trace, n = embedded, (limit if covers else None)
        against = f"the embedded reference trace ({len(trace.items[:n])} {embedded.header.set_name} questions)"
    elif embedded is not None:
        raise InputError(f"the bundle's source checkpoint {manifest.source.get('path')} is not here: pass --reference CKPT, or drop --set/--limit/--all to use the embedded trace ({len(embedded.items)} questions)")
    else:
        raise CheckpointError(f"the bundle's source checkpoint {manifest.source.get('path')} is not here and the bundle has no embedded trace: pass --reference CKPT")
    if trace is not None and trace.header.source_sha256 != manifest.source.get("sha256"):
        raise CheckpointError("the reference trace was recorded from another checkpoint than this bundle's source: pass --reference CKPT")
    runtime = runtime or manifest.runtime or runtime_for(manifest.format)
    if trace is not None and tolerances.logits_max_abs == 0 and opts.num_threads is None and trace.header.num_threads:
        # a bit-exact bound (a runtime doing the reference's own math) holds only with the thread
        # count the trace was recorded with: fp32 sums are split by thread
        opts = replace(opts, num_threads=trace.header.num_threads)
    # The bundle loads first: a corrupt or inconsistent bundle is refused before minutes of reference work.
    with status(f"loading {bundle} ({runtime})"), load(bundle, runtime=runtime, options=opts) as pipe:
        if trace is None:
            trace = record_trace(ref, set_name=set_name, data=data, limit=limit, max_new_tokens=max_new_tokens, preprocess=preprocess, options=RuntimeOptions(num_threads=pipe.runtime.options.num_threads), status=status)
        report = replay(pipe.runtime, trace, tolerances, limit=n, progress=progress)
    return VerifyOutcome(report, against, runtime, trace.header.source_sha256, trace.header.set_name)


def save_trace(trace: Trace, out: Path) -> list[Path]:
    """Write `trace` into a new directory `out`, atomically (nothing appears until complete).

    Raises:
        InputError: `out` exists and is not empty.
    """
    with atomic_dir(out) as tmp:
        names = [p.name for p in trace.save(tmp)]
    return [out / n for n in names]


__all__ = ["EMBEDDED_TRACE_QUESTIONS", "VerifyOutcome", "export_bundle", "record_trace", "reference_dir", "save_trace", "verify_bundle"]
