"""What `export --format tensorrt` holds in memory on a full-size checkpoint: the exporter before
(`--before`, run from a git worktree: the torch model kept while the engines were built, each
engine serialized whole in memory before it was written) against the exporter as shipped (the
model's weights released once the graphs are written, each engine streamed into its file).

The checkpoint is a full-size random Med-MoE (`--preset`, bf16, the whole vocabulary; the one
`onnx_export_memory.py` makes). Each export runs in its own process, sampled every 0.2 s: its
resident memory (VmRSS, which counts the pages of the memory-mapped ONNX weights the builder
reads) and its anonymous memory (RssAnon: what the machine cannot page out, no swap here). An
export whose anonymous memory passes `--cap-gib` is stopped there: on this 24 GB machine the
kernel would kill it a little later. The child marks when each engine build starts, which splits
the peaks into writing the graphs and building the engines.

    python benchmarks/tensorrt_export_memory.py [--before 56862ab] [--preset phi] [--cap-gib 21] [--work DIR] [--no-doc]

Writes docs/TENSORRT.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402
from onnx_export_memory import OTHER_CHECKOUT, before_checkout, full_size_checkpoint  # noqa: E402

DOC = ROOT / "docs" / "TENSORRT.md"
BEGIN, END = "<!-- tensorrt_export_memory:begin -->", "<!-- tensorrt_export_memory:end -->"
# The TensorRT exporter alone (no reference trace, no fidelity check), fp16 for the default
# compute capabilities; prints "MARK <unix time> <what>" when each engine build starts and ends.
EXPORT = """
import sys, time
from pathlib import Path
import medmoe_edge.export.tensorrt_export as te
build = te.EngineBuilder.build
def marked(self, onnx_file, *rest):
    print("MARK", time.time(), "build", onnx_file.name, flush=True)
    build(self, onnx_file, *rest)
    print("MARK", time.time(), "built", onnx_file.name, flush=True)
te.EngineBuilder.build = marked
exporter = te.TensorRTExporter
exporter().export(Path(sys.argv[1]), Path(sys.argv[2]), exporter.request({}))
"""


def _status_kib(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of a live process in KiB, or None once it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
    except (FileNotFoundError, KeyError, ProcessLookupError):
        return None


def run_sampled(cmd: list[str], log: Path, cap_gib: float) -> dict:
    """Run `cmd` in its own process, sampling its memory every 0.2 s; stopped (SIGKILL) when its
    anonymous memory passes `cap_gib`. Returns wall seconds, the samples, the marks, and whether
    it finished, was stopped, or failed."""
    samples, t0 = [], time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "1000"})
        stopped = False
        while proc.poll() is None:
            got = _status_kib(proc.pid)
            if got is not None:
                samples.append((time.time(), got[0] * 1024, got[1] * 1024))
                if got[1] * 1024 > cap_gib * 2**30:
                    proc.kill()
                    stopped = True
            time.sleep(0.2)
        code = proc.wait()
    marks = []
    for line in log.read_text().splitlines():
        if line.startswith("MARK "):
            _, when, what = line.split(" ", 2)
            marks.append((float(when), what))
    outcome = "stopped" if stopped else ("finished" if code == 0 else f"failed (exit {code})")
    if outcome.startswith("failed"):
        print(log.read_text()[-3000:], file=sys.stderr)
    return {"wall": time.time() - t0, "samples": samples, "marks": marks, "outcome": outcome}


def _peaks(run: dict) -> tuple[float, float, float]:
    """(peak VmRSS, peak anonymous while writing the graphs, peak anonymous while building the
    engines), in GiB; the engines' phase starts at the first build mark."""
    first = next((t for t, what in run["marks"] if what.startswith("build ")), float("inf"))
    rss = max(s[1] for s in run["samples"])
    graphs = max((s[2] for s in run["samples"] if s[0] < first), default=0)
    engines = max((s[2] for s in run["samples"] if s[0] >= first), default=0)
    return rss / 2**30, graphs / 2**30, engines / 2**30


def _where(run: dict) -> str:
    """The step a stopped export was in: the last engine build it started, or the graphs."""
    started = [what.split(" ", 1)[1] for _, what in run["marks"] if what.startswith("build ")]
    return f"building {started[-1].replace('.onnx', '.engine')}" if started else "writing the graphs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="56862ab", help="the git revision whose exporter kept the model and built each engine in memory")
    ap.add_argument("--preset", default="phi", help="full-size preset of the random checkpoint (phi, stablelm)")
    ap.add_argument("--cap-gib", type=float, default=21.0, help="stop an export whose anonymous memory passes this (GiB)")
    ap.add_argument("--work", type=Path, default=None, help="reuses the full-size checkpoint there (PRESET-bf16)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="tensorrt-export-memory-"))
    ckpt = full_size_checkpoint(work, args.preset)
    stored = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))
    rows = []
    with before_checkout(work, args.before) as (tree, rev):
        for how, tag, code in ((f"before ({rev}): model kept, engines serialized in memory", "before", OTHER_CHECKOUT + EXPORT), ("as shipped: model released, engines streamed", "now", EXPORT)):
            out = work / f"trt-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            print("exporting", tag, flush=True)
            cmd = [sys.executable, "-c", code, *([str(tree)] if tag == "before" else []), str(ckpt), str(out)]
            run = run_sampled(cmd, work / f"trt-{tag}.log", args.cap_gib)
            rss, graphs, engines = _peaks(run)
            if run["outcome"] == "finished":
                facts = json.loads((out / "manifest.json").read_text())["extra"]["tensorrt"]
                size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
                builds = ", ".join(f"{g} {s / 60:.1f}" for g, s in facts["build_seconds"].items())
                result = f"bundle {size / 2**30:.1f} GiB (engine builds, min: {builds})"
            else:
                result = f"**{run['outcome']}** at {max(s[2] for s in run['samples']) / 2**30:.1f} GiB anonymous, {_where(run)}"
            rows.append(f"| {how} | {run['wall'] / 60:.1f} min | {rss:.2f} GiB | {graphs:.2f} GiB | **{engines:.2f} GiB** | {result} |")
            shutil.rmtree(out, ignore_errors=True)
            for partial in work.glob(f".trt-{tag}.partial-*"):  # what a stopped export leaves
                shutil.rmtree(partial, ignore_errors=True)

    lines = [
        f"`python benchmarks/tensorrt_export_memory.py --before {args.before} --preset {args.preset} --cap-gib {args.cap_gib:g}` "
        f"(a full-size {args.preset} Med-MoE with random weights, stored in bf16: {stored / 2**30:.1f} GiB; `export --format tensorrt`, fp16, "
        "TensorRT-RTX for compute capabilities 8.6 and 8.9, without the reference trace; each export in its own process, sampled every 0.2 s; "
        f"stopped where its anonymous memory passed {args.cap_gib:g} GiB):",
        "",
        "| exporter | wall | peak RSS | peak anonymous, writing the graphs | peak anonymous, building the engines | result |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    publish_block(DOC, BEGIN, END, lines, "Memory at full size", publish=not args.no_doc)


if __name__ == "__main__":
    main()
