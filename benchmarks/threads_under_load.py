"""Thread-count policies on an idle and on a busy machine, side by side in one run.

A deployment box rarely runs the model alone (a camera or PACS pipeline beside it). With other
work on the cores, a runtime that spins one thread per core waits for the slowest one at every
barrier. This measures, for the demo model on torch, ONNX Runtime (fp32) and llama.cpp (q8_0):

* policies (`medmoe_edge.runtime_contract.THREAD_POLICIES`): every usable core, cores − 1,
  physical cores, and load-aware (usable cores minus the other runnable tasks at load time);
* idle, and under a competing load of `--load` busy processes (default: 2 × the cores);
* time to first token and decode tok/s (median over `--reps`, 32 decode steps, EOS ignored).

Each measurement runs in its own process; policies alternate within each repetition so a
drifting machine hits them alike.

    python benchmarks/threads_under_load.py [--reps 3] [--load N]

Writes docs/BENCHMARKS.md (the section between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- threads_under_load:begin -->", "<!-- threads_under_load:end -->"
DECODE = 32


def child(kind: str, model: str, policy: str) -> None:
    """Load under the current machine state, choose threads by `policy`, answer once, print JSON."""
    from medmoe_edge import api
    from medmoe_edge.generation import GenerationConfig, LoopTimings
    from medmoe_edge.runtime_contract import RuntimeOptions, choose_threads

    threads = choose_threads(policy)
    pipe = api.load(model, runtime=kind, options=RuntimeOptions(num_threads=threads))
    req, _ = pipe.prepare(ROOT / "examples" / "ct-lesion.png", "Is there an abnormality in this image?")
    rt = pipe.runtime
    rt.model_info.tokenizer.eos_id = -1  # EOS ignored: every run decodes the same count
    loop = LoopTimings()
    for _ in rt.generate([req], GenerationConfig(max_new_tokens=DECODE + 1), loop):
        pass
    print(json.dumps({"threads": threads, "ttft_s": loop.prefill_s, "decode_tok_s": 1.0 / statistics.median(rt.timings.decode_s)}))


def _spin() -> None:
    while True:
        pass


def measure(kind: str, model: Path | str, policy: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(model), policy]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{kind} {policy} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--load", type=int, default=None, help="competing busy processes [default: 2 x cores]")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    from medmoe_edge.runtime_contract import THREAD_POLICIES, usable_cores
    from medmoe_edge.workflows import export_bundle

    cores = usable_cores()
    load = a.load if a.load is not None else 2 * cores
    tmp = Path(tempfile.mkdtemp(prefix="threads-bench-"))
    models = {"torch": "demo", "onnxruntime": tmp / "onnx", "llamacpp": tmp / "gguf-q8"}
    export_bundle("onnx", "demo", models["onnxruntime"], trace_questions=0)
    export_bundle("gguf", "demo", models["llamacpp"], {"--quant": "q8_0"}, trace_questions=0)
    results: dict[tuple[str, str, str], list[dict]] = {}
    for state in ("idle", "busy"):
        spinners = [mp.Process(target=_spin, daemon=True) for _ in range(load if state == "busy" else 0)]
        for p in spinners:
            p.start()
        time.sleep(1.0 if spinners else 0.0)
        try:
            for _ in range(a.reps):
                for kind, model in models.items():
                    for policy in THREAD_POLICIES:
                        results.setdefault((state, kind, policy), []).append(measure(kind, model, policy))
        finally:
            for p in spinners:
                p.terminate()
    lines = [
        f"Thread policies, demo model, {cores} usable cores; busy = {load} competing busy processes; median of {a.reps}, {DECODE} decode steps "
        f"(`python benchmarks/threads_under_load.py --reps {a.reps}`, {time.strftime('%Y-%m-%d')}).",
        "",
        "| machine | runtime | policy | threads | TTFT ms | decode tok/s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for (state, kind, policy), rs in results.items():
        ttft = statistics.median(r["ttft_s"] for r in rs) * 1000
        tok = statistics.median(r["decode_tok_s"] for r in rs)
        threads = "/".join(sorted({str(r["threads"]) for r in rs}))
        lines.append(f"| {state} | {kind} | {policy} | {threads} | {ttft:.0f} | {tok:.0f} |")
    publish_block(DOC, BEGIN, END, lines, "Benchmarks")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
