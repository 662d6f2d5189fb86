"""What the ONNX exporter holds in memory: the graphs traced on their weights (the exporter
before, run from a git worktree of `--before`) against the graphs traced on stand-ins with each
weight written afterwards (`export/onnx_weights.py`, as shipped). Measured side by side in one run,
each export in its own process (wall time, peak RSS), on the real-dimension StableLM proxy stored
in fp32 and in bf16, and the two bundles compared weight by weight.

The proxy is `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes, 4 decoder layers, MoE on 0
and 2 with 4 experts + meta, the CLIP ViT-L/14-336 tower, random weights); its bf16 copy is
`stored_weights.to_bf16`'s.

    python benchmarks/onnx_export_memory.py [--before 620ff05] [--work DIR] [--no-doc]

Writes docs/ONNX.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402
from quantization_proxy import run_timed  # noqa: E402
from stored_weights import to_bf16  # noqa: E402

DOC = ROOT / "docs" / "ONNX.md"
BEGIN, END = "<!-- onnx_export_memory:begin -->", "<!-- onnx_export_memory:end -->"
# The CLI of another checkout (argv[1]): its medmoe_edge packages, mapped as pyproject.toml maps them,
# found before the installed (editable) ones.
OTHER_CHECKOUT = """
import importlib.util, sys
from importlib.machinery import PathFinder
tree = sys.argv.pop(1)
dirs = {"medmoe_edge": "medmoe_edge", "medmoe_edge.export": "export", "medmoe_edge.runtimes": "runtimes", "medmoe_edge.calibration": "calibration"}
class Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in dirs:
            d = f"{tree}/{dirs[name]}"
            return importlib.util.spec_from_file_location(name, d + "/__init__.py", submodule_search_locations=[d])
        return PathFinder.find_spec(name, path) if name.startswith("medmoe_edge.") else None
sys.meta_path.insert(0, Finder)
import medmoe_edge.export.onnx_export as e
assert e.__file__.startswith(tree), e.__file__
"""
# The ONNX exporter alone (`export_onnx`: no reference trace, no fidelity check), in one process.
EXPORT = "import sys; from pathlib import Path; from medmoe_edge.export.onnx_export import export_onnx; export_onnx(Path(sys.argv[1]), Path(sys.argv[2]))"


def same_weights(a: Path, b: Path) -> str:
    """Whether two ONNX bundles' graphs read the same weights: node by node (Identity nodes, which
    torch's deduplication of equal initializers adds, looked through), every initializer input equal
    in type and value."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    worst = []
    for graph in ("vision", "embed", "decoder"):
        reads = []
        for bundle in (a, b):
            proto = onnx.load(str(bundle / f"{graph}.onnx"))
            alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}
            inits = {i.name: i for i in proto.graph.initializer}
            reads.append([(n.op_type, [inits.get(alias.get(x, x)) for x in n.input]) for n in proto.graph.node if n.op_type != "Identity"])
            del proto
        if [op for op, _ in reads[0]] != [op for op, _ in reads[1]]:
            return f"**different** ({graph}: the nodes differ)"
        for (_, xs), (_, ys) in zip(*reads):
            for x, y in zip(xs, ys):
                if (x is None) != (y is None) or (x is not None and not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))):
                    worst.append(graph)
    return "equal" if not worst else f"**different** ({len(worst)} weight reads, first in {worst[0]})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="620ff05", help="the git revision whose exporter traced on the weights")
    ap.add_argument("--work", type=Path, default=None, help="reuses proxy checkpoints there (proxy-stablelm-4e, proxy-stablelm-4e-bf16)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    from runtimes_bench import make_proxy

    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-export-memory-"))
    src = work / "proxy-stablelm-4e"
    if not (src / "config.json").is_file():
        make_proxy(src, 4)
    bf16 = work / "proxy-stablelm-4e-bf16"
    if not (bf16 / "config.json").is_file():
        to_bf16(src, bf16)
    tree = work / "before-tree"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True, capture_output=True)
    rev = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    rows = []
    for label, ckpt in (("fp32", src), ("bf16", bf16)):
        runs = {}
        for how, tag, code in ((f"traced on the weights (before, {rev})", "before", OTHER_CHECKOUT + EXPORT), ("traced on stand-ins (as shipped)", "now", EXPORT)):
            out = work / f"export-{label}-{tag}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-c", code, *([str(tree)] if tag == "before" else []), str(ckpt), str(out)]
            print("running", tag, label, flush=True)
            runs[how] = (*run_timed(cmd, out.with_suffix(".log")), out)
        (w0, r0, a), (w1, r1, b) = runs.values()
        same = same_weights(a, b)
        for how, (w, r, _out) in runs.items():
            rows.append(f"| {label} | {how} | {w / 60:.1f} min | {r / 2**30:.2f} GiB |")
        rows.append(f"| {label} | as shipped over before | {w1 / w0:.2f}× | **{r1 / r0:.2f}×** |")
        rows.append(f"| {label} | the two bundles' weights | {same} | |")
        for _how, (_w, _r, out) in runs.items():
            shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)

    lines = [
        f"`python benchmarks/onnx_export_memory.py --before {args.before}` (the real-dimension StableLM proxy stored in fp32 and in bf16; "
        "the ONNX exporter alone (`export_onnx`, fp32), each export in its own process, both exporters in one run):",
        "",
        "| checkpoint | exporter | wall | peak RSS |",
        "|---|---|---|---|",
        *rows,
    ]
    if args.no_doc:
        print("\n".join(lines))
    else:
        publish_block(DOC, BEGIN, END, lines, "ONNX export")


if __name__ == "__main__":
    main()
