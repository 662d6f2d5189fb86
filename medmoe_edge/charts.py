"""Tables, PNG charts and a self-contained HTML page for `compare` (and `bench`) reports.

Everything here reads the JSON a report writes (`comparison.CompareResult.to_json()`), so a
report can be redrawn from its compare.json alone. Charts are drawn with matplotlib (the
`report` extra: `pip install 'medmoe-edge[report]'`) on its Agg backend; without it the JSON,
the tables and the HTML page are still written, and the page says how to get the charts.
The HTML page embeds the PNGs as base64 data and inlines its tables and styles: one file to
open or attach anywhere.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path
from typing import Any

MIB = 2**20
CHART_FILES = ("decode_tok_s.png", "ttft.png", "fidelity_vs_size.png")
CHARTS_MISSING = "charts need matplotlib: pip install 'medmoe-edge[report]'"


def _f(v: float | None, fmt: str, dash: str = "–") -> str:
    return dash if v is None else format(v, fmt)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def speed_cells(row: dict[str, Any]) -> dict[str, str]:
    """The speed columns of one row as text."""
    r = row["decode_tok_s"]
    rate = "–" if r["median"] is None else f"{r['median']:.1f} ({r['p10']:.1f}–{r['p90']:.1f})"
    roof = row.get("roofline_fraction")
    return {
        "load (s)": _f(row.get("load_s"), ".2f"),
        "prefill (ms)": _f(None if row["prefill_s"]["median"] is None else row["prefill_s"]["median"] * 1000, ".0f"),
        "TTFT (ms)": _f(None if row["ttft_s"]["median"] is None else row["ttft_s"]["median"] * 1000, ".0f"),
        "decode tok/s (p10–p90)": rate,
        "roofline": "–" if roof is None else f"{roof:.2f}",
        "peak RSS (MiB)": _f(None if row.get("peak_rss_bytes") is None else row["peak_rss_bytes"] / MIB, ".0f"),
        "GPU (MiB)": _f(None if row.get("gpu_peak_bytes") is None else row["gpu_peak_bytes"] / MIB, ".0f"),
        "size (MiB)": _f(None if row.get("size_bytes") is None else row["size_bytes"] / MIB, ".1f"),
    }


def fidelity_cells(row: dict[str, Any]) -> dict[str, str]:
    """The fidelity and accuracy columns of one row as text."""
    f = row.get("fidelity")
    acc = (row.get("accuracy") or {}).get("overall")
    if acc:
        closed = "–" if acc["closed_accuracy"] is None else f"{acc['closed_accuracy']:.1f}"
        opened = "–" if acc["open_recall"] is None else f"{acc['open_recall']:.1f}"
        acc_text = f"{closed} / {opened}"
    else:
        acc_text = "–"
    if not f:
        return {"answers": "–", "tokens": "–", "cosine min": "–", "KL mean": "–", "routing": "–", "verdict": "–", "closed / open (%)": acc_text}
    verdict = {True: "pass", False: "FAIL", None: "reference" if row["runtime"] == "torch" and row["format"] == "checkpoint" else "no tolerances"}[f["passed"]]
    return {
        "answers": _pct(f["answer_agreement"]),
        "tokens": _pct(f["token_agreement"]),
        "cosine min": f"{f['logits_cosine_min']:.6f}",
        "KL mean": f"{f['kl_mean']:.2e}",
        "routing": "not reported" if f["routing_agreement"] is None else _pct(f["routing_agreement"]),
        "verdict": verdict,
        "closed / open (%)": acc_text,
    }


def markdown_table(data: dict[str, Any]) -> str:
    """The comparison as one Markdown table (speed, memory, size, fidelity, accuracy), then the reasons
    of rows that did not run."""
    rows = [r for r in data["rows"]]
    if not rows:
        return "(no rows)"
    keys = ["runtime", *speed_cells(rows[0]), *fidelity_cells(rows[0])]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["label"], f"{r['status']}: {r['reason']}"] + [""] * (len(keys) - 2)
        else:
            cells = [r["label"], *speed_cells(r).values(), *fidelity_cells(r).values()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def compare_charts(data: dict[str, Any], directory: Path) -> list[Path]:
    """decode_tok_s.png, ttft.png and fidelity_vs_size.png into `directory` (none without matplotlib)."""
    plt = _matplotlib()
    if plt is None:
        return []
    ok = [r for r in data["rows"] if r["status"] == "ok" and r["questions"]]
    if not ok:
        return []
    title = f"{data['model']} · {data['set']['questions']} {data['set']['name']} questions"
    out: list[Path] = []
    labels = [r["label"] for r in ok]
    colours = [f"C{i}" for i in range(len(ok))]

    def bars(values, lows, highs, ylabel, name, subtitle):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(ok) + 2), 3.6))
        xs = range(len(ok))
        vals = [v or 0.0 for v in values]
        err = [[max(0.0, (v or 0) - (lo if lo is not None else v or 0)) for v, lo in zip(values, lows)], [max(0.0, (hi if hi is not None else v or 0) - (v or 0)) for v, hi in zip(values, highs)]]
        ax.bar(xs, vals, color=colours, yerr=err, capsize=4)
        for x, v, hi in zip(xs, values, highs):
            ax.text(x, max(v or 0, hi or 0), "n/a" if v is None else f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{subtitle}\n{title}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        out.append(_save(fig, directory / name))
        plt.close(fig)

    d = [r["decode_tok_s"] for r in ok]
    bars([x["median"] for x in d], [x["p10"] for x in d], [x["p90"] for x in d], "decode tokens/s", "decode_tok_s.png", "decode tok/s (median, p10–p90 bars)")
    t = [r["ttft_s"] for r in ok]
    ms = lambda v: None if v is None else v * 1000  # noqa: E731
    bars([ms(x["median"]) for x in t], [ms(x["p10"]) for x in t], [ms(x["p90"]) for x in t], "time to first token (ms)", "ttft.png", "time to first token (median, p10–p90 bars)")

    fid = [r for r in ok if r.get("fidelity") and r.get("size_bytes")]
    if fid:
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        for r in fid:
            f = r["fidelity"]
            x = r["size_bytes"] / MIB
            ax.scatter([x], [100 * f["token_agreement"]], s=60, color=f"C{labels.index(r['label'])}", label=r["label"], zorder=3)
            ax.scatter([x], [100 * f["answer_agreement"]], s=60, marker="x", color=f"C{labels.index(r['label'])}", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_formatter(plt.FuncFormatter(lambda v, _p: ""))
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("size on disk (MiB, log scale)")
        ax.set_ylabel("agreement with the reference (%)")
        lo = min(min(100 * r["fidelity"]["token_agreement"], 100 * r["fidelity"]["answer_agreement"]) for r in fid)
        ax.set_ylim(min(lo - 2, 95), 100.8)
        ax.set_title(f"fidelity vs size: ● token agreement (teacher-forced), × answer agreement\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        out.append(_save(fig, directory / "fidelity_vs_size.png"))
        plt.close(fig)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#1b1f24;max-width:1400px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
td.reason{text-align:left;white-space:normal;color:#8a4600}
.fail{color:#b00020;font-weight:bold}.pass{color:#1a7f37}
img{max-width:100%;border:1px solid #eee;margin:.5em 1em .5em 0}
.note{color:#57606a;font-size:.85em}code{background:#f6f8fa;padding:0 .2em}
"""


