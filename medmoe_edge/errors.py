"""Errors shown to users.

Every error a user can cause (bad file, wrong checkpoint, unsupported option)
is a `MedmoeError`: the CLI prints its message on one line and exits non-zero,
without a traceback. Messages name the fix.
"""

from __future__ import annotations


class MedmoeError(Exception):
    """Base class of every user-facing error."""

    exit_code: int = 2


class InputError(MedmoeError):
    """A user-supplied input (image, question, option) cannot be used."""


class ImageError(InputError):
    """An image file is missing, corrupt, unsupported or too large."""


class CheckpointError(MedmoeError):
    """A checkpoint directory is missing files, has wrong tensors, or is of an unsupported kind."""


class UnsupportedCheckpoint(CheckpointError):
    """The checkpoint is recognised but deliberately not supported (e.g. TinyMed v1)."""


class RuntimeUnavailable(MedmoeError):
    """A runtime plugin is not installed or cannot run on this machine."""


class ConfigError(MedmoeError):
    """A configuration value is invalid or inconsistent."""


class UnmappedTensor(CheckpointError):
    """A tensor (checkpoint key, ONNX initializer, GGUF tensor) that no row of the TensorId tables
    names, or that a format cannot store: a model of another architecture, or a gap in
    `medmoe_edge.tensor_ids`."""
