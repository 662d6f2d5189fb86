"""A teacher-forced pass over a calibration set → `CalibStats` (see `medmoe_edge.calib_stats`).

A forward pre-hook on every quantizable `nn.Linear` of the language model (attention, dense FFN,
routed experts, meta experts, projector; never the router) adds x xᵀ of the rows it is called
with; the lm_head's is added from the final hidden states (its logits are never computed here).
Because the reference dispatch calls each routed expert on exactly the rows its router sent it
(`MoEFFN._dispatch_eager`, spec §2.4: no token is dropped), an expert's Hessian is over its own
routed tokens and nothing else.

Every Hessian is held until its pass ends, so a model whose Hessians exceed the memory (a full-size
Phi-2 Med-MoE's are 44.5 GB) is collected in several passes over consecutive layers
(`plan_passes`): each pass runs its layers on every sequence, from the hidden states the previous
pass stopped at, and writes its Hessians to their own file before the next begins. The decoder
runs once in all; only those hidden states are carried between passes, and the statistics are the
same, bit for bit, as one pass's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medmoe_edge.calib_stats import HESSIAN_FILE, MARGIN_BINS, TOKEN_KINDS, CalibSettings, CalibStats, HessianStore, blend_few_tokens, save_hessians, share
from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.errors import InputError

from .teacher import TeacherSequence, hidden, spliced_kinds

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
    """Bytes of the fp32 Hessian accumulators of the whole model: one d_in × d_in per matrix with
    an input of its own (q/k/v and gate/up share one)."""
    return sum(b for _keys, b in stage_hessians(loaded).values())


def stage_of(key: str, num_layers: int) -> int:
    """Where a matrix's input is computed: -1 the projector, i decoder layer i, `num_layers` the lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    if m:
        return int(m.group(1))
    return -1 if ".mm_projector." in key else num_layers


def stage_hessians(loaded: LoadedModel) -> dict[int, tuple[list[str], int]]:
    """Stage (`stage_of`) → (the keys whose Hessian it accumulates, their fp32 bytes), in model order."""
    linears = quantizable_linears(loaded)
    shared = shared_inputs(list(linears))
    out: dict[int, tuple[list[str], int]] = {}
    for k, m in linears.items():
        if k not in shared:
            st = stage_of(k, loaded.spec.text.num_layers)
            keys, b = out.get(st, ([], 0))
            out[st] = ([*keys, k], b + 4 * m.in_features**2)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class Pass:
    """One pass over the set: decoder layers [start, stop) and the Hessians it accumulates.

    The first pass starts from the embeddings (and holds the projector's Hessian); the last runs
    to the end with the final norm (and holds the lm_head's); any other stops before `stop` and
    hands the hidden states entering it to the next pass.
    """

    start: int
    stop: int
    keys: tuple[str, ...]
    nbytes: int
    last: bool


def carry_bytes(loaded: LoadedModel, seqs: Sequence[TeacherSequence]) -> int:
    """Bytes of the hidden states carried between passes: every spliced position of every sequence."""
    width = loaded.spec.text.hidden_size * loaded.model.dtype.itemsize
    return width * sum(len(spliced_kinds(s.token_ids, loaded.spec.image_tokens, s.answer_start)) for s in seqs)


