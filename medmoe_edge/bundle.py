"""Deployment bundles and their manifest (`manifest.json`), shared by every export format.

A bundle is a directory that one runtime can load without the source checkpoint:

    manifest.json            what is in the bundle, written last (see `write_manifest`)
    config.json              the source checkpoint's config, mm_image_tower = "clip-vision"
    clip-vision/             the tower's config.json and preprocessor_config.json (no weights)
    tokenizer files          copied from the checkpoint
    <format files>           e.g. vision.onnx, embed.onnx, decoder.onnx and their .data files

The manifest lists every other file with its SHA-256 and size. A runtime calls
`open_bundle`, which refuses a bundle whose manifest is missing, unreadable, of another
format or version, or whose files are missing or do not hash to the manifest. Exports
write the whole directory under a temporary name and rename it at the end
(`ckpt_writer.atomic_dir`), so an interrupted export leaves nothing that looks complete.

Precision is recorded per *tensor group* (`TensorGroup`), named by its TensorId
(`medmoe_edge.tensor_ids`): the vision tower, the projector, the embedding, each layer's
attention, each dense FFN, each router, each routed expert, each meta expert, the final norm
and lm_head. The `QuantPlan` the export was asked for is recorded beside what was stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .quant_plan import QuantPlan
from .vocab import ArtifactKind, Precision

MANIFEST_NAME = "manifest.json"
# The manifest's own SHA-256, beside it: an edited manifest (a changed expert count, a precision
# relabelled to get looser tolerances, a file entry swapped) is refused before anything reads it.
MANIFEST_DIGEST_NAME = "manifest.sha256"
# 2: precisions in the one vocabulary (vocab.Precision), tensor groups named by TensorId,
#    typed model facts, the QuantPlan, an optional embedded reference trace.
MANIFEST_VERSION = 2
_HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle (path relative to the bundle directory)."""

    path: str
    sha256: str
    bytes: int
    role: str  # e.g. "graph", "weights", "config", "tokenizer", "vision-config"


@dataclass(frozen=True)
class TensorGroup:
    """A group of tensors that share one precision.

    Attributes:
        name: the canonical TensorId string ("vision", "layers.3.expert.1", ...; see `tensor_ids`).
        precision: the storage type of the group's weights as written.
        params: number of parameters in the group.
    """

    name: str
    precision: Precision
    params: int


