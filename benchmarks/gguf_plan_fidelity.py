"""A GGUF plan at ≤ 3.5 bits per weight against the PyTorch fake-quant of the same codes, on the
domain-balanced eval subset of `quantization_report.py` (issue: per-expert quantization, backends).

`quantize --format gguf --avg-bits B` on the demo model (statistics from --calib-per-domain
questions per domain), then, against one fp32 reference trace (teacher-forced):

* llama.cpp on the bundle (the runtime users get);
* the PyTorch reference with the very codes the file holds dequantized in (the oracle);

and the issue's bounds: llama.cpp keeps ≥ 95 % of answers and its KL is ≤ 1.5× the oracle's.

    python benchmarks/gguf_plan_fidelity.py [--avg-bits 3.5] [--per-domain 100] [--calib-per-domain 64] [--no-doc]

Writes docs/QUANTIZATION.md (the block between its markers) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from docblock import publish_block  # noqa: E402

DOC = ROOT / "docs" / "QUANTIZATION.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avg-bits", type=float, default=3.5)
    ap.add_argument("--per-domain", type=int, default=100, help="eval questions per domain in the reference trace")
    ap.add_argument("--calib-per-domain", type=int, default=64)
    ap.add_argument("--sens-per-domain", type=int, default=16)
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args()
    t0 = time.time()

    import llama_cpp
    import torch

    from quantization_report import _trace

    from medmoe_edge import api
    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.quantization import calibrate, fake_quantize, quantize_bundle
    from medmoe_edge.runtime_contract import RuntimeOptions
    from medmoe_edge.verify import QUANTIZED_TOLERANCES, replay
    from medmoe_edge.vocab import ArtifactKind

    torch.set_num_threads(2)
    model_dir = resolve_model_dir("demo")
    trace = _trace(model_dir, a.per_domain)
    tol = QUANTIZED_TOLERANCES[ArtifactKind.GGUF]
    opts = RuntimeOptions(num_threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calibrate("demo", work / "stats", per_domain=a.calib_per_domain, sensitivity_per_domain=a.sens_per_domain)
        _m, res = quantize_bundle("demo", "gguf", work / "stats", work / "g", avg_bits=a.avg_bits, trace_questions=0)
        with api.load(work / "g", runtime="llamacpp", options=opts) as pipe:
            gguf = replay(pipe.runtime, trace, tol).metrics
        with api.load(model_dir, runtime="torch", options=opts) as oracle:
            fake_quantize(oracle.runtime.loaded, res.codes)
            fake = replay(oracle.runtime, trace, tol).metrics
    ratio = gguf["kl_mean"] / fake["kl_mean"]
    lines = [
        f"Command: `python benchmarks/gguf_plan_fidelity.py --avg-bits {a.avg_bits} --per-domain {a.per_domain} --calib-per-domain {a.calib_per_domain}` "
        f"(torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}; demo model; {len(trace.items)} eval questions teacher-forced against one fp32 trace; "
        f"{(time.time() - t0) / 60:.1f} min). `quantize --format gguf --avg-bits {a.avg_bits}`: {res.allocation.bits_per_weight:.2f} bits per weight.",
        "",
        "| runtime | KL (mean) | top-1 tokens | answers kept |",
        "|---|---|---|---|",
        f"| llama.cpp on the bundle | {gguf['kl_mean']:.2e} | {gguf['token_agreement']:.2%} | {gguf['answer_agreement']:.2%} |",
        f"| PyTorch fake-quant of the same codes | {fake['kl_mean']:.2e} | {fake['token_agreement']:.2%} | {fake['answer_agreement']:.2%} |",
        "",
        f"llama.cpp's KL is **{ratio:.2f}×** the fake-quant plan's (bound ≤ 1.5×) and it keeps **{gguf['answer_agreement']:.1%}** of answers (bound ≥ 95 %).",
    ]
    publish_block(DOC, "<!-- gguf_plan_fidelity:begin -->", "<!-- gguf_plan_fidelity:end -->", lines, "Per-expert quantization", publish=not a.no_doc)


if __name__ == "__main__":
    main()
