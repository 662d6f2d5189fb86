"""`medmoe-edge compare`: the same images and questions through several runtimes and bundles, in one run.

How a run goes:

1. The PyTorch reference records the trace of the question set **once** (`workflows.record_trace`,
   in this process, on `--device`); it holds the prepared inputs (prompt ids, preprocessed pixels),
   so every runtime sees exactly the same images and prompts, and the reference's logits, tokens,
   routing and answers.
2. Every row (the torch runtime on the checkpoint, each bundle through the runtime its manifest
   names) gets a worker process of its own (`perf.Worker`), loads, and runs one untimed warm-up.
   Its own process is what makes peak RSS that runtime's alone (VmHWM); rows that cannot run here
   (an unknown or uninstalled runtime, `tensorrt`, a bundle of another checkpoint, a load that
   fails) stay in the table with the reason.
3. Questions are taken one at a time and every live row answers it before the next one, the order
   rotated each question, so a machine whose speed drifts hits every runtime alike. Per question
   and row the worker makes
   * a **timed free run**: greedy, EOS ignored so every row decodes `max_new_tokens - 1` steps
     (the answer is the tokens before the first EOS: greedy decoding is deterministic, so it is the
     answer of a run that stops there). It gives prefill (the runtime's own call: image encode +
     prompt), time to first token (prefill + first sampling), and decode tok/s; and the row's
     **answer** for answer agreement and the paper's accuracy;
   * a **teacher-forced replay** against the trace (`verify.replay_one`): logits max-abs and cosine,
     token agreement, routing agreement (runtimes that report it), plus KL(reference ‖ runtime) per
     step (whole rows when the trace keeps them, else over the reference's top-k, renormalised).
4. Per row: the median and p10–p90 over the questions; decode rate only over questions with at
   least `MIN_RATE_TOKENS` decode steps; the memory-bandwidth roofline share of the decode rate
   (activated weight bytes per token over doctor's bandwidth probe, measured in the same run).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .api import MIN_RATE_TOKENS
from .errors import InputError, MedmoeError
from .imaging import PreprocessMode
from .perf import Bandwidth, DecodeBytes, Worker, WorkerError, checkpoint_decode_bytes, decode_bytes, is_jetson, merge_bandwidth, model_size_bytes, probe_bandwidth, roofline_fraction, spread, worker_argv
from .trace import Trace
from .verify import SampleResult, Tolerances, VerifyReport, tolerances_for
from .vocab import ArtifactKind, Precision

SCHEMA_ID = "medmoe-edge/compare/1"
Status = Callable[[str], AbstractContextManager]
Progress = Callable[[int, int], None]
DEFAULT_LIMIT = 16
DEFAULT_MAX_NEW_TOKENS = 32
REPORT_FILES = ("compare.json", "table.md", "index.html")


def _quiet(_message: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class Candidate:
    """One row to run: a runtime on the checkpoint or a bundle, or a row that cannot run (reason set).

    Attributes:
        argv: the worker's command line (None: a row that does not run).
        external: a row outside this model (e.g. a stock llama.cpp model in a benchmark): timed,
            no fidelity or accuracy.
    """

    label: str
    runtime: str
    model: str
    format: str | None = None
    precision: str | None = None
    reason: str | None = None
    argv: list[str] | None = None
    size_bytes: int | None = None
    decode: DecodeBytes | None = None
    tolerances: Tolerances | None = None
    external: bool = False
    note: str | None = None


@dataclass
class ExternalRow:
    """A row whose worker is a command of its own speaking `perf.Worker`'s protocol (benchmarks):
    answers {"cmd": "item", "index": i} with at least prefill_s, ttft_s, decode_s, decode_steps."""

    label: str
    runtime: str
    argv: list[str]
    size_bytes: int | None = None
    decode: DecodeBytes | None = None
    note: str | None = None


@dataclass
class RowResult:
    cand: Candidate
    status: str = "ok"  # ok | unavailable | failed
    reason: str | None = None
    hello: dict[str, Any] = field(default_factory=dict)
    items: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareResult:
    """What `compare` measured; `to_json()` follows `schemas/compare.schema.json`."""

    model: str
    set_name: str
    trace: Trace
    rows: list[dict[str, Any]]
    settings: dict[str, Any]
    bandwidth: Bandwidth
    notes: list[str]
    files: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from .provenance import library_versions

        h = self.trace.header
        return {
            "schema": SCHEMA_ID,
            "tool": __version__,
            "model": self.model,
            "set": {"name": self.set_name, "questions": len(self.trace.items), "max_new_tokens": h.max_new_tokens, "preprocess": h.preprocess},
            "reference": {"label": h.label, "source_sha256": h.source_sha256, "logits": "full" if h.full_logits else f"top-{h.topk}", "runtime": "torch"},
            "settings": self.settings,
            "bandwidth": self.bandwidth.to_json(),
            "rows": self.rows,
            "notes": self.notes,
            "libraries": library_versions(),
        }


# --- which rows ----------------------------------------------------------------------------------


def _runtime_reason(name: str) -> tuple[type | None, str | None]:
    """(class, None) for an available runtime, else (None, why not and how to fix it)."""
    from .diagnostics import runtime_fix
    from .runtimes.registry import discover

    entries = discover()
    if name not in entries:
        return None, f"unknown runtime {name!r}; installed runtimes: {', '.join(sorted(entries))}"
    av = entries[name].availability()
    if not av.available or entries[name].cls is None:
        return None, f"not available here: {av.reason} (fix: {runtime_fix(name, has_gpu=False, jetson=is_jetson())})"
    return entries[name].cls, None


def _options_json(device: str, threads: int | None, provider: str | None, runtime_cls) -> dict[str, Any]:
    from .runtime_contract import PROVIDER

    opts: dict[str, Any] = {"device": device, "num_threads": threads}
    if provider is not None and runtime_cls is not None and PROVIDER in runtime_cls.capabilities.options:
        opts["provider"] = provider
    return opts


def plan_rows(model: str, bundles: Sequence[Path], runtimes: Sequence[str] | None, *, source_sha256: str | None, device: str, threads: int | None, provider: str | None, trace_dir: Path | None) -> list[Candidate]:
    """The rows of a comparison: torch on the checkpoint (when asked for, or by default), every
    bundle through its manifest's runtime, and a row with the reason for each runtime named that
    cannot run here or has no bundle."""
    from .bundle import read_manifest
    from .runtimes.registry import runtime_for

    wanted = list(dict.fromkeys(runtimes)) if runtimes else None
    rows: list[Candidate] = []
    covered: set[str] = set()
    if wanted is None or "torch" in wanted:
        cls, why = _runtime_reason("torch")
        c = Candidate("torch fp32", "torch", model, "checkpoint", "fp32", reason=why)
        if cls is not None:
            c.argv = worker_argv(model, "torch", _options_json(device, threads, provider, cls), trace_dir)
            c.size_bytes = model_size_bytes(model)
            c.decode = decode_bytes(model, Precision.FP32)
        rows.append(c)
        covered.add("torch")
    for b in bundles:
        b = Path(b)
        try:
            m = read_manifest(b)
        except MedmoeError as e:
            rows.append(Candidate(f"? ({b.name})", "?", str(b), reason=str(e)))
            continue
        try:
            runtime = m.runtime or runtime_for(m.format)
        except MedmoeError as e:
            rows.append(Candidate(f"? {m.precision.value} ({b.name})", "?", str(b), m.format.value, m.precision.value, reason=str(e)))
            continue
        covered.add(runtime)
        c = Candidate(f"{runtime} {m.precision.value}", runtime, str(b), m.format.value, m.precision.value, size_bytes=model_size_bytes(b), decode=decode_bytes(b))
        c.tolerances = tolerances_for(m.format, m.precision, m.plan)
        cls, why = _runtime_reason(runtime)
        if why is not None:
            c.reason = why
        elif source_sha256 is not None and m.source.get("sha256") != source_sha256:
            c.reason = f"exported from another checkpoint than {model} (source SHA-256 differs): its answers cannot be compared with this reference"
        else:
            c.argv = worker_argv(b, runtime, _options_json(device, threads, provider, cls), trace_dir)
        rows.append(c)
    for name in wanted or ():
        if name in covered:
            continue
        cls, why = _runtime_reason(name)
        if why is not None:
            rows.append(Candidate(name, name, model, reason=why))
        elif cls.artifact_kind is ArtifactKind.CHECKPOINT:
            c = Candidate(f"{name} fp32", name, model, "checkpoint", "fp32", argv=worker_argv(model, name, _options_json(device, threads, provider, cls), trace_dir))
            c.size_bytes, c.decode = model_size_bytes(model), decode_bytes(model, Precision.FP32)
            rows.append(c)
        else:
            kind = cls.artifact_kind.value
            rows.append(Candidate(name, name, model, kind, reason=f"no {kind} bundle given: export one (`medmoe-edge export --format {kind} --model {model} --out DIR`) and pass --bundles DIR"))
    labels = [r.label for r in rows]
    for r in rows:
        if labels.count(r.label) > 1 and r.model != model:
            r.label = f"{r.label} ({Path(r.model).name})"
    return rows


# --- running -------------------------------------------------------------------------------------


def _start(c: Candidate, log_dir: Path) -> RowResult:
    res = RowResult(c)
    if c.argv is None:
        res.status, res.reason = "unavailable", c.reason
        return res
    try:
        w = Worker(c.argv, log_dir)
    except (WorkerError, OSError) as e:
        res.status, res.reason = "failed", f"worker did not start: {e}"
        return res
    if not w.hello.get("ok"):
        res.status, res.reason = "unavailable", str(w.hello.get("error"))
        w.close()
        return res
    res.hello = w.hello
    res.worker = w  # type: ignore[attr-defined]
    if c.format == "checkpoint" and w.hello.get("vocab_rows"):  # the rows the loader really kept
        c.decode = checkpoint_decode_bytes(c.model, Precision.FP32, int(w.hello["vocab_rows"]))
    return res


def run_rows(cands: Sequence[Candidate], n_items: int, *, status: Status = _quiet, progress: Progress | None = None, log_dir: Path | None = None) -> list[RowResult]:
    """Start one worker per runnable row (one after another, so loads do not compete), then
    alternate them question by question (order rotated per question); close them at the end."""
    log_dir = Path(log_dir or tempfile.gettempdir())
    results = []
    for c in cands:
        with status(f"loading {c.label}"):
            results.append(_start(c, log_dir))
    live = [r for r in results if getattr(r, "worker", None) is not None]
    done, total = 0, n_items * len(live)
    try:
        for i in range(n_items):
            order = live[i % len(live) :] + live[: i % len(live)] if live else []
            for r in order:
                if r.status != "ok":
                    continue
                try:
                    r.items.append(r.worker.request({"cmd": "item", "index": i}))  # type: ignore[attr-defined]
                except WorkerError as e:
                    r.status, r.reason = "failed", f"failed at question {i + 1}: {e}"
                done += 1
                if progress:
                    progress(done, total)
    finally:
        for r in live:
            r.final = r.worker.close() or {}  # type: ignore[attr-defined]
            del r.worker  # type: ignore[attr-defined]
    return results


# --- summarising -----------------------------------------------------------------------------------


_NO_TOLERANCES = Tolerances(float("inf"), -1.0, 0.0, 0.0, 0.0)


def _fidelity(res: RowResult, trace: Trace) -> dict[str, Any] | None:
    if res.cand.external or not res.items:
        return None
    samples = []
    for it in res.items:
        t = trace.items[it["index"]]
        f = it["fidelity"]
        samples.append(SampleResult(t.id, t.answer, it["answer"], f["logits_max_abs"], f["logits_cosine_min"], f["steps"], f["tokens_agreed"], f["routing_total"], f["routing_agreed"], f["kl_mean"] * f["steps"], f["kl_max"]))
    tol = res.cand.tolerances
    report = VerifyReport(tol or _NO_TOLERANCES, samples, "full" if trace.header.full_logits else f"top-{trace.header.topk}", bool(res.hello.get("reports_routing")))
    return {
        **report.metrics,  # kl_mean over all steps, as verify reports it
        "kl_max": max(it["fidelity"]["kl_max"] for it in res.items),
        "logits_scope": report.logits_scope,
        "passed": report.passed if tol is not None else None,
        "tolerances": None if tol is None else {k: v for k, v in tol.__dict__.items()},
        "n": len(samples),
    }


def _accuracy(res: RowResult, trace: Trace) -> dict[str, Any] | None:
    from .scoring import ScoreRow, summarize

    if res.cand.external or not res.items:
        return None
    rows = []
    for it in res.items:
        meta = trace.items[it["index"]].meta
        if not meta.get("ground_truth") or not meta.get("answer_type") or not meta.get("domain"):
            return None
        rows.append(ScoreRow(str(meta["domain"]), str(meta["answer_type"]), it["answer"], str(meta["ground_truth"])))
    return summarize(rows)


def summarize_row(res: RowResult, trace: Trace, bw: Bandwidth) -> dict[str, Any]:
    c = res.cand
    rates = [it["decode_steps"] / it["decode_s"] for it in res.items if it.get("decode_steps", 0) >= MIN_RATE_TOKENS and it.get("decode_s", 0) > 0]
    rate = spread(rates)
    peak = max([res.final.get("peak_rss") or 0, res.hello.get("peak_rss") or 0, *[it.get("peak_rss") or 0 for it in res.items]]) or None
    gpu = [g for g in [res.final.get("gpu_peak"), *[it.get("gpu_peak") for it in res.items]] if g]
    bpt = c.decode.weights if c.decode else None
    ran = bool(res.items)
    return {
        "label": c.label,
        "runtime": c.runtime,
        "model": c.model,
        "format": c.format,
        "precision": c.precision,
        "status": res.status if (res.status != "ok" or ran) else "failed",
        "reason": res.reason if (res.status != "ok" or ran) else "no question answered",
        "note": c.note,
        "threads": res.hello.get("threads"),
        "questions": len(res.items),
        "load_s": res.hello.get("load_s"),
        "prefill_s": spread([it["prefill_s"] for it in res.items]),
        "ttft_s": spread([it["ttft_s"] for it in res.items]),
        "decode_tok_s": rate,
        "decode_rate_min_steps": MIN_RATE_TOKENS,
        "peak_rss_bytes": peak if ran else None,
        "gpu_peak_bytes": max(gpu) if gpu else None,
        "gpu_memory": "shared with the CPU: counted once, in peak RSS" if is_jetson() else ("per-process GPU memory (nvidia-smi / torch)" if gpu else "no GPU in use"),
        "size_bytes": c.size_bytes,
        "decode_bytes_per_token": bpt,
        "decode_bytes_detail": c.decode.detail if c.decode else None,
        "roofline_fraction": roofline_fraction(rate["median"], bpt, bw),
        "fidelity": _fidelity(res, trace),
        "accuracy": _accuracy(res, trace),
        "answers": [] if c.external else [{"id": trace.items[it["index"]].id, "answer": it["answer"], "reference": trace.items[it["index"]].answer, "agrees": it["answer"] == trace.items[it["index"]].answer} for it in res.items],
    }


# --- the workflow ------------------------------------------------------------------------------------


def compare(
    model: str = "demo",
    *,
    bundles: Sequence[Path] = (),
    runtimes: Sequence[str] | None = None,
    set_name: str = "eval",
    data: Path | None = None,
    limit: int | None = DEFAULT_LIMIT,
    limit_flag: str | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    threads: int | None = None,
    device: str = "cpu",
    provider: str | None = None,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    out: Path | None = None,
    extra: Sequence[ExternalRow] = (),
    status: Status = _quiet,
    progress: Progress | None = None,
) -> CompareResult:
    """Compare runtimes and bundles of `model` on one question set (see the module docstring).

    Args:
        bundles: bundle directories; each runs through its manifest's runtime.
        runtimes: runtime names to include (default: torch and the bundles' runtimes); a name
            that cannot run here becomes a row with the reason.
        out: a new report directory (compare.json, table.md, PNG charts, index.html, the trace).
        limit: at most that many questions of the set; with `limit_flag` (the user's flag that
            asked for it), exactly that many.
        extra: rows of other models timed in the same alternation (benchmarks).
    Raises:
        InputError: bad --limit / --max-new-tokens (or, with `limit_flag`, more questions than the
            set has), an --out that is not new, an unknown set.
        CheckpointError: the reference checkpoint cannot be loaded.
    """
    from .ckpt_writer import atomic_dir, check_new_dir
    from .runtime_contract import RuntimeOptions
    from .support_files import checkpoint_source_sha256
    from .checkpoint import resolve_model_dir
    from .bundle import is_bundle
    from .workflows import record_trace

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    if max_new_tokens < 2:
        raise InputError(f"--max-new-tokens must be at least 2 (a prefill and one decode step), got {max_new_tokens}")
    if is_bundle(model):
        raise InputError(f"--model {model} is a bundle: compare needs the reference checkpoint as --model and takes bundles with --bundles")
    if out is not None:
        check_new_dir(out)
    model_dir = resolve_model_dir(model)
    source = checkpoint_source_sha256(model_dir)
    scratch = contextlib.ExitStack()
    with scratch:
        work = Path(scratch.enter_context(atomic_dir(out)) if out is not None else scratch.enter_context(tempfile.TemporaryDirectory(prefix="medmoe-compare-")))
        trace_dir = work / "trace"
        trace_dir.mkdir()
        cands = plan_rows(model, bundles, runtimes, source_sha256=source, device=device, threads=threads, provider=provider, trace_dir=trace_dir)
        for e in extra:
            cands.append(Candidate(e.label, e.runtime, "", argv=e.argv, size_bytes=e.size_bytes, decode=e.decode, external=True, note=e.note))
        t0 = time.perf_counter()
        trace = record_trace(model_dir, set_name=set_name, data=data, limit=limit, limit_flag=limit_flag, max_new_tokens=max_new_tokens, preprocess=preprocess, options=RuntimeOptions(device=device, num_threads=threads), status=status)
        trace.save(trace_dir)
        record_s = time.perf_counter() - t0
        with status("measuring this machine's memory bandwidth"):
            bw_start = probe_bandwidth()
        results = run_rows(cands, len(trace.items), status=status, progress=progress, log_dir=work)
        with status("measuring this machine's memory bandwidth again"):
            bw_end = probe_bandwidth()
        bw = merge_bandwidth(bw_start, bw_end, when="before and after the runs")
        rows = [summarize_row(r, trace, bw) for r in results]
        notes = [
            "timing: greedy free run per question, EOS ignored so every row decodes the same number of steps; the answer is the tokens before the first EOS",
            "prefill: the runtime's own prefill call (vision tower + prompt); TTFT: from the start of generation to the first token sampled; image file decoding and preprocessing are not timed (the trace holds preprocessed pixels, so every row sees the same input)",
            f"decode tok/s: median and p10-p90 over the questions with at least {MIN_RATE_TOKENS} decode steps",
            "fidelity: teacher-forced replay of the reference trace (verify's metrics) plus KL(reference || runtime); answer agreement compares each row's free-run answer with the reference's",
            "roofline: decode tok/s x activated weight bytes per token / the measured bandwidth (embedding rows, vision tower and KV cache not counted)",
            "peak RSS: each row runs in its own process (VmHWM), which also holds that runtime's share of the teacher-forced replay",
        ]
        result = CompareResult(
            str(model),
            set_name,
            trace,
            rows,
            {"device": device, "threads": threads, "provider": provider, "limit": limit, "max_new_tokens": max_new_tokens, "bundles": [str(b) for b in bundles], "runtimes": list(runtimes) if runtimes else None, "reference_record_s": record_s},
            bw,
            notes,
        )
        if out is not None:
            names = write_report(result, work)
            result.files = [Path(out) / n for n in names]
    return result


def write_report(result: CompareResult, directory: Path) -> list[str]:
    """compare.json, table.md, the PNG charts and index.html into `directory`; returns the names."""
    from .charts import compare_charts, compare_html, markdown_table

    data = result.to_json()
    names = ["compare.json", "table.md"]
    (directory / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    (directory / "table.md").write_text(markdown_table(data) + "\n")
    charts = compare_charts(data, directory)
    names += [p.name for p in charts]
    (directory / "index.html").write_text(compare_html(data, charts))
    names.append("index.html")
    names.append("trace")
    return names


def schema() -> dict[str, Any]:
    """The JSON Schema of `CompareResult.to_json()` (shipped as medmoe_edge/schemas/compare.schema.json)."""
    return json.loads((Path(__file__).parent / "schemas" / "compare.schema.json").read_text())


__all__ = ["Candidate", "CompareResult", "ExternalRow", "compare", "plan_rows", "run_rows", "schema", "summarize_row", "write_report"]