def _table_html(rows: list[dict[str, Any]], cells) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "<p>No row ran.</p>"
    keys = list(cells(ok[0]))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["runtime", *keys])
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append(f"<tr><td>{html.escape(r['label'])}</td><td class=reason colspan={len(keys)}>{html.escape(r['status'])}: {html.escape(str(r['reason']))}</td></tr>")
            continue
        tds = []
        for k, v in cells(r).items():
            cls = " class=fail" if v == "FAIL" else " class=pass" if v == "pass" else ""
            tds.append(f"<td{cls}>{html.escape(v)}</td>")
        body.append(f"<tr><td>{html.escape(r['label'])}</td>{''.join(tds)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _accuracy_html(rows: list[dict[str, Any]]) -> str:
    acc = [(r["label"], r["accuracy"]) for r in rows if r.get("accuracy")]
    if not acc:
        return "<p class=note>The set has no ground-truth answers: no accuracy.</p>"
    domains = list(acc[0][1])
    head = "".join(f"<th>{html.escape(d)}<br>closed / open (%)</th>" for d in domains)
    body = []
    for label, a in acc:
        cells = []
        for d in domains:
            m = a.get(d) or {}
            cells.append(f"<td>{_f(m.get('closed_accuracy'), '.1f')} / {_f(m.get('open_recall'), '.1f')}</td>")
        body.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>runtime</th>{head}</tr>{''.join(body)}</table>"


def compare_html(data: dict[str, Any], charts: list[Path]) -> str:
    """One self-contained HTML page: settings, the speed and fidelity tables, accuracy per domain,
    the charts (PNG inlined as base64) and the notes."""
    s, bw = data["settings"], data["bandwidth"]
    imgs = "".join(f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in charts)
    if not charts:
        imgs = f"<p class=note>{html.escape(CHARTS_MISSING)}</p>"
    bw_text = "not measured" if bw["gbs"] is None else f"{bw['gbs']:.1f} GB/s ({bw['method']})"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    libs = ", ".join(f"{k} {v}" for k, v in data["libraries"].items())
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>medmoe-edge compare: {html.escape(data['model'])}</title><style>{_CSS}</style></head>
<body>
<h1>medmoe-edge compare: {html.escape(data['model'])}</h1>
<p>{data['set']['questions']} questions of <code>{html.escape(data['set']['name'])}</code>, up to {data['set']['max_new_tokens']} tokens each, device <code>{html.escape(str(s['device']))}</code>,
threads {html.escape(str(s['threads'] or 'runtime default'))}. Reference: the PyTorch runtime on {html.escape(data['reference']['label'])} (trace recorded once, logits {html.escape(data['reference']['logits'])}).
Memory bandwidth: {html.escape(bw_text)}.</p>
<p class=note>Not for clinical use: medmoe-edge is an engineering toolchain.</p>
<h2>Speed and memory</h2>{_table_html(data['rows'], speed_cells)}
<h2>Fidelity against the reference, and accuracy</h2>{_table_html(data['rows'], fidelity_cells)}
<h2>Accuracy per domain (the paper's scoring)</h2>{_accuracy_html(data['rows'])}
<h2>Charts</h2>{imgs}
<h2>How it was measured</h2><ul class=note>{notes}</ul>
<p class=note>medmoe-edge {html.escape(data['tool'])}; {html.escape(libs)}</p>
</body></html>
"""


__all__ = ["CHART_FILES", "compare_charts", "compare_html", "fidelity_cells", "markdown_table", "speed_cells"]