@dataclass(frozen=True)
class ModelFacts:
    """Facts about the exported model that runtimes need without parsing configs.

    Attributes:
        layout: format-specific facts (e.g. the ONNX MoE dispatch, the GGUF expert layout).
    """

    variant: str
    num_layers: int
    hidden_size: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    num_kv_heads: int
    head_dim: int
    vocab_rows: int
    image_tokens: int
    context_length: int
    layout: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GraphIO:
    """One input or output of a graph: name, element type and shape (ints or symbolic names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    """A compiled graph of the bundle and its interface."""

    file: str
    inputs: tuple[GraphIO, ...]
    outputs: tuple[GraphIO, ...]

    def profile_shapes(self, bounds: dict[str, list[int]]) -> tuple[dict[str, list[int]], ...]:
        """(min, opt, max) input shapes with each symbolic dimension replaced by its bound.

        Raises:
            CheckpointError: an input has a symbolic dimension without bounds.
        """
        out: tuple[dict[str, list[int]], ...] = ({}, {}, {})
        for io in self.inputs:
            for which in range(3):
                shape = []
                for dim in io.shape:
                    if isinstance(dim, str):
                        if dim not in bounds:
                            raise CheckpointError(f"{self.file}: input {io.name} dimension {dim!r} has no optimisation-profile bounds in the manifest")
                        dim = bounds[dim][which]
                    shape.append(int(dim))
                out[which][io.name] = shape
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything a runtime needs to trust and interpret a bundle.

    Attributes:
        format: the artifact kind (onnx, gguf, tensorrt).
        precision: the bundle's overall precision (the plan's default); per group in `tensor_groups`.
        files: every file of the bundle except the manifest itself.
        source: {"path", "sha256", "label"}: the checkpoint it was exported from.
        toolchain: versions of the exporter and libraries (and the ONNX opset).
        graphs: named graphs with their inputs and outputs.
        model: facts runtimes need without parsing configs (layers, MoE layout, KV shape, vocab rows).
        preprocessing: image processor settings and the default mode.
        prompt: conversation template and system prompt.
        plan: the QuantPlan the export was asked for.
        extra: format-specific settings (e.g. TensorRT optimisation profiles).
        runtime: the runtime plugin that loads the bundle when its exporter names one (plugin
            formats); None: the first installed runtime of `format`.
    """

    format: ArtifactKind
    precision: Precision
    files: tuple[FileEntry, ...]
    tensor_groups: tuple[TensorGroup, ...]
    source: dict[str, Any]
    toolchain: dict[str, Any]
    graphs: dict[str, GraphSpec]
    model: ModelFacts
    preprocessing: dict[str, Any]
    prompt: dict[str, Any]
    plan: QuantPlan
    extra: dict[str, Any] = field(default_factory=dict)
    runtime: str | None = None
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = self.format.value
        d["precision"] = self.precision.value
        d["tensor_groups"] = [{"name": g.name, "precision": g.precision.value, "params": g.params} for g in self.tensor_groups]
        d["model"]["moe_layers"] = list(self.model.moe_layers)
        d["plan"] = self.plan.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        def io(items: list) -> tuple[GraphIO, ...]:
            return tuple(GraphIO(i["name"], i["dtype"], tuple(i["shape"])) for i in items)

        model = dict(d["model"])
        model["moe_layers"] = tuple(int(i) for i in model["moe_layers"])
        return cls(
            format=ArtifactKind(d["format"]),
            precision=Precision(d["precision"]),
            files=tuple(FileEntry(**f) for f in d["files"]),
            tensor_groups=tuple(TensorGroup(str(g["name"]), Precision(g["precision"]), int(g["params"])) for g in d["tensor_groups"]),
            source=dict(d["source"]),
            toolchain=dict(d["toolchain"]),
            graphs={k: GraphSpec(g["file"], io(g["inputs"]), io(g["outputs"])) for k, g in d["graphs"].items()},
            model=ModelFacts(**model),
            preprocessing=dict(d["preprocessing"]),
            prompt=dict(d["prompt"]),
            plan=QuantPlan.from_json(d["plan"]),
            extra=dict(d.get("extra", {})),
            runtime=d.get("runtime"),
            version=int(d["version"]),
        )

    @property
    def bundle_id(self) -> str:
        """A short identifier of the bundle's content (hash of every file's SHA-256), e.g. for caches."""
        h = hashlib.sha256("".join(f"{f.path}:{f.sha256}\n" for f in self.files).encode())
        return h.hexdigest()[:16]

    def group_precisions(self) -> dict[Precision, int]:
        """Parameters per precision, e.g. {Precision.FP16: 1_234_567}."""
        out: dict[Precision, int] = {}
        for g in self.tensor_groups:
            out[g.precision] = out.get(g.precision, 0) + g.params
        return out


def file_entries(bundle: Path, roles: dict[str, str]) -> tuple[FileEntry, ...]:
    """Hash every file under `bundle` (except the manifest), sorted by path.

    Args:
        roles: relative path → role; files not named get the role "other".
    """
    entries = []
    for p in sorted(bundle.rglob("*")):
        if p.is_file() and p.relative_to(bundle).as_posix() not in (MANIFEST_NAME, MANIFEST_DIGEST_NAME):
            rel = p.relative_to(bundle).as_posix()
            entries.append(FileEntry(rel, sha256_file(p), p.stat().st_size, roles.get(rel, "other")))
    return tuple(entries)


