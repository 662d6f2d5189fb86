"""One teacher-forced pass over a calibration set → `CalibStats` (see `medmoe_edge.calib_stats`).

A forward pre-hook on every quantizable `nn.Linear` of the language model (attention, dense FFN,
routed experts, meta experts, projector; never the router) adds x xᵀ of the rows it is called
with; the lm_head's is added from the final hidden states (its logits are never computed here).
Because the reference dispatch calls each routed expert on exactly the rows its router sent it
(`MoEFFN._dispatch_eager`, spec §2.4: no token is dropped), an expert's Hessian is over its own
routed tokens and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from medmoe_edge.calib_stats import MARGIN_BINS, TOKEN_KINDS, CalibSettings, CalibStats, share
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError
from medmoe_edge.imaging import PreprocessMode

from .teacher import TeacherSequence, hidden, prepare, spliced_kinds

Progress = Callable[[int, int], None]

# Projections that read the very tensor another projection of the same module reads: their Hessian
# is the same matrix, so it is accumulated once and shared (StableLM's q/k/v and gate/up; Phi-2's
# q/k/v). A shared Hessian is one tensor object, saved once (`CalibStats.save`).
SAME_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def quantizable_linears(loaded: LoadedModel) -> dict[str, nn.Linear]:
    """Checkpoint weight key → module, for every Linear a plan may quantize (routers excluded, §2.3)."""
    out = {}
    for name, mod in loaded.model.lm.named_modules():
        if isinstance(mod, nn.Linear) and ".gate.wg" not in name and not name.endswith("coefficient"):
            out[f"{name}.weight"] = mod
    return out


def shared_inputs(keys: Sequence[str]) -> dict[str, str]:
    """Weight key → the key whose Hessian it shares (`SAME_INPUT`), for the keys present."""
    present, out = set(keys), {}
    for k in keys:
        head, _, tail = k.rpartition(".")
        parent, _, proj = head.rpartition(".")
        src = f"{parent}.{SAME_INPUT[proj]}.{tail}" if proj in SAME_INPUT else None
        if src in present:
            out[k] = src
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


def hessian_bytes(loaded: LoadedModel) -> int:
    """Bytes of the fp32 Hessian accumulators `collect` holds for the whole pass: one d_in × d_in
    per matrix with an input of its own (q/k/v and gate/up share one)."""
    linears = quantizable_linears(loaded)
    shared = shared_inputs(list(linears))
    return sum(4 * m.in_features**2 for k, m in linears.items() if k not in shared)


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
    shared = shared_inputs(list(linears))
    own = {k: m for k, m in linears.items() if k not in shared}
    # fp32 accumulation: float64 doubled both the time (the cost is rows × d_in² per call) and the
    # memory (the Hessians of a real-dimension model are gigabytes), and GPTQ damps H by 1 % anyway
    acc = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float32) for k, m in own.items()}
    tokens = dict.fromkeys(own, 0)

    def hook(key: str):
        def pre(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            acc[key].addmm_(x.T, x)
            tokens[key] += x.shape[0]

        return pre

    hooks = {k: hook(k) for k in own}
    head_key = next(k for k, m in own.items() if m is loaded.model.lm.lm_head)
    # the lm_head's logits are not needed here, only its input: its hook is called on the final hidden states
    handles = [m.register_forward_pre_hook(hooks[k]) for k, m in own.items() if k != head_key]
    routed = torch.zeros(len(moe_layers), spec.moe.num_experts, len(domains), len(TOKEN_KINDS), dtype=torch.int64)
    margins = torch.zeros(len(moe_layers), len(domains), MARGIN_BINS, dtype=torch.int64)
    kept: list[TeacherSequence] = []
    kept_per = dict.fromkeys(domains, 0)
    try:
        seqs = prepare(loaded, samples, root, preprocess)
        for n, seq in enumerate(seqs):
            h, routing = hidden(loaded, seq)
            hooks[head_key](None, (h,))
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
        hessians=share(acc, shared),
        tokens=share(tokens, shared),
        routed=routed,
        margins=margins,
        moe_layers=moe_layers,
        sequences=[s.to_json() for s in kept],
        meta_of=meta_pairs(list(linears)),
    )
    stats.apply_fallbacks()
    return stats


__all__ = ["SAME_INPUT", "collect", "hessian_bytes", "meta_pairs", "quantizable_linears", "select", "shared_inputs"]
