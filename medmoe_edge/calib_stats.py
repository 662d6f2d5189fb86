"""Calibration statistics: what one teacher-forced pass over a calibration set records, on disk.

A statistics directory (`medmoe-edge calibrate --out STATS`) holds two files, as a trace does:

    stats.safetensors   per linear layer (by released checkpoint key) its input Hessian
                        H = Σ x xᵀ over exactly the tokens that reach it, the imatrix diagonal
                        diag(H)/n, routed-token counts, router-margin histograms, and the
                        teacher-forced sequences kept for sensitivity measurement
    stats.json          header: model and set hashes, settings, the cache key, token counts,
                        and the few-token experts with what was done about them

Routed experts see only their routed tokens (the eager dispatch gathers each expert's rows, so a
hook on an expert's fc1 sees exactly them, spec §2.3-2.4). An expert with fewer than
`n_min = MIN_TOKENS_PER_INPUT × d_in` tokens gets the same layer's meta-expert Hessian blended in,
scaled to the missing tokens (the meta expert reads the same x on every token, §2.3.6), and
fewer than n_min/4 tokens also raises its minimum precision to `FEW_TOKEN_MIN_BITS`: its measured
sensitivity is unreliable (quantization-study §1). Both are listed in the header (`fallbacks`)
and printed by `calibrate`; nothing is adjusted silently.

The cache key hashes the model's source files, the set's manifest and the settings: `calibrate`
reuses a directory whose key matches and `quantize` refuses statistics of another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import InputError

STATS_VERSION = 2  # 2: shared Hessians (q/k/v, gate/up) stored once
STATS_STEM = "stats"
MIN_TOKENS_PER_INPUT = 4  # n_min = 4·d_in tokens for a well-conditioned H (quantization-study §1)
FEW_TOKEN_MIN_BITS = 4
TOKEN_KINDS = ("image", "question", "answer")  # answer = teacher-forced answer tokens + EOS
MARGIN_BINS = 20  # router margin p1 − p2 histogram over [0, 1]


@dataclass(frozen=True)
class CalibSettings:
    """What a calibration pass was asked for (part of the cache key).

    Attributes:
        set_name: the split name or manifest path.
        set_sha256: hash of the set's manifest.
        domains: the domains kept (in the set's order).
        per_domain: questions used per domain (None: all).
        sensitivity_per_domain: sequences per domain kept for sensitivity measurement.
        preprocess: image preprocessing mode.
    """

    set_name: str
    set_sha256: str
    domains: tuple[str, ...]
    per_domain: int | None
    sensitivity_per_domain: int
    preprocess: str

    def key(self, model_sha256: str) -> str:
        blob = json.dumps({"model": model_sha256, "settings": asdict(self), "version": STATS_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Fallback:
    """A linear layer whose calibration tokens were too few, and what was done."""

    key: str  # checkpoint weight key
    tokens: int
    n_min: int
    action: str  # "meta-hessian-blend" | "meta-hessian-blend+min-bits" | "no-tokens: meta hessian, imatrix=1, min-bits"
    min_bits: int | None = None


@dataclass
class CalibStats:
    """Statistics of one calibration pass (see the module docstring).

    Attributes:
        model_sha256: source hash of the checkpoint (as bundle manifests record it).
        settings: what was asked for.
        hessians: checkpoint weight key → Σ x xᵀ [K, K] (fp32, accumulated in fp32); matrices
            that read one input (q/k/v, gate/up) share one tensor object.
        tokens: checkpoint weight key → inputs summed into its Hessian.
        routed: [MoE layers, experts, domains, TOKEN_KINDS] routed-token counts (top-1 slot).
        margins: [MoE layers, domains, MARGIN_BINS] histogram of router margins p1 − p2.
        moe_layers: the MoE layer indices, in the order of `routed` and `margins`.
        sequences: kept teacher-forced sequences for sensitivity (token ids with image
            placeholders, pixel values, answer start in spliced positions, domain).
        fallbacks: the few-token linears and what was done.
    """

    model_sha256: str
    label: str
    settings: CalibSettings
    hessians: dict[str, torch.Tensor]
    tokens: dict[str, int]
    routed: torch.Tensor
    margins: torch.Tensor
    moe_layers: tuple[int, ...]
    sequences: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    meta_of: dict[str, str] = field(default_factory=dict)  # expert weight key → its layer's meta weight key

    @property
    def key(self) -> str:
        return self.settings.key(self.model_sha256)

    # --- few-token handling ------------------------------------------------------------

    def apply_fallbacks(self) -> None:
        """Blend the meta expert's Hessian into every expert with fewer than n_min tokens and
        record it (`fallbacks`); called once by the collector, before saving."""
        self.fallbacks = []
        blended: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(H) → (H, blend): a shared H is blended once and stays shared
        for key, meta in sorted(self.meta_of.items()):
            h, n = self.hessians[key], self.tokens[key]
            n_min = MIN_TOKENS_PER_INPUT * h.shape[0]
            if n >= n_min:
                continue
            if id(h) not in blended:
                hm, nm = self.hessians[meta], max(self.tokens[meta], 1)
                blended[id(h)] = (h, (h.double() + hm.double() * ((n_min - n) / nm)).float())
            self.hessians[key] = blended[id(h)][1]
            few = n < n_min // 4
            action = "no-tokens: meta hessian, imatrix=1, min-bits" if n == 0 else ("meta-hessian-blend+min-bits" if few else "meta-hessian-blend")
            self.fallbacks.append(Fallback(key, n, n_min, action, FEW_TOKEN_MIN_BITS if few else None))

    def min_bits(self, key: str) -> int | None:
        """The smallest code width a linear may get (few-token experts), None: no floor."""
        return next((f.min_bits for f in self.fallbacks if f.key == key), None)

    def imatrix(self, key: str) -> torch.Tensor:
        """Mean x² per input column over the tokens that reached the linear (llama.cpp's imatrix);
        all ones for a linear that saw no token, as llama-imatrix writes."""
        n = self.tokens.get(key, 0)
        if n == 0:
            return torch.ones(self.hessians[key].shape[0])
        return torch.diag(self.hessians[key]).float() / n

    def domain_share(self) -> torch.Tensor:
        """[MoE layers, experts, domains]: share of each expert's routed tokens per domain."""
        per = self.routed.sum(-1).double()
        return (per / per.sum(-1, keepdim=True).clamp_min(1)).float()

    # --- files ----------------------------------------------------------------------------

    def save(self, directory: Path) -> list[Path]:
        """Write stats.safetensors and stats.json into `directory`, each atomically."""
        from safetensors.torch import save_file

        tensors, stored, shared = {}, {}, {}
        for k, v in self.hessians.items():  # a Hessian shared by several matrices is one tensor: written once
            if id(v) in stored:
                shared[k] = stored[id(v)]
            else:
                stored[id(v)] = k
                tensors[f"hessian/{k}"] = v.float().contiguous()
        tensors |= {"routed": self.routed.to(torch.int64).contiguous(), "margins": self.margins.to(torch.int64).contiguous()}
        seqs = []
        for i, s in enumerate(self.sequences):
            tensors[f"seq/{i}/pixel_values"] = s["pixel_values"].float().contiguous()
            seqs.append({k: v for k, v in s.items() if k != "pixel_values"})
        meta = {
            "version": STATS_VERSION,
            "tool": __version__,
            "key": self.key,
            "model_sha256": self.model_sha256,
            "label": self.label,
            "settings": asdict(self.settings),
            "moe_layers": list(self.moe_layers),
            "tokens": self.tokens,
            "meta_of": self.meta_of,
            "shared": shared,
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "sequences": seqs,
        }
        st, js = directory / f"{STATS_STEM}.safetensors", directory / f"{STATS_STEM}.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{st.name}.")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, st)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{js.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(tmp, js)
        return [st, js]

    @classmethod
    def load(cls, directory: Path) -> CalibStats:
        """Read statistics written by `save`.

        Raises:
            InputError: not a statistics directory, corrupt, or of another version (naming the fix).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        st, js = directory / f"{STATS_STEM}.safetensors", directory / f"{STATS_STEM}.json"
        if not (st.is_file() and js.is_file()):
            raise InputError(f"{directory} holds no calibration statistics ({STATS_STEM}.json/.safetensors): make them with `medmoe-edge calibrate --model M --out {directory}`")
        try:
            meta = json.loads(js.read_text())
            if meta.get("version") != STATS_VERSION:
                raise InputError(f"{js} is statistics version {meta.get('version')}; this medmoe-edge reads version {STATS_VERSION}: run medmoe-edge calibrate again")
            flat = load_file(str(st))
            settings = CalibSettings(**{**meta["settings"], "domains": tuple(meta["settings"]["domains"])})
            seqs = [dict(s, pixel_values=flat[f"seq/{i}/pixel_values"]) for i, s in enumerate(meta["sequences"])]
            stats = cls(
                model_sha256=meta["model_sha256"],
                label=meta["label"],
                settings=settings,
                hessians=share({k[len("hessian/") :]: v for k, v in flat.items() if k.startswith("hessian/")}, meta["shared"]),
                tokens={k: int(v) for k, v in meta["tokens"].items()},
                routed=flat["routed"],
                margins=flat["margins"],
                moe_layers=tuple(meta["moe_layers"]),
                sequences=seqs,
                fallbacks=[Fallback(**f) for f in meta["fallbacks"]],
                meta_of=dict(meta["meta_of"]),
            )
        except InputError:
            raise
        except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
            raise InputError(f"calibration statistics in {directory} are corrupt ({type(e).__name__}: {e}): run medmoe-edge calibrate again") from None
        if stats.key != meta.get("key"):
            raise InputError(f"calibration statistics in {directory} do not match their own cache key (edited?): run medmoe-edge calibrate again")
        return stats

    def check_model(self, model_sha256: str, model: str, directory: Path) -> None:
        """Refuse statistics of another checkpoint.

        Raises:
            InputError: naming the calibrate command that makes the right ones.
        """
        if self.model_sha256 != model_sha256:
            raise InputError(f"--stats {directory} was computed from another model ({self.label}; checkpoint SHA-256 differs from {model}'s): run `medmoe-edge calibrate --model {model} --out NEW_STATS` and pass that")

    def check_set(self, set_sha256: str, set_name: str, directory: Path) -> None:
        """Refuse statistics of another calibration set."""
        if self.settings.set_sha256 != set_sha256:
            raise InputError(f"--stats {directory} was computed on calibration set {self.settings.set_name!r}, not {set_name!r} (manifest SHA-256 differs): run medmoe-edge calibrate --set {set_name} --out NEW_STATS")


def share(values: dict, shared: dict[str, str]) -> dict:
    """`values` with each key of `shared` given its source's value (the same object)."""
    return {**values, **{k: values[src] for k, src in shared.items()}}


def read_key(directory: Path) -> str | None:
    """The cache key of a statistics directory, None when it holds none (cheap: the JSON only)."""
    js = Path(directory) / f"{STATS_STEM}.json"
    try:
        return json.loads(js.read_text()).get("key")
    except (OSError, ValueError):
        return None


__all__ = ["FEW_TOKEN_MIN_BITS", "MARGIN_BINS", "MIN_TOKENS_PER_INPUT", "STATS_STEM", "TOKEN_KINDS", "CalibSettings", "CalibStats", "Fallback", "read_key", "share"]
