"""The exporter interface, its registry and the one manifest builder.

An exporter turns a loaded Med-MoE checkpoint into a bundle of one `ArtifactKind`. It
declares what it accepts (precisions, typed options, the CLI flag its precision is spelled
with) and implements `write`: put the format's files into a directory and say what they are
(`ExportParts`). Everything every format shares is done once, here:

* option parsing: an option that belongs to another format is an error naming that format;
* loading the checkpoint and the atomic bundle directory (nothing appears until complete);
* the support files every bundle carries (configs, tokenizer; `support_files`);
* the reference trace embedded for device-side `verify` (`medmoe_edge.trace`);
* the manifest: file hashes, source checkpoint hash, toolchain versions, model facts,
  graph I/O, tensor groups by TensorId and the QuantPlan.

Exporters are found through the `medmoe_edge.exporters` entry-point group, the built-in
ONNX and GGUF exporters included (`medmoe_edge.export`). This module is core and imports
none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import __version__
from .bundle import GraphSpec, Manifest, ModelFacts, TensorGroup, checkpoint_sha256, file_entries, write_manifest
from .checkpoint import LoadedModel
from .ckpt_writer import atomic_dir
from .errors import InputError, RuntimeUnavailable, UnmappedTensor
from .imaging import PreprocessMode
from .plugins import PluginGroup
from .prompt import SYSTEM, build_prompt
from .quant_plan import QuantPlan
from .support_files import copy_support_files, source_files
from .tensor_ids import TensorId
from .verify import Tolerances
from .vocab import ArtifactKind, Precision

ENTRY_POINT_GROUP = "medmoe_edge.exporters"


@dataclass(frozen=True)
class ExportOption:
    """A format-specific option an exporter takes.

    Attributes:
        name: key in `ExportRequest.options`.
        flag: the CLI flag that sets it (e.g. "--mmproj-dtype").
        parse: turns the user's value into the typed value; raises InputError on a bad one.
        default: value when the option is not given.
    """

    name: str
    flag: str
    parse: Callable[[Any], Any]
    default: Any = None


@dataclass(frozen=True)
class ExportRequest:
    """What to export, checked by `Exporter.request`.

    Attributes:
        plan: precision of every weight group (uniform unless a quantization plan is given).
        options: the exporter's own options by `ExportOption.name`, defaults filled in.
        vision_tower: CLIP directory overriding the checkpoint's `mm_image_tower`.
    """

    plan: QuantPlan
    options: dict[str, Any] = field(default_factory=dict)
    vision_tower: Path | None = None

    @property
    def precision(self) -> Precision:
        return self.plan.default.precision


@dataclass(frozen=True)
class ExportParts:
    """What `Exporter.write` produced, for the shared manifest builder.

    Attributes:
        roles: bundle-relative path → role for the files the exporter wrote.
        graphs: named graphs with their I/O.
        tensor_groups: per TensorId group, the precision actually stored (read back where the
            format allows) and the parameter count.
        toolchain: library versions the exporter used (the builder adds medmoe_edge and torch).
        layout: format-specific model facts (e.g. {"moe_dispatch": ...}), kept in `ModelFacts.layout`.
        extra: format-specific settings (TensorRT profiles, fallbacks, overrides).
    """

    roles: dict[str, str]
    graphs: dict[str, GraphSpec]
    tensor_groups: tuple[TensorGroup, ...]
    toolchain: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Exporter(ABC):
    """Base class of exporter plugins: set the class attributes, implement `availability`, `write`
    and, when a checkpoint needs its own load settings, `load`."""

    name: ClassVar[str]  # the --format value
    artifact_kind: ClassVar[ArtifactKind]
    description: ClassVar[str]
    precisions: ClassVar[tuple[Precision, ...]]
    default_precision: ClassVar[Precision]
    precision_flag: ClassVar[str] = "--precision"
    runtime: ClassVar[str | None] = None  # the runtime that loads this format's bundles, when not the kind's default
    # `verify` bounds of a plugin format's bundles (built-in kinds have theirs in verify.TOLERANCES)
    tolerances: ClassVar[Tolerances | None] = None
    options: ClassVar[tuple[ExportOption, ...]] = ()

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(can it export here, why not / which library) with lazy imports."""

    @classmethod
    def flags(cls) -> tuple[str, ...]:
        """Every CLI flag this exporter takes."""
        return (cls.precision_flag, *(o.flag for o in cls.options))

    @classmethod
    def request(cls, given: dict[str, Any], *, plan: QuantPlan | None = None, vision_tower: Path | None = None) -> ExportRequest:
        """Check the user's options (flag → value, only those given) and fill in defaults.

        Raises:
            InputError: a flag this exporter does not take (naming the formats that do), or a bad value.
        """
        unknown = [f for f in given if f not in cls.flags()]
        if unknown:
            owners = [e.name for e in registered().values() if unknown[0] in e.flags()]
            where = f"it applies to --format {' / '.join(owners)}" if owners else "no format takes it"
            raise InputError(f"{unknown[0]} does not apply to --format {cls.name} ({where}); {cls.name} bundles take {', '.join(cls.flags())}")
        if cls.precision_flag in given and plan is not None:
            raise InputError(f"{cls.precision_flag} and a quantization plan contradict each other: give one")
        if plan is None:
            text = given.get(cls.precision_flag)
            precision = cls.default_precision if text is None else Precision.parse(str(text), allowed=cls.precisions, option=cls.precision_flag)
            plan = QuantPlan.uniform(precision)
        elif plan.default.precision not in cls.precisions:
            raise InputError(f"the plan's default precision {plan.default.precision.value} is not one --format {cls.name} writes: use one of {', '.join(p.value for p in cls.precisions)}")
        opts = {o.name: (o.parse(given[o.flag]) if o.flag in given else o.default) for o in cls.options}
        return ExportRequest(plan, opts, vision_tower)

    def load(self, model: str | Path, request: ExportRequest) -> LoadedModel:
        """Load the checkpoint for this export (default: fp32, or the plan's float precision)."""
        from .checkpoint import load_model

        p = request.precision
        return load_model(model, dtype=p.torch if p.is_float else Precision.FP32.torch, vision_tower=request.vision_tower)

    def check(self, loaded: LoadedModel, request: ExportRequest) -> None:
        """Refuse a checkpoint or request this format cannot take, before anything is written."""

    @abstractmethod
    def write(self, loaded: LoadedModel, out: Path, request: ExportRequest) -> ExportParts:
        """Write the format's files into `out` (an empty temporary directory) and describe them."""

    def export(self, model: str | Path, out: Path, request: ExportRequest, *, embed: Callable[[Path], dict[str, str]] | None = None) -> Manifest:
        """Export `model` to a bundle at `out`, atomically.

        Args:
            embed: called with the temporary bundle directory before the manifest is written;
                writes further files (the reference trace) and returns their roles.
        Returns:
            The manifest written into the bundle.
        Raises:
            InputError: `out` exists and is not empty, or the request does not fit the checkpoint.
            CheckpointError: the checkpoint cannot be loaded.
            RuntimeUnavailable: a library this format needs is missing.
        """
        ok, why = self.availability()
        if not ok:
            raise RuntimeUnavailable(f"--format {self.name} cannot export here: {why}")
        loaded = self.load(model, request)
        self.check(loaded, request)
        with atomic_dir(out) as tmp:
            parts = self.write(loaded, tmp, request)
            roles = dict(parts.roles) | copy_support_files(loaded, tmp)
            if embed is not None:
                roles |= embed(tmp)
            manifest = build_manifest(tmp, self, loaded, request, parts, roles)
            write_manifest(tmp, manifest)
        return manifest


