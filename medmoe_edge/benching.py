"""`medmoe-edge bench`: one runtime on one model or bundle, in the spirit of llama-bench and trtexec.

For every configuration of the sweep (each `--threads` value × each `--batch` value the runtime
takes, one after another) a worker process of its own (`perf.Worker`, so peak RSS is that
configuration's alone) loads the model, runs `warmup` untimed repetitions, then `reps` timed
ones of: prefill of one image + question (batch rows of the same request), then
`decode_tokens` greedy decode steps with EOS ignored (every repetition decodes the same count).

Reported per configuration: load time; p50/p90/p99 (and mean) of prefill (the runtime's own
call: vision tower + prompt), time to first token, and per-step decode latency (over every
step of every repetition); decode tok/s (per repetition: rows × steps / decode time); peak RSS
(and GPU memory on a discrete GPU); and the **memory-bandwidth roofline share** of decode:
steps/s × activated weight bytes per step (`perf.decode_bytes`) / the bandwidth doctor's probe
measures on this machine in the same run (shown beside it). The weights are read once per step
for every row of a batch, so the share uses steps/s, not rows × steps/s.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError
from .perf import Bandwidth, Worker, WorkerError, checkpoint_decode_bytes, decode_bytes, merge_bandwidth, model_size_bytes, probe_bandwidth, roofline_fraction, tails, worker_argv
from .vocab import FLOAT_PRECISIONS, Precision

SCHEMA_ID = "medmoe-edge/bench/1"
DEFAULT_QUESTION = "Is there an abnormality in this image?"
Status = Callable[[str], AbstractContextManager]
Progress = Callable[[int, int], None]


def _quiet(_message: str) -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class BenchResult:
    """What `bench` measured; `to_json()` follows `schemas/bench.schema.json`."""

    model: str
    runtime: str
    format: str
    precision: str
    settings: dict[str, Any]
    bandwidth: Bandwidth
    decode_bytes: int | None
    decode_bytes_detail: str | None
    size_bytes: int | None
    configs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        from .provenance import library_versions

        return {
            "schema": SCHEMA_ID,
            "tool": __version__,
            "model": self.model,
            "runtime": self.runtime,
            "format": self.format,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "settings": self.settings,
            "bandwidth": self.bandwidth.to_json(),
            "decode_bytes_per_step": self.decode_bytes,
            "decode_bytes_detail": self.decode_bytes_detail,
            "configs": self.configs,
            "skipped": self.skipped,
            "libraries": library_versions(),
        }


def parse_counts(text: str | Sequence[int] | None, option: str) -> list[int]:
    """'1,2,4' → [1, 2, 4] (each ≥ 1, duplicates dropped, order kept).

    Raises:
        InputError: not a comma-separated list of positive integers.
    """
    if text is None:
        return []
    parts = [str(p).strip() for p in (text.split(",") if isinstance(text, str) else text)]
    try:
        vals = [int(p) for p in parts if p]
    except ValueError:
        raise InputError(f"{option} takes comma-separated positive integers, e.g. 1,2,4; got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"{option} takes comma-separated positive integers, e.g. 1,2,4; got {text!r}")
    return list(dict.fromkeys(vals))


def resolve_runtime(model: str | Path, runtime: str | None) -> tuple[str, str, str]:
    """(runtime, format, precision) of what is benched: a bundle's manifest runtime, else torch.

    Raises:
        RuntimeUnavailable: the runtime is unknown or not available here.
    """
    from .bundle import is_bundle, read_manifest
    from .runtimes.registry import get_runtime, runtime_for

    if is_bundle(model):
        m = read_manifest(model)
        name = runtime or m.runtime or runtime_for(m.format)
        fmt, prec = m.format.value, m.precision.value
    else:
        name, fmt, prec = runtime or "torch", "checkpoint", "fp32"
    get_runtime(name)  # raises RuntimeUnavailable with the reason
    return name, fmt, prec


def _summarise(reply: dict[str, Any], batch: int, bpt: int | None, bw: Bandwidth, hello: dict[str, Any]) -> dict[str, Any]:
    runs = reply["runs"]
    steps = [r["decode_steps"] for r in runs]
    step_rates = [r["decode_steps"] / r["decode_s"] for r in runs if r["decode_s"] > 0]
    tok_rates = [batch * s for s in step_rates]
    all_steps = [s for r in runs for s in r["step_s"]]
    step_p50 = tails(step_rates)["p50"]
    return {
        "threads": reply["threads"],
        "batch": batch,
        "reps": len(runs),
        "decode_steps": steps[0] if steps else 0,
        "prompt_positions": reply["prompt_positions"],
        "load_s": hello.get("load_s"),
        "prefill_s": tails([r["prefill_s"] for r in runs]),
        "ttft_s": tails([r["ttft_s"] for r in runs]),
        "decode_step_s": tails(all_steps),
        "decode_tok_s": tails(tok_rates),
        "decode_steps_per_s": tails(step_rates),
        "roofline_fraction": roofline_fraction(step_p50, bpt, bw),
        "peak_rss_bytes": reply.get("peak_rss"),
        "gpu_peak_bytes": reply.get("gpu_peak"),
    }


def bench(
    model: str | Path,
    *,
    runtime: str | None = None,
    threads: Sequence[int] = (),
    batches: Sequence[int] = (1,),
    warmup: int = 1,
    reps: int = 5,
    decode_tokens: int = 32,
    image: Path | None = None,
    question: str = DEFAULT_QUESTION,
    device: str = "cpu",
    provider: str | None = None,
    dtype: str | None = None,
    status: Status = _quiet,
    progress: Progress | None = None,
) -> BenchResult:
    """Benchmark one runtime on `model` over a threads × batch sweep (see the module docstring).

    Args:
        threads: thread counts to sweep (empty: the runtime's default, once).
        batches: batch sizes; those above the runtime's `capabilities.max_batch` are skipped with the reason.
    Raises:
        InputError: reps < 1, warmup < 0, decode_tokens < MIN_RATE_TOKENS, a missing image.
        RuntimeUnavailable: the runtime cannot run here.
    """
    from .api import MIN_RATE_TOKENS
    from .runtimes.registry import get_runtime

    if reps < 1 or warmup < 0:
        raise InputError(f"--reps must be at least 1 and --warmup at least 0, got {reps} and {warmup}")
    if decode_tokens < MIN_RATE_TOKENS:
        raise InputError(f"--decode-tokens must be at least {MIN_RATE_TOKENS} for a decode rate to mean anything, got {decode_tokens}")
    if image is not None and not Path(image).is_file():
        raise InputError(f"--image {image} does not exist")
    name, fmt, prec = resolve_runtime(model, runtime)
    cls = get_runtime(name)
    caps = cls.capabilities
    precision = Precision.parse(dtype, allowed=FLOAT_PRECISIONS, option="--dtype") if dtype else None
    dec = decode_bytes(model, precision if fmt == "checkpoint" else None)
    if precision is not None and fmt == "checkpoint":
        prec = precision.value
    with status("measuring this machine's memory bandwidth"):
        bw0 = probe_bandwidth()
    result = BenchResult(str(model), name, fmt, prec, {}, bw0, dec.weights, dec.detail, model_size_bytes(model))
    configs = [(t, b) for t in (list(threads) or [None]) for b in batches]
    todo = []
    for t, b in configs:
        if caps.max_batch is not None and b > caps.max_batch:
            result.skipped.append({"threads": t, "batch": b, "reason": f"the {name} runtime takes at most {caps.max_batch} request(s) at a time"})
        else:
            todo.append((t, b))
    opts: dict[str, Any] = {"device": device}
    if provider is not None:
        opts["provider"] = provider
    if dtype is not None:
        opts["dtype"] = dtype
    with tempfile.TemporaryDirectory(prefix="medmoe-bench-") as logs:
        for n, (t, b) in enumerate(todo):
            label = f"threads {t or 'default'}, batch {b}"
            with status(f"{name}: {label}"):
                w = Worker(worker_argv(model, name, opts | {"num_threads": t}), Path(logs))
                try:
                    if not w.hello.get("ok"):
                        if n == 0:  # the first configuration: the model or an option is the problem
                            raise InputError(f"the {name} runtime cannot run {model}: {w.hello.get('error')}")
                        raise WorkerError(str(w.hello.get("error")))
                    if fmt == "checkpoint" and w.hello.get("vocab_rows"):  # the lm_head rows the loader really kept
                        dec = checkpoint_decode_bytes(model, precision, int(w.hello["vocab_rows"]))
                        result.decode_bytes, result.decode_bytes_detail = dec.weights, dec.detail
                    cmd = {"cmd": "bench", "batch": b, "decode_tokens": decode_tokens, "warmup": warmup, "reps": reps, "image": str(image) if image else None, "question": question}
                    reply = w.request(cmd)
                    result.configs.append(_summarise(reply, b, dec.weights, bw0, w.hello))
                except WorkerError as e:
                    result.skipped.append({"threads": t, "batch": b, "reason": f"failed: {e}"})
                finally:
                    w.close()
            if progress:
                progress(n + 1, len(todo))
    with status("measuring this machine's memory bandwidth again"):
        bw = merge_bandwidth(bw0, probe_bandwidth(), when="before and after the runs")
    result.bandwidth = bw
    for c in result.configs:
        c["roofline_fraction"] = roofline_fraction(c["decode_steps_per_s"]["p50"], dec.weights, bw)
    result.settings = {
        "device": device,
        "provider": provider,
        "dtype": dtype,
        "warmup": warmup,
        "reps": reps,
        "decode_tokens": decode_tokens,
        "threads": list(threads) or None,
        "batches": list(batches),
        "image": str(image) if image else None,
        "question": question,
        "max_batch": caps.max_batch,
    }
    return result


def schema() -> dict[str, Any]:
    """The JSON Schema of `BenchResult.to_json()` (medmoe_edge/schemas/bench.schema.json)."""
    import json

    return json.loads((Path(__file__).parent / "schemas" / "bench.schema.json").read_text())


__all__ = ["DEFAULT_QUESTION", "BenchResult", "bench", "parse_counts", "resolve_runtime", "schema"]
