"""`medmoe-edge calibrate`: per-domain teacher-forced statistics for `quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..calib_stats import TOKEN_KINDS
from ..imaging import PreprocessMode
from ..quantization import SENSITIVITY_PER_DOMAIN, calibrate, parse_gib
from .common import err, out, progress_bar, user_errors


@user_errors
def calibrate_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for stats.json, stats.safetensors and the Hessians' files (new, empty, or holding these same statistics: then they are reused).")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, or a hub id.")] = "demo",
    set_name: Annotated[str, typer.Option("--set", help="calibration (the built-in split), a .jsonl manifest, or a directory holding one.")] = "calibration",
    domains: Annotated[str | None, typer.Option("--domains", help="Comma-separated domains to calibrate on (e.g. ct,mri) [default: every domain of the set].")] = None,
    per_domain: Annotated[int | None, typer.Option("--per-domain", help="Use the first N questions of each domain [default: all].")] = None,
    sensitivity: Annotated[int, typer.Option("--sensitivity-per-domain", help="Sequences per domain kept for sensitivity measurement by quantize.")] = SENSITIVITY_PER_DOMAIN,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad (default) or crop.")] = PreprocessMode.PAD,
    hessian_memory: Annotated[
        float | None,
        typer.Option("--hessian-memory", help="GiB the input Hessians (and the hidden states carried between passes) may hold at once; more than that is collected a few layers per pass, with the same result [default: the free memory less the model's weights, less 20 %]."),
    ] = None,
) -> None:
    """Record routed-token counts, per-linear input Hessians over each expert's own tokens, imatrix diagonals and router margins."""
    doms = [d.strip() for d in domains.split(",") if d.strip()] if domains else None
    hessian_bytes = parse_gib(hessian_memory, "--hessian-memory")
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=None)
        stats, cached = calibrate(
            model, out_dir, set_name=set_name, domains=doms, per_domain=per_domain, sensitivity_per_domain=sensitivity, preprocess=preprocess,
            hessian_memory=hessian_bytes, status=err.status, progress=lambda i, n: bar.update(task, completed=i, total=n)
        )
    s = stats.settings
    out.print(f"{'reused cached' if cached else 'computed'} statistics of {stats.label} on {s.set_name} ({', '.join(s.domains)}) in {out_dir} (key {stats.key[:12]})", highlight=False)
    if stats.passes > 1:
        out.print(f"the Hessians did not fit in memory at once: collected in {stats.passes} passes over consecutive layers (same statistics as one pass)", highlight=False)
    share = stats.domain_share()
    t = Table(title="routed tokens per expert (image/question/answer) and share from each domain")
    t.add_column("layer.expert")
    t.add_column("tokens", justify="right")
    for d in s.domains:
        t.add_column(d, justify="right")
    for li, layer in enumerate(stats.moe_layers):
        for e in range(stats.routed.shape[1]):
            kinds = stats.routed[li, e].sum(0).tolist()
            t.add_row(f"{layer}.{e}", "/".join(str(k) for k in kinds), *(f"{share[li, e, d]:.0%}" for d in range(len(s.domains))))
    out.print(t)
    low = stats.margins[..., :2].sum().item() / max(stats.margins.sum().item(), 1)
    out.print(f"router margin p1-p2 < 0.1 on {low:.1%} of positions (tokens whose routing a small error can flip)", highlight=False)
    if stats.fallbacks:
        for f in stats.fallbacks:
            out.print(f"[yellow]few tokens:[/] {f.key}: {f.tokens} < {f.n_min} → {f.action}" + (f" (at least {f.min_bits} bits)" if f.min_bits else ""), highlight=False, soft_wrap=True)  # one line per matrix, never wrapped
    else:
        out.print(f"every linear saw at least 4×d_in tokens (kinds: {', '.join(TOKEN_KINDS)}); no fallback needed", highlight=False)