def build_manifest(bundle: Path, exporter: Exporter, loaded: LoadedModel, request: ExportRequest, parts: ExportParts, roles: dict[str, str]) -> Manifest:
    """The one manifest builder: every bundle's manifest is made here."""
    import torch

    spec, t = loaded.spec, loaded.spec.text
    processor = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(loaded.processor).items()}
    return Manifest(
        format=exporter.artifact_kind,
        precision=request.precision,
        files=file_entries(bundle, roles),
        tensor_groups=parts.tensor_groups,
        source={"path": str(loaded.checkpoint_dir.resolve()), "sha256": checkpoint_sha256(source_files(loaded)), "label": loaded.checkpoint_dir.name},
        toolchain={"medmoe_edge": __version__, "torch": torch.__version__, "exporter": exporter.name, **parts.toolchain},
        graphs=parts.graphs,
        model=ModelFacts(
            variant=t.variant.value,
            num_layers=t.num_layers,
            hidden_size=t.hidden_size,
            moe_layers=tuple(sorted(spec.moe.layers)),
            num_experts=spec.moe.num_experts,
            top_k=spec.moe.top_k,
            num_kv_heads=t.num_kv_heads,
            head_dim=t.head_dim,
            vocab_rows=loaded.model.n_vocab,
            image_tokens=spec.image_tokens,
            context_length=t.max_position_embeddings,
            layout=dict(parts.layout),
        ),
        preprocessing={"processor": processor, "default_mode": PreprocessMode.PAD.value},
        prompt={"system": SYSTEM, "template": build_prompt("{question}"), "image_placeholder_id": -200},
        plan=request.plan,
        extra=dict(parts.extra),
        runtime=exporter.runtime,
    )


