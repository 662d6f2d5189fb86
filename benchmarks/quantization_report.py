"""Per-expert quantization on the demo model: uniform types against measured per-group plans at equal
bytes and below, per-domain against CT-only calibration, and the ONNX and GGUF bundles that
`medmoe-edge quantize` writes, all against one fp32 reference trace of a domain-balanced eval subset.

Rows (fidelity by `verify.replay`, teacher-forced: KL of the next-token distribution, top-1 token
agreement, routing agreement, answer agreement, per domain for KL):

* PyTorch fake-quant (the oracle every emitter is checked against): uniform int8 / int4 / int3 / int2,
  RTN and GPTQ, block 32, fp16 scale + 4-bit zero point (the torch backend's bytes); every
  planned matrix (LLM matrices, embedding, projector) at that width; int3 and int2 GPTQ again
  from CT-only statistics (the calibration's effect alone);
* plans of the torch backend (int2/int3/int4/int8/fp32 per TensorId group, router guard 99.5 %) at
  the bytes of uniform int3 GPTQ (from per-domain and from CT-only statistics) and at 3.5 bits
  per weight;
* `quantize --format onnx` (DequantizeLinear → MatMulNBits in ONNX Runtime, default accuracy
  level) and `quantize --format gguf` (ggml types, llama.cpp) bundles at a few budgets.

    python benchmarks/quantization_report.py [--per-domain 12] [--calib-per-domain 16] [--sens-per-domain 8] [--accuracy 400] [--proxy-plans] [--no-doc]

--accuracy N answers up to N eval questions per domain greedily with every configuration (400:
the whole 1,600-question split) for closed accuracy and open recall per domain against fp32.
--plans-only runs only uniform int3 GPTQ and the plans (measured sensitivities) at its bytes (from
per-domain and from CT-only statistics, and the per-domain plan's types with CT-only GPTQ codes:
the calibration's effect at a fixed allocation) and at 3.5 bits per weight, into a block of their own
(quantization_report_plans); --proxy-plans the same with `--sensitivity proxy`
(quantization_report_proxy). Each plan's whole-plan router check on the probe sequences
(`calibration.routing.hold_routes`) is listed under the tables.

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
DOMAINS = ("ct", "mri", "xray", "pathology")


def _trace(model_dir: Path, per_domain: int):
    from medmoe_edge import api
    from medmoe_edge.calibration.collect import select
    from medmoe_edge.calibration.sets import resolve_set
    from medmoe_edge.imaging import PreprocessMode
    from medmoe_edge.support_files import checkpoint_source_sha256
    from medmoe_edge.trace import TraceQuestion, record

    samples, root = resolve_set("eval")
    picked, _ = select(samples, None, per_domain)
    with api.load(model_dir, runtime="torch") as ref:
        qs = []
        for s in picked:
            req, _ = ref.prepare(root / s.image, s.question)
            qs.append(TraceQuestion(s.id, s.question, req, {"domain": s.domain.value, "answer_type": s.answer_type, "ground_truth": s.answer}))
        return record(ref.runtime, qs, source_sha256=checkpoint_source_sha256(model_dir), max_new_tokens=32, preprocess=PreprocessMode.PAD.value, set_name="eval", full_logits=True)


def _row(name: str, bits: float | None, mb: float | None, report, trace) -> dict:
    m = report.metrics
    domain_of = {it.id: it.meta["domain"] for it in trace.items}
    per_domain = {}
    for d in DOMAINS:
        rs = [r for r in report.samples if domain_of[r.id] == d]
        steps = sum(r.steps for r in rs)
        per_domain[d] = sum(r.kl_sum for r in rs) / steps if steps else float("nan")
    return {"name": name, "bits": bits, "mb": mb, "kl": m["kl_mean"], "tokens": m["token_agreement"], "routing": m["routing_agreement"], "answers": m["answer_agreement"], "domains": per_domain}


def _accuracy_samples(per_domain: int):
    from medmoe_edge.calibration.collect import select
    from medmoe_edge.calibration.sets import resolve_set

    samples, root = resolve_set("eval")
    return select(samples, None, per_domain)[0], root


def _accuracy(pipe, acc_set) -> dict | None:
    """Closed accuracy and open recall (official scoring), per domain and overall, of greedy answers."""
    if acc_set is None:
        return None
    from medmoe_edge.evaluate import evaluate

    samples, root = acc_set
    return evaluate(pipe, samples, root).summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-domain", type=int, default=12, help="eval questions per domain in the reference trace")
    ap.add_argument("--calib-per-domain", type=int, default=16, help="calibration questions per domain for the statistics")
    ap.add_argument("--sens-per-domain", type=int, default=8, help="calibration sequences per domain kept for measuring sensitivities")
    ap.add_argument("--accuracy", type=int, default=0, help="eval questions per domain answered greedily for closed accuracy and open recall (0: none; 400: the whole split)")
    ap.add_argument(
        "--proxy-plans",
        action="store_true",
        help="only uniform int3 GPTQ and the plans from --sensitivity proxy at its bytes and at 3.5 bits (published into a block of their own)",
    )
    ap.add_argument("--plans-only", action="store_true", help="only uniform int3 GPTQ and the measured plans at its bytes and at 3.5 bits (published into a block of their own)")
    ap.add_argument("--router-guard", type=float, default=None, help="the plans' router-agreement floor on the probe sequences [default: allocation.ROUTER_GUARD, 0.995]")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    plans_only = args.plans_only or args.proxy_plans
    t0 = time.time()

    import torch

    from medmoe_edge import api
    from medmoe_edge.allocation import BACKENDS
    from medmoe_edge.calibration.sensitivity import CodeBook, SensitivityMode, units_for
    from medmoe_edge.quantizer import packed_bytes
    from medmoe_edge.checkpoint import resolve_model_dir
    from medmoe_edge.errors import InputError
    from medmoe_edge.quant_plan import QuantMethod
    from medmoe_edge.quantization import calibrate, fake_quantize, make_plan, quantize_bundle, restore
    from medmoe_edge.runtime_contract import RuntimeOptions
    from medmoe_edge.verify import QUANTIZED_TOLERANCES, replay
    from medmoe_edge.vocab import ArtifactKind

    torch.set_num_threads(2)
    model_dir = resolve_model_dir("demo")
    trace = _trace(model_dir, args.per_domain)
    acc_set = _accuracy_samples(args.accuracy) if args.accuracy else None
    tol = QUANTIZED_TOLERANCES[ArtifactKind.ONNX]
    rows: list[dict] = []
    refused: list[str] = []
    checks: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stats, _ = calibrate("demo", work / "stats", per_domain=args.calib_per_domain, sensitivity_per_domain=args.sens_per_domain)
        stats_ct, _ = calibrate("demo", work / "stats-ct", per_domain=args.calib_per_domain * 4, domains=["ct"], sensitivity_per_domain=args.sens_per_domain * 4)
        opts = RuntimeOptions(num_threads=2)
        oracle = api.load(model_dir, runtime="torch", options=opts)
        loaded = oracle.runtime.loaded
        torch_b = BACKENDS["torch"]
        units = units_for(loaded, torch_b)
        params = sum(u.params for u in units)
        state = {k: v.detach().clone() for k, v in loaded.model.lm.state_dict().items()}

        def fake(name: str, codes: dict, nbytes: int) -> None:
            old = fake_quantize(loaded, codes)
            try:
                rows.append(_row(name, 8 * nbytes / params, nbytes / 1e6, replay(oracle.runtime, trace, tol), trace) | {"accuracy": _accuracy(oracle, acc_set)})
            finally:
                restore(loaded, old)
            print(rows[-1], flush=True)

        reference_accuracy = _accuracy(oracle, acc_set)

        uniform_bytes = {}
        for method in (QuantMethod.GPTQ,) if plans_only else (QuantMethod.RTN, QuantMethod.GPTQ):
            book = CodeBook(stats, method, 32, symmetric=False)
            for bits in (3,) if plans_only else (8, 4, 3, 2):  # the quantizer core takes 3 bits too (no format stores them: ORT and TensorRT have no 3-bit DQ)
                codes = {k: book.get(k, state[k], bits) for u in units for k in u.keys}
                nbytes = sum(packed_bytes(u.params, bits, 32, scale_bytes=torch_b.scale_bytes, zero_point=True) for u in units)
                uniform_bytes[(method, bits)] = nbytes
                fake(f"uniform int{bits} {method.value} (fake-quant)", codes, nbytes)
        # the calibration's own effect, without the allocation's: the same uniform types, GPTQ on CT-only Hessians
        book_ct = CodeBook(stats_ct, QuantMethod.GPTQ, 32, symmetric=False)
        for bits in () if plans_only else (3, 2):
            fake(f"uniform int{bits} gptq, CT-only calibration (fake-quant)", {k: book_ct.get(k, state[k], bits) for u in units for k in u.keys}, uniform_bytes[(QuantMethod.GPTQ, bits)])
        budgets = [("uniform int3 GPTQ bytes", uniform_bytes[(QuantMethod.GPTQ, 3)] / 1e6, None), ("3.5 bits per weight", None, 3.5)]
        mode = SensitivityMode.PROXY if args.proxy_plans else SensitivityMode.MEASURED
        for label, mb, avg in budgets:
            for s, cal, cache in ((stats, "per-domain", "stats"), (stats_ct, "CT-only", "stats-ct")):
                if cal == "CT-only" and avg is not None:
                    continue
                try:
                    guard = {} if args.router_guard is None else {"router_guard": args.router_guard}
                    res = make_plan(loaded, s, "torch", method=QuantMethod.GPTQ, budget_mb=mb, avg_bits=avg, sensitivity=mode, cache_dir=work / cache, **guard)
                except InputError as e:  # the router guard or the few-token floors refuse the budget: a row with the reason
                    refused.append(f"plan at {label}, {cal} calibration: {e}")
                    print(refused[-1], flush=True)
                    continue
                name = f"plan at {label}, {cal} calibration{', proxy sensitivities' if args.proxy_plans else ''} (fake-quant)"
                fake(name, res.codes, res.allocation.nbytes)
                if plans_only and cal == "per-domain" and avg is None:
                    # what `quantize --format onnx` writes by default: the experts' fc1 as deltas from the meta expert where that wins
                    dres = make_plan(loaded, s, "torch", method=QuantMethod.GPTQ, budget_mb=mb, avg_bits=avg, sensitivity=mode, cache_dir=work / cache, delta_from_meta=True, **guard)
                    fake(f"{name[: -len(' (fake-quant)')]}, experts' fc1 as delta from meta where it wins ({sum(d.chosen for d in dres.deltas)} of {len(dres.deltas)}) (fake-quant)", dres.codes, dres.allocation.nbytes)
                    # the calibration's own effect at the plan's types: the same allocation, GPTQ on CT-only Hessians
                    ct_codes = {k: book_ct.get(k, state[k], q.bits) for k, q in res.codes.items()}
                    fake(f"the same plan's types, CT-only GPTQ codes{', proxy sensitivities' if args.proxy_plans else ''} (fake-quant)", ct_codes, res.allocation.nbytes)
                if res.routing is not None:
                    r = res.routing
                    checks.append(
                        f"{name}: routes flipped on the probe sequences {r.check.flips:.2%} ± {r.check.stderr:.2%} (held ≤ {1 - (args.router_guard or 0.995):.1%} with one standard error: {'yes' if r.held else 'no'}{f'; keeping it would cost {r.hold_cost:.1f}x the KL' if r.hold_cost else ''}), "
                        f"KL there {r.check.delta_kl:.2e}, {r.rounds} plan(s) measured whole, {r.measured_picks} estimated pick(s) measured"
                    )
        oracle.close()

        bundles = () if plans_only else (("onnx", (5.5, 6.5), "onnxruntime"), ("gguf", (3.5, 4.0, 5.0), "llamacpp"), ("tensorrt", (5.0, 6.0), "onnxruntime"))
        for fmt, bits_list, runtime in bundles:
            for bits in bits_list:
                out = work / f"{fmt}-{bits}"
                try:
                    _m, res = quantize_bundle("demo", fmt, work / "stats", out, avg_bits=bits, trace_questions=0)
                except InputError as e:  # a budget the router guard cannot meet: a row with its reason
                    refused.append(f"quantize --format {fmt} --avg-bits {bits}: {e}")
                    print(refused[-1], flush=True)
                    continue
                with api.load(out, runtime=runtime, options=opts) as pipe:
                    rep = replay(pipe.runtime, trace, QUANTIZED_TOLERANCES[ArtifactKind(fmt)])
                    acc = _accuracy(pipe, acc_set)
                where = "onnxruntime on the engines' graphs, level 0" if fmt == "tensorrt" else runtime
                rows.append(_row(f"quantize --format {fmt} --avg-bits {bits} ({where})", res.allocation.bits_per_weight, res.allocation.nbytes / 1e6, rep, trace) | {"accuracy": acc})
                print(rows[-1], flush=True)

    import llama_cpp
    import onnxruntime

    n = len(trace.items)
    lines = [
        f"Command: `python benchmarks/quantization_report.py --per-domain {args.per_domain} --calib-per-domain {args.calib_per_domain} --sens-per-domain {args.sens_per_domain}"
        f"{f' --accuracy {args.accuracy}' if args.accuracy else ''}{' --proxy-plans' if args.proxy_plans else ' --plans-only' if args.plans_only else ''}{f' --router-guard {args.router_guard}' if args.router_guard is not None else ''}` "
        f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, llama-cpp-python {llama_cpp.__version__}; demo model; {n} eval questions, "
        f"{args.per_domain} per domain, teacher-forced over 32 new tokens at most, against one fp32 reference trace; statistics from {args.calib_per_domain} calibration "
        f"questions per domain, CT-only: {args.calib_per_domain * 4} CT questions; {(time.time() - t0) / 60:.1f} min). Bits per weight and MB count the planned "
        f"matrices ({params:,} weights: LLM matrices, embedding and projector for the PyTorch rows; the ONNX and TensorRT backends leave the embedding in floating point), scales included. TensorRT rows: the graphs the engines were built from, on ONNX Runtime CPU at MatMulNBits accuracy level 0 (the engines need a GPU).",
        "",
        "| configuration | bits/weight | MB | KL (mean) | KL CT | KL MRI | KL X-ray | KL pathology | top-1 tokens | routing | answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["domains"]
        routing = "n/a (llama.cpp reports none)" if r["routing"] is None else f"{r['routing']:.2%}"
        lines.append(
            f"| {r['name']} | {r['bits']:.2f} | {r['mb']:.3f} | {r['kl']:.2e} | {d['ct']:.2e} | {d['mri']:.2e} | {d['xray']:.2e} | {d['pathology']:.2e} | "
            f"{r['tokens']:.2%} | {routing} | {r['answers']:.2%} |"
        )
    if acc_set is not None:
        lines += _accuracy_table(rows, reference_accuracy, len(acc_set[0]), args.accuracy)
    if refused:
        lines += ["", "Refused (the tool's own message):", "", *(f"* {r}" for r in refused)]
    if checks:
        lines += ["", "Whole-plan router check (`calibration.routing`), on the calibration probe sequences the plans were chosen on:", "", *(f"* {c}" for c in checks)]
    if plans_only:
        u3, plan3 = rows[0], next((r for r in rows if r["name"].startswith("plan at uniform int3") and "per-domain" in r["name"]), None)
        ct3 = next((r for r in rows if r["name"].startswith("plan at uniform int3") and "CT-only" in r["name"]), None)
        if plan3 is not None:
            lines += ["", f"At the bytes of uniform int3 GPTQ the {'proxy ' if args.proxy_plans else ''}plan's KL is **{plan3['kl'] / u3['kl']:.2f}×** uniform's (bound ≤ 0.25×), top-1 tokens {plan3['tokens']:.2%} and routing {plan3['routing']:.2%} (bounds ≥ 99.5 %)."]
        if plan3 is not None and ct3 is not None:
            change = ", ".join(f"{d} {ct3['domains'][d] / plan3['domains'][d] - 1:+.0%}" for d in DOMAINS)
            lines.append(f"The same budget planned from CT-only statistics changes each domain's KL by: {change} (per-domain calibration wins where the change is positive).")
        same = next((r for r in rows if r["name"].startswith("the same plan's types, CT-only")), None)
        if plan3 is not None and same is not None:
            change = ", ".join(f"{d} {same['domains'][d] / plan3['domains'][d] - 1:+.0%}" for d in DOMAINS)
            lines.append(f"The per-domain plan's own types with GPTQ codes from CT-only Hessians change each domain's KL by: {change} (the calibration alone, at the plan's allocation; bound ≥ +15 % on MRI, X-ray and pathology).")
    block = "quantization_report_proxy" if args.proxy_plans else "quantization_report_plans" if args.plans_only else "quantization_report"
    block += "_guard" if args.router_guard is not None else ""
    publish_block(DOC, f"<!-- {block}:begin -->", f"<!-- {block}:end -->", lines, "Per-expert quantization", publish=not args.no_doc)


def _accuracy_table(rows: list[dict], ref: dict, n: int, per_domain: int) -> list[str]:
    """Closed accuracy and open recall against the fp32 reference's, overall and per domain; the
    issue's bounds: closed ≥ fp32 − 1 point overall and − 2 points per domain, open recall ≥ 97 % of fp32."""
    keys = ("overall", *DOMAINS)
    head = " | ".join(f"closed {k}" for k in keys) + " | " + " | ".join(f"open {k}" for k in keys)
    lines = [
        "",
        f"Greedy answers on {n} eval questions ({per_domain} per domain at most; official scoring: closed accuracy, open recall, in %), "
        "each cell the configuration's value and its difference from the fp32 reference (closed: points; open: % of fp32's recall).",
        "",
        f"| configuration | {head} |",
        "|---|" + "---|" * (2 * len(keys)),
        "| fp32 reference | " + " | ".join(f"{ref[k]['closed_accuracy']:.1f}" for k in keys) + " | " + " | ".join(f"{ref[k]['open_recall']:.1f}" for k in keys) + " |",
    ]
    for r in rows:
        a = r.get("accuracy")
        if a is None:
            continue
        closed = " | ".join(f"{a[k]['closed_accuracy']:.1f} ({a[k]['closed_accuracy'] - ref[k]['closed_accuracy']:+.1f})" for k in keys)
        opened = " | ".join(f"{a[k]['open_recall']:.1f} ({100 * a[k]['open_recall'] / ref[k]['open_recall']:.0f} %)" for k in keys)
        lines.append(f"| {r['name']} | {closed} | {opened} |")
    return lines


if __name__ == "__main__":
    main()
