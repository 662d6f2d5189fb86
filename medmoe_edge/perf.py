"""Measurement plumbing shared by `medmoe-edge compare` and `medmoe-edge bench`.

* **Worker processes.** Every runtime (or, for `bench`, every thread/batch configuration) runs in
  its own child process, `python -m medmoe_edge.perf`, which loads the model once and then answers
  commands, one JSON line each way (stdin → child; child → stdout lines prefixed with `MARKER`, so
  a library that prints on stdout cannot garble the protocol; the child's stderr goes to a log
  file). A process of its own is what makes peak RSS (VmHWM, which starts afresh at exec) that
  runtime's alone, and keeping the children alive lets the parent alternate them question by
  question, so a machine whose speed drifts hits every runtime alike.
* **Statistics**: percentiles (linear interpolation), median with a p10–p90 spread.
* **Bytes read per decoded token** (for the memory-bandwidth roofline): the *activated* weights,
  from a bundle manifest's tensor groups and their stored precisions, or from a checkpoint's
  spec (`planning.model_sizes`) at its compute precision; the embedding table is not counted
  (one row of it is read per token), lm_head is.
* **Memory and size**: this process's peak RSS, GPU memory of a process where there is a
  discrete NVIDIA GPU (on Jetson, whose GPU shares the RAM, the RSS already holds it and no GPU
  figure is added, so nothing is counted twice), size on disk of a bundle or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import MIN_RATE_TOKENS  # decode steps below which a tokens/s figure is noise
from .errors import MedmoeError

MARKER = "@@medmoe-perf "


# --- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"median", "p10", "p90", "n"} of `values` (None where empty)."""
    return {"median": percentile(values, 50), "p10": percentile(values, 10), "p90": percentile(values, 90), "n": len(values)}


def tails(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"p50", "p90", "p99", "mean", "n"} of `values` (llama-bench / trtexec style)."""
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99), "mean": sum(values) / len(values) if values else None, "n": len(values)}


# --- memory and size -----------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: it starts afresh at exec, so a parent's memory does
    not count, unlike ru_maxrss after a fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def is_jetson() -> bool:
    """A Jetson (integrated GPU sharing the RAM): /etc/nv_tegra_release or a Jetson device-tree model."""
    if Path("/etc/nv_tegra_release").is_file():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="replace").lower()
    except OSError:
        return False


def gpu_memory_bytes(pid: int) -> int | None:
    """GPU memory the process `pid` holds now, from nvidia-smi (None without one, or on failure)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    total = None
    for line in r.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            total = (total or 0) + int(parts[1]) * 2**20
    return total


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_size_bytes(model: str | Path) -> int:
    """Size on disk: a bundle's whole directory; a checkpoint's weight files and its tower's weights."""
    from .bundle import is_bundle
    from .checkpoint import read_spec, resolve_model_dir
    from .weights import weight_files

    if is_bundle(model):
        return dir_size(Path(model))
    directory = resolve_model_dir(model)
    files = {p.resolve() for p in weight_files(directory)}
    _spec, _cfg, tower = read_spec(directory)
    files |= {p.resolve() for p in Path(tower.directory).iterdir() if p.suffix in (".safetensors", ".bin")}
    return sum(p.stat().st_size for p in files)


# --- bytes read per decoded token -------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeBytes:
    """Weight bytes a decode step reads (the activated weights), and how they were counted."""

    weights: int
    detail: str

    def to_json(self) -> dict:
        return {"weights": self.weights, "detail": self.detail}


