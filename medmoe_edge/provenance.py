"""Provenance for JSON reports: which tool and library versions, which model or bundle (by hash),
which runtime and precision, which data set (by hash) produced a result."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# distribution names whose versions decide a result, when installed
_LIBRARIES = ("medmoe-edge", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "gguf", "transformers", "tensorrt", "tensorrt-rtx-cu12-bindings")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a result (without importing them)."""
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def model_identity(model: str | Path) -> dict[str, Any]:
    """What `model` is, by hash: a bundle (its content id, format, precision, source checkpoint hash)
    or a checkpoint (the source hash a bundle exported from it would record)."""
    from .bundle import is_bundle, read_manifest
    from .checkpoint import resolve_model_dir
    from .support_files import checkpoint_source_sha256

    if is_bundle(model):
        m = read_manifest(model)
        return {"kind": m.format.value, "path": str(model), "bundle_id": m.bundle_id, "precision": m.precision.value, "source_sha256": m.source.get("sha256")}
    path = resolve_model_dir(model)
    return {"kind": "checkpoint", "path": str(path), "sha256": checkpoint_source_sha256(path)}


def provenance(model: str | Path, *, runtime: str, precision: str | None = None, data_set: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """The provenance block of a JSON report (precision: the compute precision asked for, else the
    bundle's, else fp32, the torch runtime's default)."""
    ident = model_identity(model)
    precision = precision or ident.get("precision") or "fp32"
    out: dict[str, Any] = {"model": ident, "runtime": runtime, "precision": precision, "libraries": library_versions()}
    if data_set is not None:
        out["data_set"] = data_set
    return out | extra


__all__ = ["library_versions", "model_identity", "provenance"]