def size(n: int) -> str:
    """Bytes for a message: GiB, or MiB below a tenth of one."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def plan_passes(loaded: LoadedModel, seqs: Sequence[TeacherSequence], memory: int | None) -> tuple[Pass, ...]:
    """The fewest passes over consecutive layers whose Hessians, with the hidden states carried
    between passes, fit in `memory` bytes (None: one pass).

    Raises:
        InputError: one layer's Hessians and the carried hidden states alone exceed `memory`.
    """
    n = loaded.spec.text.num_layers
    stages = stage_hessians(loaded)
    total = sum(b for _k, b in stages.values())
    if memory is None or total <= memory:
        return (Pass(0, n, tuple(k for keys, _b in stages.values() for k in keys), total, True),)
    carry = carry_bytes(loaded, seqs)
    largest = max(b for _k, b in stages.values())
    if largest + carry > memory:
        raise InputError(
            f"one layer's input Hessians ({size(largest)}) and the hidden states carried between passes ({size(carry)}) "
            f"need more than the {size(memory)} calibrate may hold: close other programs, calibrate fewer questions (--per-domain), or raise --hessian-memory if more is free"
        )
    groups: list[list[int]] = [[]]
    held = 0  # the Hessian bytes of the group being filled
    for st, (_k, b) in stages.items():
        if groups[-1] and held + b + carry > memory:
            groups.append([])
            held = 0
        groups[-1].append(st)
        held += b
    passes = []
    for i, g in enumerate(groups):
        last = i == len(groups) - 1
        start = 0 if i == 0 else passes[-1].stop
        stop = n if last else min(max(g) + 1, n)
        passes.append(Pass(start, stop, tuple(k for st in g for k in stages[st][0]), sum(stages[st][1] for st in g), last))
    return tuple(passes)


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
    seqs: Sequence[TeacherSequence],
    settings: CalibSettings,
    directory: Path,
    *,
    passes: Sequence[Pass],
    model_sha256: str,
    label: str,
    progress: Progress | None = None,
) -> CalibStats:
    """Run the teacher-forced passes over `seqs` (`plan_passes`), write each pass's Hessians into
    `directory` as it ends, and return the statistics (few-token fallbacks applied) reading them from there."""
    spec = loaded.spec
    moe_layers = tuple(sorted(spec.moe.layers))
    domains = settings.domains
    linears = quantizable_linears(loaded)
    shared = shared_inputs(list(linears))
    meta_of = meta_pairs(list(linears))
    own = {k: m for k, m in linears.items() if k not in shared}
    tokens = dict.fromkeys(own, 0)
    head_key = next(k for k, m in own.items() if m is loaded.model.lm.lm_head)
    routed = torch.zeros(len(moe_layers), spec.moe.num_experts, len(domains), len(TOKEN_KINDS), dtype=torch.int64)
    margins = torch.zeros(len(moe_layers), len(domains), MARGIN_BINS, dtype=torch.int64)
    kinds = [spliced_kinds(s.token_ids, spec.image_tokens, s.answer_start) for s in seqs]
    index: dict[str, tuple[str, str]] = {}
    fallbacks = []
    carry: list[torch.Tensor | None] | None = None  # hidden states entering the pass's first layer, per sequence
    for p, ps in enumerate(passes):
        # fp32 accumulation: float64 doubled both the time (the cost is rows × d_in² per call) and the
        # memory (the Hessians of a real-dimension model are gigabytes), and GPTQ damps H by 1 % anyway
        acc = {k: torch.zeros(own[k].in_features, own[k].in_features, dtype=torch.float32) for k in ps.keys}

        def hook(key: str, acc=acc):
            def pre(_mod, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                acc[key].addmm_(x.T, x)
                tokens[key] += x.shape[0]

            return pre

        hooks = {k: hook(k) for k in ps.keys}
        # the lm_head's logits are not needed here, only its input: its hook is called on the final hidden states
        handles = [own[k].register_forward_pre_hook(hooks[k]) for k in ps.keys if k != head_key]
        out: list[torch.Tensor | None] = []
        try:
            for n, seq in enumerate(seqs):
                inputs = None if carry is None else carry[n][None]
                if carry is not None:
                    carry[n] = None  # drop each carried row once used: the old and the new carry are never both whole
                h, routing = hidden(loaded, seq, start=ps.start, stop=None if ps.last else ps.stop, inputs=inputs)
                if ps.last:  # the lm_head's stage is always in the last pass
                    hooks[head_key](None, (h,))
                else:
                    out.append(h)
                d = domains.index(seq.domain)
                for layer, r in routing.items():
                    li = moe_layers.index(layer)
                    top1 = r.experts[:, 0]
                    for kind in range(len(TOKEN_KINDS)):
                        routed[li, :, d, kind] += torch.bincount(top1[kinds[n] == kind], minlength=spec.moe.num_experts)
                    top2 = r.probs.topk(min(2, r.probs.shape[-1]), dim=-1).values
                    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
                    margins[li, d] += torch.histc(margin.float(), bins=MARGIN_BINS, min=0.0, max=1.0).to(torch.int64)
                if progress:
                    progress(p * len(seqs) + n + 1, len(passes) * len(seqs))
        finally:
            for h in handles:
                h.remove()
        carry = out
        group = share(acc, {k: src for k, src in shared.items() if src in acc})
        fallbacks += blend_few_tokens(group, share(tokens, shared), meta_of)
        index |= save_hessians(group, directory / HESSIAN_FILE.format(p))
        del acc, group, hooks
    kept: list[TeacherSequence] = []
    kept_per = dict.fromkeys(domains, 0)
    for seq in seqs:
        if kept_per[seq.domain] < settings.sensitivity_per_domain:
            kept.append(seq)
            kept_per[seq.domain] += 1
    return CalibStats(
        model_sha256=model_sha256,
        label=label,
        settings=settings,
        hessians=HessianStore(directory, index),
        tokens=share(tokens, shared),
        routed=routed,
        margins=margins,
        moe_layers=moe_layers,
        sequences=[s.to_json() for s in kept],
        fallbacks=sorted(fallbacks, key=lambda f: f.key),
        meta_of=meta_of,
        passes=len(passes),
    )


__all__ = ["SAME_INPUT", "Pass", "carry_bytes", "collect", "hessian_bytes", "meta_pairs", "plan_passes", "quantizable_linears", "select", "shared_inputs", "stage_hessians", "stage_of"]