def bundle_decode_bytes(manifest) -> DecodeBytes:
    """Activated weight bytes per token from a manifest's tensor groups at their stored precisions:
    every group of the language model except the embedding table (one row is read; when there is
    no lm_head group the output is tied to it and the whole table is read), with each MoE layer's
    routed experts counted as top_k × the mean expert; the vision tower and projector run once per
    image and are not counted."""
    import re

    by_name: dict[str, float] = {}
    for g in manifest.tensor_groups:
        by_name[g.name] = by_name.get(g.name, 0.0) + g.params * g.precision.bits / 8
    expert = re.compile(r"^layers\.(\d+)\.expert\.\d+$")
    experts: dict[int, list[float]] = {}
    total = 0.0
    for name, b in by_name.items():
        if name in ("vision", "projector", "embed"):
            continue
        m = expert.match(name)
        if m:
            experts.setdefault(int(m.group(1)), []).append(b)
        else:
            total += b
    top_k = manifest.model.top_k
    for sizes in experts.values():
        total += top_k * sum(sizes) / len(sizes)
    tied = "lm_head" not in by_name and "embed" in by_name
    if tied:
        total += by_name["embed"]
    precisions = sorted({g.precision.value for g in manifest.tensor_groups if g.name not in ("vision", "projector")})
    detail = f"manifest tensor groups ({', '.join(precisions)}): attention, dense FFN, routers, meta experts, top-{top_k} of the routed experts per MoE layer, final norm, lm_head{' (tied to the embedding)' if tied else ''}; embedding rows and vision not counted"
    return DecodeBytes(round(total), detail)


def checkpoint_decode_bytes(model: str | Path, precision=None, vocab_rows: int | None = None) -> DecodeBytes:
    """Activated weight bytes per token of a checkpoint at its compute precision (default fp32),
    from `planning.model_sizes` (activated LLM parameters minus the embedding table).

    Args:
        vocab_rows: the lm_head rows the loaded model really has (the loader truncates embedding and
            lm_head to a smaller tokenizer, as the official one does); None: the config's vocab_size.
    """
    from .checkpoint import read_spec, resolve_model_dir
    from .planning import model_sizes
    from .vocab import Precision

    p = precision or Precision.FP32
    spec, _cfg, _tower = read_spec(resolve_model_dir(model))
    sizes = model_sizes(spec)
    params = sizes.counts.llm_activated - sizes.embed
    note = ""
    if vocab_rows is not None and vocab_rows < spec.text.vocab_size:
        params -= (spec.text.vocab_size - vocab_rows) * spec.text.hidden_size
        note = f", lm_head truncated to the tokenizer's {vocab_rows:,} rows"
    return DecodeBytes(round(params * p.bits / 8), f"{params:,} activated LLM parameters (top-{spec.moe.top_k} routed + meta experts, no embedding table{note}) × {p.bits:g} bits ({p.value})")


def decode_bytes(model: str | Path, precision=None) -> DecodeBytes:
    """`bundle_decode_bytes` for a bundle, else `checkpoint_decode_bytes`."""
    from .bundle import is_bundle, read_manifest

    if is_bundle(model):
        return bundle_decode_bytes(read_manifest(model))
    return checkpoint_decode_bytes(model, precision)


@dataclass(frozen=True)
class Bandwidth:
    """A measured memory bandwidth of this machine (diagnostics' probe) and how it was measured."""

    gbs: float | None
    method: str
    probes: tuple[float, ...] = ()

    def to_json(self) -> dict:
        return {"gbs": self.gbs, "method": self.method, "probes_gbs": list(self.probes)}


def probe_bandwidth(repeats: int = 1) -> Bandwidth:
    """`diagnostics.measure_copy_bandwidth` (the probe `doctor` shows), `repeats` times, best kept."""
    from .diagnostics import measure_copy_bandwidth, probe_memory

    mib = 512 if (probe_memory(bandwidth=False).get("available_gib") or 0) > 4 else 128
    probes = tuple(round(b, 2) for _ in range(repeats) if (b := measure_copy_bandwidth(mib)) is not None)
    return Bandwidth(max(probes) if probes else None, f"doctor's probe: numpy copy of {mib} MiB, one thread, read + write bytes counted, best of 3 copies per probe; the best probe is used", probes)