def stored_groups(fmt: str, stored: Iterable[tuple[tuple[TensorId, ...], Precision, int]], model_sizes: Mapping[TensorId, int]) -> tuple[TensorGroup, ...]:
    """The manifest's tensor groups from what a format stored (read back from its files where it can).

    Args:
        stored: per stored tensor, the TensorIds it holds (several for a tensor stacked over
            experts, whose parameters are split evenly over them), its precision and size.
        model_sizes: parameters per group of the model (`TensorMap.group_sizes` of the checkpoint).
    Returns:
        Per group and stored precision, in TensorId order, the parameters. A group stored in
        several types (F32 norms and biases beside quantized matrices) is listed once per type.
    Raises:
        UnmappedTensor: a group whose stored parameters differ from the model's (a tensor left
            out, or stored twice) or one the model does not have.
    """
    acc: dict[tuple[TensorId, Precision], int] = {}
    for ids, precision, n in stored:
        for tid in ids:
            key = (tid.group, precision)
            acc[key] = acc.get(key, 0) + n // len(ids)
    totals: dict[TensorId, int] = {}
    for (g, _), n in acc.items():
        totals[g] = totals.get(g, 0) + n
    for g in sorted(set(totals) | set(model_sizes)):
        if totals.get(g, 0) != model_sizes.get(g, 0):
            raise UnmappedTensor(f"the {fmt} files hold {totals.get(g, 0)} parameters of {g}, the model {model_sizes.get(g, 0)}: a tensor was left out or stored twice")
    order = list(Precision)
    return tuple(TensorGroup(str(g), p, n) for (g, p), n in sorted(acc.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))))


_group: PluginGroup[Exporter] = PluginGroup(ENTRY_POINT_GROUP, Exporter)


def registered() -> dict[str, type[Exporter]]:
    """Every exporter that imports, by format name (broken plugins are left out; see `discover`)."""
    return {name: e.cls for name, e in _group.discover().items() if e.cls is not None}


def discover():
    """Every exporter plugin entry, broken ones included (with their import error)."""
    return _group.discover()


def register(cls: type[Exporter]) -> None:
    """Register an exporter class by code (tests); entry points are the normal path."""
    _group.register(cls.name, cls)


def unregister(name: str) -> None:
    _group.unregister(name)


def get_exporter(name: str) -> type[Exporter]:
    """The exporter of `--format name`.

    Raises:
        InputError: unknown format (the message lists the installed ones) or a plugin that fails to import.
    """
    entries = _group.discover()
    if name not in entries:
        raise InputError(f"--format {name!r} is not an installed format: use one of {', '.join(entries) or 'none (is medmoe-edge installed?)'}")
    entry = entries[name]
    if entry.cls is None:
        raise RuntimeUnavailable(f"the {name} exporter plugin failed to import: {entry.error}")
    return entry.cls


__all__ = ["ENTRY_POINT_GROUP", "ExportOption", "ExportParts", "ExportRequest", "Exporter", "build_manifest", "get_exporter", "register", "registered", "stored_groups", "unregister"]
