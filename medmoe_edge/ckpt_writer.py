"""Write checkpoint directories in the released Med-MoE layout (shared by `init-random` and `train-demo`).

    config.json                          released config (§4.1), mm_image_tower = "clip-vision"
    model-0000i-of-0000n.safetensors     shards, with model.safetensors.index.json (§2.6)
    tokenizer.json, tokenizer_config.json
    clip-vision/                         an HF CLIPVisionModel directory (config, weights, preprocessor)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import InputError
from .hfconfig import text_config_dict, vision_config_dict
from .imaging import ImageProcessorSpec
from .model.vision import VisionTower
from .spec import ModelSpec
from .weights import DEFAULT_SHARD_BYTES, write_sharded

TOWER_DIRNAME = "clip-vision"


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; rename it to `out` only on success.

    An interrupted or failed write leaves nothing at `out` (so nothing that looks complete).

    Raises:
        InputError: `out` exists and is not an empty directory.
    """
    out = Path(out)
    check_new_dir(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _umask_permissions(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_new_dir(out: Path) -> None:
    """Check, before any work, that `out` can be created as a new directory (or is an empty one).

    Creates missing parents, then probes the parent with a temporary directory, so a read-only
    filesystem, a missing permission or a file in the way is found before minutes of work.

    Raises:
        InputError: `out` is a file or a non-empty directory, or its parent cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file: choose a new --out directory")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"{out} already exists and is not empty: choose a new --out directory or remove it")
    _no_file_in_the_way(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.rmdir(probe)
    except OSError as e:
        raise InputError(f"cannot create {out} ({e.strerror or e}): choose a writable --out directory") from None


def _no_file_in_the_way(out: Path) -> None:
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{parent} is a file, so {out} cannot be created under it: choose another path")
            return


def check_new_file(out: Path) -> None:
    """Check, before any work, that a file can be written at `out` (parents are created).

    Raises:
        InputError: `out` is a directory, or its directory cannot be written.
    """
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out} is a directory: give a file path")
    _no_file_in_the_way(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write {out} ({e.strerror or e}): choose a writable path") from None


def _umask_permissions(root: Path) -> None:
    """Give a finished directory the permissions a plain mkdir/open would have (mkdtemp and
    mkstemp make them private to the owner), so that a bundle can be shared or deployed."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def full_tower_names(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """All keys of a full HF CLIPVisionModel (every layer and post_layernorm), not only the used ones."""
    with torch.device("meta"):
        full = VisionTower(replace(spec.vision, select_layer=spec.vision.num_layers))
    c = spec.vision.hidden_size
    names = [(k, tuple(v.shape)) for k, v in full.state_dict().items()]
    return names + [("vision_model.post_layernorm.weight", (c,)), ("vision_model.post_layernorm.bias", (c,))]


def write_checkpoint(
    directory: Path,
    spec: ModelSpec,
    lm_tensors: Iterator[tuple[str, torch.Tensor]],
    tower_tensors: dict[str, torch.Tensor],
    *,
    dtype: str,
    eos_id: int,
    pad_id: int,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write weights, config.json and the CLIP tower into `directory` (the tokenizer is written by the caller).

    Args:
        directory: an existing, empty directory (see `atomic_dir`).
        spec: the model the tensors belong to.
        lm_tensors: `model.*` / `lm_head.*` tensors in checkpoint naming, already in the storage dtype.
        tower_tensors: `vision_model.*` tensors of a full CLIPVisionModel.
        dtype: storage dtype name recorded as `torch_dtype`.
    """
    write_sharded(lm_tensors, directory, shard_bytes)
    cfg = text_config_dict(spec.text, spec.moe, mm_image_tower=TOWER_DIRNAME, mm_hidden_size=spec.mm_hidden_size, dtype=dtype, eos_id=eos_id, pad_id=pad_id)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tower = directory / TOWER_DIRNAME
    tower.mkdir()
    save_file(tower_tensors, str(tower / "model.safetensors"), metadata={"format": "pt"})
    (tower / "config.json").write_text(json.dumps(vision_config_dict(spec.vision), indent=2) + "\n")
    pre = ImageProcessorSpec.clip(spec.vision.image_size).to_preprocessor_config()
    (tower / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