def merge_bandwidth(*measured: Bandwidth, when: str = "") -> Bandwidth:
    """Probes taken at several moments of one run as one figure (the best probe)."""
    probes = tuple(p for b in measured for p in b.probes)
    method = measured[0].method + (f" ({len(probes)} probes: {when})" if when else "")
    return Bandwidth(max(probes) if probes else None, method, probes)


def roofline_fraction(steps_per_s: float | None, bytes_per_step: int | None, bw: Bandwidth) -> float | None:
    """Share of the memory-bandwidth roofline: steps/s × bytes read per step / measured bytes/s."""
    if not steps_per_s or not bytes_per_step or not bw.gbs:
        return None
    return steps_per_s * bytes_per_step / (bw.gbs * 1e9)


# --- the worker process ----------------------------------------------------------------------------


class WorkerError(MedmoeError):
    """A worker that failed to start, load, or answer (the message ends with its stderr's last lines)."""


class Worker:
    """A child process running one runtime on one model, driven by JSON commands.

    The first line it sends tells whether the model loaded ({"ok": true, "load_s": ...} or
    {"ok": false, "error": ..., "kind": ...}); `request` then sends one command and returns the reply.
    """

    def __init__(self, argv: list[str], log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.log = Path(tempfile.mkstemp(prefix="medmoe-perf-", suffix=".log", dir=log_dir)[1])
        self._log_f = open(self.log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_f, text=True, bufsize=1, env=env)
        self.hello: dict[str, Any] = self._read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, lines: int = 6) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(t.strip() for t in text[-lines:] if t.strip())

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
        code = self.proc.wait()
        tail = self.stderr_tail()
        raise WorkerError(f"worker exited with code {code}" + (f": {tail}" if tail else ""))

    def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            code = self.proc.wait()
            raise WorkerError(f"worker exited with code {code}: {self.stderr_tail()}") from None
        reply = self._read()
        if reply.get("ok") is False:
            raise WorkerError(str(reply.get("error")))
        return reply

    def close(self) -> dict[str, Any]:
        """Ask the worker for its last figures and let it exit; returns its reply ({} if it had died)."""
        reply: dict[str, Any] = {}
        if self.proc.poll() is None:
            try:
                reply = self.request({"cmd": "exit"})
            except WorkerError:
                reply = {}
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_f.close()
        try:
            self.log.unlink()
        except OSError:
            pass
        return reply


def worker_argv(model: str | Path, runtime: str, options: dict[str, Any], trace_dir: Path | None = None) -> list[str]:
    """The command line of a worker for `runtime` on `model` with `options` (RuntimeOptions fields)."""
    argv = [sys.executable, "-m", "medmoe_edge.perf", "--model", str(model), "--runtime", runtime, "--options", json.dumps(options)]
    if trace_dir is not None:
        argv += ["--trace", str(trace_dir)]
    return argv


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _options(d: dict[str, Any]):
    from .runtime_contract import RuntimeOptions
    from .vocab import FLOAT_PRECISIONS, Precision

    dtype = Precision.parse(d["dtype"], allowed=FLOAT_PRECISIONS, option="--dtype") if d.get("dtype") else None
    return RuntimeOptions(device=d.get("device") or "cpu", dtype=dtype, num_threads=d.get("num_threads"), vision_tower=Path(d["vision_tower"]) if d.get("vision_tower") else None, provider=d.get("provider"))


class _Recorder:
    """A runtime seen through `verify.replay_one` (which measures the KL of each teacher-forced step
    itself). When the teacher-forced argmax disagrees somewhere, replay_one runs the runtime free for
    its own answer; this hands back the timed free run's tokens instead (greedy decoding is
    deterministic: the same tokens), so no question is generated twice."""

    def __init__(self, runtime, own_tokens: list[int]) -> None:
        self._rt = runtime
        self._own = list(own_tokens)

    def generate(self, requests, cfg, timings=None, on_step=None):
        from .generation import FinishReason, RowResult

        yield [RowResult(list(self._own), FinishReason.EOS, [], {})]

    def __getattr__(self, name: str):
        return getattr(self._rt, name)


