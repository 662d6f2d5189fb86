"""One teacher-forced pass over a calibration set → `CalibStats` (see `medmoe_edge.calib_stats`).

A forward pre-hook on every quantizable `nn.Linear` of the language model (attention, dense FFN,
routed experts, meta experts, projector, lm_head; never the router) adds x xᵀ of the rows it is
called with. Because the reference dispatch calls each routed expert on exactly the rows its
router sent it (`MoEFFN._dispatch_eager`, spec §2.4: no token is dropped), an expert's Hessian
is over its own routed tokens and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from medmoe_edge.calib_stats import MARGIN_BINS, TOKEN_KINDS, CalibSettings, CalibStats
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError
from medmoe_edge.imaging import PreprocessMode

from .teacher import TeacherSequence, forward, prepare, spliced_kinds

Progress = Callable[[int, int], None]


def quantizable_linears(loaded: LoadedModel) -> dict[str, nn.Linear]:
    """Checkpoint weight key → module, for every Linear a plan may quantize (routers excluded, §2.3)."""
    out = {}
    for name, mod in loaded.model.lm.named_modules():
        if isinstance(mod, nn.Linear) and ".gate.wg" not in name and not name.endswith("coefficient"):
            out[f"{name}.weight"] = mod
    return out


def meta_pairs(keys: Sequence[str]) -> dict[str, str]:
    """Routed expert weight key → the same layer's meta-expert key of the same projection."""
    out = {}
    for k in keys:
        if ".deepspeed_experts." in k:
            head, tail = k.split(".mlp.deepspeed_moe.experts.deepspeed_experts.")
            proj = tail.split(".", 1)[1]
            out[k] = f"{head}.mlp.meta_moe.{proj}"
    return out


def select(samples: Sequence, domains: Sequence[str] | None, per_domain: int | None) -> tuple[list, tuple[str, ...]]:
    """Samples of the asked domains (first `per_domain` of each), and the domains kept, in set order.

    Raises:
        InputError: a domain the set does not have, or nothing left.
    """
    dom = lambda s: s.domain.value if hasattr(s.domain, "value") else str(s.domain)  # noqa: E731
    present = list(dict.fromkeys(dom(s) for s in samples))
    want = present if not domains else list(domains)
    unknown = [d for d in want if d not in present]
    if unknown:
        raise InputError(f"--domains {unknown[0]!r} is not a domain of this set: use some of {', '.join(present)}")
    kept, seen = [], {d: 0 for d in want}
    for s in samples:
        d = dom(s)
        if d in seen and (per_domain is None or seen[d] < per_domain):
            kept.append(s)
            seen[d] += 1
    if not kept:
        raise InputError("the calibration set has no question of the asked domains: check --set and --domains")
    return kept, tuple(d for d in present if d in want)


def collect(
    loaded: LoadedModel,
    samples: Sequence,
    root: Path,
    settings: CalibSettings,
    *,
    model_sha256: str,
    label: str,
    preprocess: PreprocessMode = PreprocessMode.PAD,
    progress: Progress | None = None,
) -> CalibStats:
    """Run the teacher-forced pass over `samples` and return the statistics (few-token fallbacks applied)."""
    spec = loaded.spec
    moe_layers = tuple(sorted(spec.moe.layers))
    domains = settings.domains
    linears = quantizable_linears(loaded)
    acc = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in linears.items()}
    tokens = dict.fromkeys(linears, 0)

    def hook(key: str):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            acc[key].addmm_(x.T, x)
            tokens[key] += x.shape[0]

        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in linears.items()]
    routed = torch.zeros(len(moe_layers), spec.moe.num_experts, len(domains), len(TOKEN_KINDS), dtype=torch.int64)
    margins = torch.zeros(len(moe_layers), len(domains), MARGIN_BINS, dtype=torch.int64)
    kept: list[TeacherSequence] = []
    kept_per = dict.fromkeys(domains, 0)
    try:
        seqs = prepare(loaded, samples, root, preprocess)
        for n, seq in enumerate(seqs):
            _logits, routing = forward(loaded, seq)
            d = domains.index(seq.domain)
            kinds = spliced_kinds(seq.token_ids, spec.image_tokens, seq.answer_start)
            for li, layer in enumerate(moe_layers):
                r = routing[layer]
                top1 = r.experts[:, 0]
                for kind in range(len(TOKEN_KINDS)):
                    routed[li, :, d, kind] += torch.bincount(top1[kinds == kind], minlength=spec.moe.num_experts)
                top2 = r.probs.topk(min(2, r.probs.shape[-1]), dim=-1).values
                margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
                margins[li, d] += torch.histc(margin.float(), bins=MARGIN_BINS, min=0.0, max=1.0).to(torch.int64)
            if kept_per[seq.domain] < settings.sensitivity_per_domain:
                kept.append(seq)
                kept_per[seq.domain] += 1
            if progress:
                progress(n + 1, len(seqs))
    finally:
        for h in handles:
            h.remove()
    stats = CalibStats(
        model_sha256=model_sha256,
        label=label,
        settings=settings,
        hessians={k: v.float() for k, v in acc.items()},
        tokens=tokens,
        routed=routed,
        margins=margins,
        moe_layers=moe_layers,
        sequences=[s.to_json() for s in kept],
        meta_of=meta_pairs(list(linears)),
    )
    stats.apply_fallbacks()
    return stats


__all__ = ["collect", "meta_pairs", "quantizable_linears", "select"]