def write_manifest(bundle: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` and its digest `manifest.sha256`, each atomically (temp file + rename).
    Call it after every other file is final."""
    path = bundle / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=2) + "\n"
    for name, content in ((MANIFEST_NAME, text), (MANIFEST_DIGEST_NAME, f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST_NAME}\n")):
        fd, tmp = tempfile.mkstemp(dir=bundle, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(tmp, bundle / name)
    return path


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is a directory with a manifest (a bundle, possibly corrupt)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(bundle: str | Path) -> Manifest:
    """Parse `manifest.json` without checking the files.

    Raises:
        CheckpointError: no manifest, unreadable, or of an unknown version.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise CheckpointError(f"{bundle} is not a directory: pass the bundle directory written by `medmoe-edge export` or `medmoe-edge quantize`")
    if not path.is_file():
        if (bundle / "config.json").is_file():
            raise CheckpointError(f"{bundle} is a checkpoint directory, not an exported bundle: run it with --runtime torch, or export it with `medmoe-edge export`")
        if (bundle / "stats.json").is_file():  # calib_stats.STATS_STEM (not imported: it pulls in torch)
            raise CheckpointError(f"{bundle} holds calibration statistics, not a bundle: pass it to `medmoe-edge quantize --stats`, which writes a bundle")
        raise CheckpointError(
            f"{bundle} has no {MANIFEST_NAME}: it is not a complete bundle; pass a directory written by `medmoe-edge export` or `medmoe-edge quantize` "
            "(export it again if files were removed from it)"
        )
    raw = path.read_bytes()
    digest = bundle / MANIFEST_DIGEST_NAME
    if not digest.is_file():
        raise CheckpointError(f"{bundle} has no {MANIFEST_DIGEST_NAME} beside its manifest: the bundle is incomplete or from an older medmoe-edge; export it again")
    if digest.read_text().split()[:1] != [hashlib.sha256(raw).hexdigest()]:
        raise CheckpointError(f"{path} does not match {MANIFEST_DIGEST_NAME}: the manifest was edited or corrupted after export; export the bundle again")
    try:
        data = json.loads(raw)
        version = int(data.get("version", -1))
        if version != MANIFEST_VERSION:
            raise CheckpointError(f"{path} is manifest version {version}; this medmoe-edge reads version {MANIFEST_VERSION}: re-export the bundle")
        return Manifest.from_json(data)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}): export the bundle again") from None


def verify_files(bundle: Path, manifest: Manifest) -> None:
    """Check that every listed file exists with its size and SHA-256.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or altered.
    """
    for f in manifest.files:
        p = bundle / f.path
        if not p.is_file():
            raise CheckpointError(f"bundle file {f.path} is missing from {bundle}: copy the whole bundle directory or export it again")
        size = p.stat().st_size
        if size != f.bytes:
            raise CheckpointError(f"bundle file {f.path} has {size} bytes but the manifest says {f.bytes}: the bundle is corrupt or incomplete; export it again")
        if sha256_file(p) != f.sha256:
            raise CheckpointError(f"bundle file {f.path} does not match its SHA-256 in the manifest: the bundle is corrupt; export it again")


def open_bundle(bundle: str | Path, expected: ArtifactKind | tuple[ArtifactKind, ...]) -> Manifest:
    """Read the manifest, check it is a bundle of an `expected` format, verify every file.

    Raises:
        CheckpointError: not a bundle, wrong format, or corrupt.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if manifest.format not in kinds:
        raise CheckpointError(f"{bundle} is a bundle of kind {manifest.format.value}, not {' or '.join(k.value for k in kinds)}: run it with --runtime {manifest.runtime or manifest.format.runtime}, or export with --format {kinds[0].value}")
    verify_files(bundle, manifest)
    return manifest


def checkpoint_sha256(files: list[Path]) -> str:
    """One SHA-256 over the given files in order (name and content), identifying a source checkpoint."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()
