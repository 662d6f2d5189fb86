"""What the ONNX exporter holds in memory: the graphs traced on their weights (the exporter
before, run from a git worktree of `--before`) against the graphs traced on stand-ins with each
weight written afterwards (`export/onnx_weights.py`, as shipped). Measured side by side in one run,
each export in its own process (wall time, peak RSS), on the real-dimension StableLM proxy stored
in fp32 and in bf16, and the two bundles compared weight by weight. Then a full-size random
checkpoint (`--full-size`, bf16, the whole vocabulary), which only the exporter as shipped fits on
a 24 GB machine, exported and every embedding and decoder weight checked against the checkpoint.

The proxy is `runtimes_bench.make_proxy` (StableLM-2-1.6B layer sizes, 4 decoder layers, MoE on 0
and 2 with 4 experts + meta, the CLIP ViT-L/14-336 tower, random weights); its bf16 copy is
`stored_weights.to_bf16`'s.

    python benchmarks/onnx_export_memory.py [--before 620ff05] [--repeats 2] [--full-size phi] [--work DIR] [--no-doc]

Writes docs/ONNX.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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
SAME = "import sys; from pathlib import Path; from onnx_export_memory import same_weights; print(same_weights(Path(sys.argv[1]), Path(sys.argv[2])))"
# The ONNX exporter alone (`export_onnx`: no reference trace, no fidelity check), in one process.
EXPORT = "import sys; from pathlib import Path; from medmoe_edge.export.onnx_export import export_onnx; export_onnx(Path(sys.argv[1]), Path(sys.argv[2]))"


@contextlib.contextmanager
def before_checkout(work: Path, rev: str) -> Iterator[tuple[Path, str]]:
    """A git worktree of `rev` at `work/before-tree` (reused if there) and its short hash, for
    OTHER_CHECKOUT; removed when the block ends normally (left for the next run after a failure)."""
    tree = work / "before-tree"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
    short = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    yield tree, short
    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)


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


def check_weights(bundle: Path, ckpt: Path) -> tuple[int, int]:
    """Every weight of the embedding and decoder graphs of an fp32 `bundle`, read from its files
    (memory-mapped, one at a time), against the checkpoint's tensor widened exactly (and transposed
    where the graph reads Wᵀ). Returns (tensors checked, tensors that differ)."""
    import numpy as np
    import onnx

    from medmoe_edge.export.onnx_weights import weight_sources
    from medmoe_edge.weights import load_tensors, weight_files

    state = load_tensors(weight_files(ckpt))  # safetensors: read as each tensor is used
    # the traced wrappers' names (onnx_graphs): DecoderGraph.text is model.lm.model, EmbedGraph.embed_tokens its embedding
    named = {"decoder": {("text." + k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}, "embed": {"embed_tokens.weight": state["model.embed_tokens.weight"]}}
    checked = differ = 0
    for graph, params in named.items():
        proto = onnx.load(str(bundle / f"{graph}.onnx"), load_external_data=False)
        sources = weight_sources(proto.graph, params)
        for init in proto.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            got = np.memmap(bundle / ext["location"], dtype=np.float32, mode="r", offset=int(ext["offset"]), shape=tuple(init.dims))
            src = sources[init.name]
            want = params[src.name].float()
            checked += 1
            differ += not np.array_equal(got, (want.t() if src.transposed else want).numpy())
            del got
    return checked, differ


def full_size_checkpoint(work: Path, preset: str) -> Path:
    """`work/PRESET-bf16`: a full-size random checkpoint of `preset` in bf16 with the whole
    vocabulary (12 GiB for phi), made in a child process unless it is there already."""
    ckpt = work / f"{preset}-bf16"
    if not (ckpt / "config.json").is_file():
        make = f"from pathlib import Path; from medmoe_edge.presets import PRESETS, Preset; from medmoe_edge.random_init import write_random_checkpoint; write_random_checkpoint(PRESETS[Preset({preset!r})], Path({str(ckpt)!r}), dtype='bfloat16', full_vocab=True)"
        print("making", ckpt, flush=True)
        run_timed([sys.executable, "-c", make], work / f"{preset}-bf16.log")
    return ckpt


def full_size(work: Path, preset: str) -> list[str]:
    """A full-size random checkpoint of `preset` in bf16 (the whole vocabulary), exported to fp32 ONNX
    as shipped (the exporter before does not fit this machine), and every weight checked."""
    ckpt, out = full_size_checkpoint(work, preset), work / f"{preset}-onnx-fp32"
    shutil.rmtree(out, ignore_errors=True)
    print("exporting", ckpt, flush=True)
    wall, rss = run_timed([sys.executable, "-c", EXPORT, str(ckpt), str(out)], out.with_suffix(".log"))
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    stored = sum(f.stat().st_size for f in ckpt.rglob("*.safetensors"))
    checked, differ = check_weights(out, ckpt)
    shutil.rmtree(out, ignore_errors=True)
    return [
        f"| {preset}, full size, bf16 ({stored / 2**30:.1f} GiB of weights stored) | traced on stand-ins (as shipped) | {wall / 60:.1f} min | **{rss / 2**30:.2f} GiB** |",
        f"| {preset}, full size | the bundle written: {written / 2**30:.1f} GiB; its {checked} embedding and decoder weights against the checkpoint's, widened | {'all equal' if not differ else f'**{differ} differ**'} | |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="620ff05", help="the git revision whose exporter traced on the weights")
    ap.add_argument("--work", type=Path, default=None, help="reuses proxy checkpoints there (proxy-stablelm-4e, proxy-stablelm-4e-bf16)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each exporter (their peaks vary from run to run)")
    ap.add_argument("--full-size", default="phi", help="also export a full-size random checkpoint of this preset (phi, stablelm; 'none': skip)")
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
    rows = []
    with before_checkout(work, args.before) as (tree, rev):
        for label, ckpt in (("fp32", src), ("bf16", bf16)):
            runs: dict[str, list[tuple[float, int]]] = {}
            outs = {}
            for rep in range(args.repeats):  # alternately, so drift falls on both
                for how, tag, code in ((f"traced on the weights (before, {rev})", "before", OTHER_CHECKOUT + EXPORT), ("traced on stand-ins (as shipped)", "now", EXPORT)):
                    out = outs[how] = work / f"export-{label}-{tag}"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [sys.executable, "-c", code, *([str(tree)] if tag == "before" else []), str(ckpt), str(out)]
                    print("running", tag, label, rep + 1, flush=True)
                    runs.setdefault(how, []).append(run_timed(cmd, out.with_suffix(".log")))
            # in a child process: this one's memory would count in the next export's peak (a forked
            # child's maximum RSS starts from its parent's)
            same = subprocess.run([sys.executable, "-c", SAME, *map(str, outs.values())], check=True, capture_output=True, text=True, cwd=ROOT / "benchmarks").stdout.strip()
            mean = {how: (sum(w for w, _ in r) / len(r), sum(m for _, m in r) / len(r)) for how, r in runs.items()}
            for how, r in runs.items():
                rows.append(f"| {label} | {how} | {' / '.join(f'{w / 60:.1f}' for w, _ in r)} min | {' / '.join(f'{m / 2**30:.2f}' for _, m in r)} GiB |")
            (w0, r0), (w1, r1) = mean.values()
            rows.append(f"| {label} | as shipped over before (means) | {w1 / w0:.2f}× | **{r1 / r0:.2f}×** |")
            rows.append(f"| {label} | the two bundles' weights | {same} | |")
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
        if args.full_size != "none":
            rows += full_size(work, args.full_size)

    lines = [
        f"`python benchmarks/onnx_export_memory.py --before {args.before} --repeats {args.repeats} --full-size {args.full_size}` (the real-dimension StableLM proxy stored in fp32 and in bf16; "
        "the ONNX exporter alone (`export_onnx`, fp32), each export in its own process, the two exporters alternately in one run; every run's wall time and peak RSS):",
        "",
        "| checkpoint | exporter | wall | peak RSS |",
        "|---|---|---|---|",
        *rows,
    ]
    publish_block(DOC, BEGIN, END, lines, "ONNX export", publish=not args.no_doc)


if __name__ == "__main__":
    main()
