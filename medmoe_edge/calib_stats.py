"""Calibration statistics: what one teacher-forced pass over a calibration set records, on disk.

A statistics directory (`medmoe-edge calibrate --out STATS`) holds:

    stats-hessians-NNN.safetensors
                        per linear layer (by released checkpoint key) its input Hessian
                        H = Σ x xᵀ over exactly the tokens that reach it (the imatrix diagonal is
                        diag(H)/n), one file per collection pass (`calibration.collect`: a model
                        whose Hessians exceed the free memory is collected a few layers at a time)
    stats.safetensors   routed-token counts, router-margin histograms, and the teacher-forced
                        sequences kept for sensitivity measurement
    stats.json          header: model and set hashes, settings, the cache key, token counts,
                        which file holds each Hessian, and the few-token experts with what was
                        done about them

`CalibStats.load` reads the Hessians lazily (`HessianStore`), a few at a time: a full-size Phi-2
Med-MoE's are 44.5 GB, and `quantize` needs one matrix's at a time.

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
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import InputError

STATS_VERSION = 3  # 2: shared Hessians (q/k/v, gate/up) stored once; 3: Hessians in per-pass files, read lazily
STATS_STEM = "stats"
HESSIAN_FILE = "stats-hessians-{:03d}.safetensors"  # one per collection pass
HESSIAN_FILE_RE = re.compile(r"stats-hessians-\d{3}\.safetensors")  # the names HESSIAN_FILE makes
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


def blend_few_tokens(hessians: dict[str, torch.Tensor], tokens: dict[str, int], meta_of: dict[str, str]) -> list[Fallback]:
    """Blend the meta expert's Hessian into every expert of `hessians` with fewer than n_min
    tokens, in place, and return what was done (`CalibStats.fallbacks`). The collector calls it on
    each pass's Hessians before writing them; an expert and its meta expert are in one layer, so
    in one pass."""
    out = []
    blended: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(H) → (H, blend): a shared H is blended once and stays shared
    for key, meta in sorted(meta_of.items()):
        if key not in hessians:
            continue
        h, n = hessians[key], tokens[key]
        n_min = MIN_TOKENS_PER_INPUT * h.shape[0]
        if n >= n_min:
            continue
        if id(h) not in blended:
            hm, nm = hessians[meta], max(tokens[meta], 1)
            blended[id(h)] = (h, (h.double() + hm.double() * ((n_min - n) / nm)).float())
        hessians[key] = blended[id(h)][1]
        few = n < n_min // 4
        action = "no-tokens: meta hessian, imatrix=1, min-bits" if n == 0 else ("meta-hessian-blend+min-bits" if few else "meta-hessian-blend")
        out.append(Fallback(key, n, n_min, action, FEW_TOKEN_MIN_BITS if few else None))
    return out


class HessianStore(Mapping):
    """Checkpoint weight key → Hessian, read from the statistics' files when asked for.

    The last `keep` tensors read stay in memory, by stored name: matrices that share one Hessian
    (q/k/v, gate/up) get the same tensor object, so GPTQ's factorisation cache (`GptqFactors`, by
    identity) serves all of them, and a matrix quantized at several widths reads its file once.
    """

    def __init__(self, directory: Path, index: dict[str, tuple[str, str]], keep: int = 4) -> None:
        self.directory = Path(directory)
        self.index = index  # key → (file name, tensor name)
        self.keep = keep
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def __getitem__(self, key: str) -> torch.Tensor:
        where = self.index[key]
        if where in self._cache:
            self._cache.move_to_end(where)
            return self._cache[where]
        from safetensors import safe_open

        with safe_open(str(self.directory / where[0]), framework="pt") as f:
            t = f.get_tensor(where[1])
        self._cache[where] = t
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return t

    def __contains__(self, key: object) -> bool:
        return key in self.index  # Mapping's default would read the tensor to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def resident(self) -> int:
        """How many Hessians are in memory now (at most `keep`)."""
        return len(self._cache)

    def files(self) -> list[str]:
        return sorted({f for f, _ in self.index.values()})


def save_hessians(hessians: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[str, str]]:
    """Write one pass's Hessians into `path` (a tensor shared by several keys once) and return
    their index entries (key → (file name, tensor name)) for `HessianStore`."""
    from safetensors.torch import save_file

    tensors, stored, index = {}, {}, {}
    for k, v in hessians.items():
        if id(v) not in stored:
            stored[id(v)] = f"hessian/{k}"
            tensors[stored[id(v)]] = v.float().contiguous()
        index[k] = (path.name, stored[id(v)])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return index


@dataclass
class CalibStats:
    """Statistics of one calibration pass (see the module docstring).

    Attributes:
        model_sha256: source hash of the checkpoint (as bundle manifests record it).
        settings: what was asked for.
        hessians: checkpoint weight key → Σ x xᵀ [K, K] (fp32, accumulated in fp32); matrices
            that read one input (q/k/v, gate/up) share one tensor object. Loaded statistics
            hold a `HessianStore`, which reads them from disk when asked for.
        tokens: checkpoint weight key → inputs summed into its Hessian.
        routed: [MoE layers, experts, domains, TOKEN_KINDS] routed-token counts (top-1 slot).
        margins: [MoE layers, domains, MARGIN_BINS] histogram of router margins p1 − p2.
        moe_layers: the MoE layer indices, in the order of `routed` and `margins`.
        sequences: kept teacher-forced sequences for sensitivity (token ids with image
            placeholders, pixel values, answer start in spliced positions, domain).
        fallbacks: the few-token linears and what was done.
        passes: how many passes over the set collected the Hessians (the free memory decides;
            the statistics are the same, bit for bit, whatever the number).
    """

    model_sha256: str
    label: str
    settings: CalibSettings
    hessians: Mapping[str, torch.Tensor]
    tokens: dict[str, int]
    routed: torch.Tensor
    margins: torch.Tensor
    moe_layers: tuple[int, ...]
    sequences: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    meta_of: dict[str, str] = field(default_factory=dict)  # expert weight key → its layer's meta weight key
    passes: int = 1

    @property
    def key(self) -> str:
        return self.settings.key(self.model_sha256)

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
        """Write stats.safetensors and stats.json into `directory`, each atomically, beside the
        Hessians' files the collector wrote there pass by pass (`hessians` is their store)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if not (isinstance(self.hessians, HessianStore) and self.hessians.directory == directory):
            raise ValueError(f"the Hessians are not in {directory}: the collector writes them there before the header")
        index = self.hessians.index
        tensors = {"routed": self.routed.to(torch.int64).contiguous(), "margins": self.margins.to(torch.int64).contiguous()}
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
            "hessians": {k: list(v) for k, v in index.items()},
            "passes": self.passes,
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
        return [st, js, *(directory / f for f in sorted({f for f, _ in index.values()}))]

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
            if not directory.exists():
                raise InputError(f"{directory} does not exist: make calibration statistics there with `medmoe-edge calibrate --model M --out {directory}`")
            raise InputError(f"{directory} holds no calibration statistics ({STATS_STEM}.json/.safetensors): make them with `medmoe-edge calibrate --model M --out {directory}`")
        try:
            meta = json.loads(js.read_text())
            if meta.get("version") != STATS_VERSION:
                raise InputError(f"{js} is statistics version {meta.get('version')}; this medmoe-edge reads version {STATS_VERSION}: run medmoe-edge calibrate again")
            flat = load_file(str(st))
            settings = CalibSettings(**{**meta["settings"], "domains": tuple(meta["settings"]["domains"])})
            seqs = [dict(s, pixel_values=flat[f"seq/{i}/pixel_values"]) for i, s in enumerate(meta["sequences"])]
            hessians = HessianStore(directory, {k: (str(f), str(n)) for k, (f, n) in meta["hessians"].items()})
            check_hessian_files(hessians)
            stats = cls(
                model_sha256=meta["model_sha256"],
                label=meta["label"],
                settings=settings,
                hessians=hessians,
                tokens={k: int(v) for k, v in meta["tokens"].items()},
                routed=flat["routed"],
                margins=flat["margins"],
                moe_layers=tuple(meta["moe_layers"]),
                sequences=seqs,
                fallbacks=[Fallback(**f) for f in meta["fallbacks"]],
                meta_of=dict(meta["meta_of"]),
                passes=int(meta["passes"]),
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


def check_hessian_files(store: HessianStore) -> None:
    """Every tensor the index names is in its file (headers only: the Hessians are read later).

    Raises:
        ValueError: a name that is not one `save_hessians` writes; KeyError: a tensor is missing;
        OSError, SafetensorError: a file is missing or unreadable.
    """
    from safetensors import safe_open

    for name in store.files():
        if not HESSIAN_FILE_RE.fullmatch(name):  # an edited index must not reach outside the directory
            raise ValueError(f"{name!r} is not a Hessian file name")
        with safe_open(str(store.directory / name), framework="pt") as f:
            have = set(f.keys())
        missing = [t for file, t in store.index.values() if file == name and t not in have]
        if missing:
            raise KeyError(f"{name} lacks {missing[0]}")


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


__all__ = ["FEW_TOKEN_MIN_BITS", "HESSIAN_FILE", "HessianStore", "blend_few_tokens", "save_hessians", "MARGIN_BINS", "MIN_TOKENS_PER_INPUT", "STATS_STEM", "TOKEN_KINDS", "CalibSettings", "CalibStats", "Fallback", "read_key", "share"]