def _gpu_now(runtime) -> int | None:
    """GPU memory of this process: torch's peak reservation when torch holds the GPU, else
    nvidia-smi's per-process figure; None on CPU devices and on Jetson (shared with the RSS)."""
    dev = getattr(runtime.options, "device", None)
    if dev is None or getattr(dev.kind, "value", "cpu") != "cuda" or is_jetson():
        return None
    smi = gpu_memory_bytes(os.getpid())
    try:
        import torch

        if torch.cuda.is_available():
            smi = max(smi or 0, int(torch.cuda.max_memory_reserved()))
    except Exception:  # noqa: BLE001 - a figure we cannot read is simply absent
        pass
    return smi


class _Session:
    """The worker's state: the loaded runtime, the trace (compare) and the peak GPU memory seen."""

    def __init__(self, runtime, trace) -> None:
        self.rt = runtime
        self.trace = trace
        self.gpu_peak: int | None = None

    def memory(self) -> dict[str, Any]:
        g = _gpu_now(self.rt)
        if g is not None:
            self.gpu_peak = max(self.gpu_peak or 0, g)
        return {"peak_rss": peak_rss_bytes(), "gpu_peak": self.gpu_peak}

    def timed_generate(self, requests, max_new_tokens: int) -> tuple[list[list[int]], dict[str, Any]]:
        """Greedy generation with EOS ignored (every run decodes `max_new_tokens - 1` steps); the
        answer of a run that stops at EOS is the tokens before the first EOS (greedy is deterministic)."""
        from .generation import GenerationConfig, LoopTimings

        rt = self.rt
        tok = rt.model_info.tokenizer
        eos = tok.eos_id
        n_pre, n_dec = len(rt.timings.prefill_s), len(rt.timings.decode_s)
        loop = LoopTimings()
        tok.eos_id = -1
        try:
            rows: list = []
            for ev in rt.generate(requests, GenerationConfig(max_new_tokens=max_new_tokens), loop):
                if isinstance(ev, list):
                    rows = ev
        finally:
            tok.eos_id = eos
        answers = [r.token_ids[: r.token_ids.index(eos)] if eos in r.token_ids else list(r.token_ids) for r in rows]
        timing = {
            "prefill_s": rt.timings.prefill_s[n_pre],
            "ttft_s": loop.prefill_s,
            "decode_s": loop.decode_s,
            "decode_steps": loop.decode_steps,
            "step_s": list(rt.timings.decode_s[n_dec:]),
        }
        return answers, timing

    def item(self, index: int) -> dict[str, Any]:
        """Compare: one traced question, timed free run then teacher-forced fidelity."""
        from .verify import replay_one

        item = self.trace.items[index]
        mnt = self.trace.header.max_new_tokens
        answers, timing = self.timed_generate([item.request], mnt)
        answer = self.rt.model_info.tokenizer.decode(answers[0]).strip()
        rec = _Recorder(self.rt, answers[0])
        sample = replay_one(rec, item, mnt)  # its KL per step too (verify.step_kl)
        timing.pop("step_s")
        return {
            "ok": True,
            "index": index,
            "answer": answer,
            "answer_tokens": len(answers[0]),
            **timing,
            "fidelity": {
                "logits_max_abs": sample.logits_max_abs,
                "logits_cosine_min": sample.logits_cosine_min,
                "steps": sample.steps,
                "tokens_agreed": sample.tokens_agreed,
                "routing_total": sample.routing_total,
                "routing_agreed": sample.routing_agreed,
                "kl_mean": sample.kl_sum / sample.steps if sample.steps else 0.0,
                "kl_max": sample.kl_max,
            },
            **self.memory(),
        }

    def bench(self, batch: int, decode_tokens: int, warmup: int, reps: int, image: str | None, question: str) -> dict[str, Any]:
        """Bench: `warmup` untimed then `reps` timed runs of prefill + `decode_tokens` greedy steps."""
        req = bench_request(self.rt, image, question)
        requests = [req] * batch
        for _ in range(warmup):
            self.timed_generate(requests, decode_tokens + 1)
        runs = []
        for _ in range(reps):
            _answers, t = self.timed_generate(requests, decode_tokens + 1)
            runs.append(t)
        info = self.rt.model_info
        return {"ok": True, "runs": runs, "prompt_positions": req.spliced_length(info.spec.image_tokens), "threads": self.rt.options.num_threads, **self.memory()}


def bench_request(runtime, image: str | None, question: str):
    """The prepared request `bench` times: `image` (a file), else a fixed synthetic grey-noise image."""
    from .api import Pipeline

    if image is None:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        img = Image.fromarray((96 + rng.integers(0, 64, (336, 336, 3))).astype("uint8"), "RGB")
        req, _ = Pipeline(runtime).prepare(img, question)
    else:
        req, _ = Pipeline(runtime).prepare(image, question)
    return req


def _worker_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medmoe_edge.perf", description="medmoe-edge compare/bench worker (speaks JSON lines; not for direct use)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--options", default="{}")
    ap.add_argument("--trace", default=None)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of the first traced question after loading")
    a = ap.parse_args(argv)
    from .api import load

    try:
        t0 = time.perf_counter()
        pipe = load(a.model, runtime=a.runtime, options=_options(json.loads(a.options)))
        wall = time.perf_counter() - t0
        trace = None
        if a.trace:
            from .trace import Trace

            trace = Trace.load(Path(a.trace))
    except MedmoeError as e:
        _send({"ok": False, "error": str(e), "kind": type(e).__name__})
        return 0
    except Exception as e:  # noqa: BLE001 - reported as the row's reason, never a traceback in the parent
        _send({"ok": False, "error": f"{type(e).__name__}: {e}", "kind": type(e).__name__})
        return 0
    s = _Session(pipe.runtime, trace)
    rt = pipe.runtime
    if trace is not None and trace.items:
        for _ in range(a.warmup):
            s.timed_generate([trace.items[0].request], min(4, trace.header.max_new_tokens))
    _send({"ok": True, "load_s": rt.timings.load_s, "load_wall_s": wall, "threads": rt.options.num_threads, "vocab_rows": rt.model_info.vocab_rows, "reports_routing": rt.capabilities.reports_routing, "max_batch": rt.capabilities.max_batch, **s.memory()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "exit":
                _send({"ok": True, **s.memory()})
                break
            if cmd["cmd"] == "item":
                _send(s.item(int(cmd["index"])))
            elif cmd["cmd"] == "bench":
                _send(s.bench(int(cmd["batch"]), int(cmd["decode_tokens"]), int(cmd["warmup"]), int(cmd["reps"]), cmd.get("image"), str(cmd["question"])))
            else:
                _send({"ok": False, "error": f"unknown command {cmd['cmd']!r}"})
        except MedmoeError as e:
            _send({"ok": False, "error": str(e), "kind": type(e).__name__})
        except Exception as e:  # noqa: BLE001
            _send({"ok": False, "error": f"{type(e).__name__}: {e}", "kind": type(e).__name__})
    pipe.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main())


__all__ = [
    "Bandwidth",
    "DecodeBytes",
    "MARKER",
    "MIN_RATE_TOKENS",
    "Worker",
    "WorkerError",
    "bundle_decode_bytes",
    "checkpoint_decode_bytes",
    "decode_bytes",
    "dir_size",
    "gpu_memory_bytes",
    "merge_bandwidth",
    "model_size_bytes",
    "peak_rss_bytes",
    "percentile",
    "probe_bandwidth",
    "roofline_fraction",
    "spread",
    "tails",
    "worker_argv",
]
