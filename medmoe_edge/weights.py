"""Reading weight files safely: safetensors (sharded or not) or `pytorch_model.bin` with `weights_only=True`.

Files are untrusted: pickles are only ever read by `torch.load(weights_only=True)`,
which refuses code; such a refusal becomes a one-line `CheckpointError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one stored tensor, read without loading its data where possible."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def weight_files(directory: Path) -> list[Path]:
    """The weight files of `directory`, in transformers' preference order (safetensors first, §2.6).

    Raises:
        CheckpointError: no weights, or an index naming a missing shard.
    """
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid weight index (no 'weight_map'): re-save the checkpoint") from None
            shards = sorted({directory / s for s in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shard {missing[0]} which is missing from {directory}: download the complete checkpoint")
            return shards
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (directory / single).is_file():
            return [directory / single]
    raise CheckpointError(f"no weights in {directory}: expected {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} or {BIN_SINGLE}")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise CheckpointError(
                f"{path.name} contains pickled objects other than tensors, which medmoe-edge refuses to load "
                "(weights_only=True): convert the checkpoint to safetensors from a trusted environment"
            ) from None
        raise CheckpointError(f"{path.name} is not a readable PyTorch weight file ({type(e).__name__}): re-download it") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path.name} does not hold a flat state dict of tensors: re-save it with torch.save(model.state_dict())")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError/OSError for corrupt files
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({str(e).splitlines()[0][:120]}): re-download it") from None


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of `files` in one dict; a name stored twice is an error."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_safetensors(f) if f.suffix == ".safetensors" else _load_pickle(f)
        dup = out.keys() & part.keys()
        if dup:
            raise CheckpointError(f"tensor {sorted(dup)[0]} is stored in more than one weight file: re-save the checkpoint")
        out.update(part)
    return out


def tensor_infos(files: list[Path]) -> list[TensorInfo]:
    """Names, shapes and dtypes of all tensors; safetensors headers are read without loading data."""
    from safetensors import safe_open

    infos: list[TensorInfo] = []
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        sl = h.get_slice(name)
                        infos.append(TensorInfo(name, tuple(sl.get_shape()), str(sl.get_dtype())))
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"{f.name} is not a valid safetensors file ({str(e).splitlines()[0][:120]}): re-download it") from None
        else:
            for name, t in _load_pickle(f).items():
                infos.append(TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    return infos


DEFAULT_SHARD_BYTES = 2 * 1024**3  # transformers' default max_shard_size is of this order


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `tensors` into `out` as safetensors shards, with the index, in the released layout (§2.6).

    Each shard (at most `shard_bytes`) is written as soon as it fills, so a generator of
    tensors never needs the whole model in memory; shards are then named
    `model-0000i-of-0000n.safetensors` as transformers' `save_pretrained` names them.
    """
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = f"shard-{len(written):05d}.tmp"
        save_file(shard, str(out / tmp), metadata={"format": "pt"})
        written.append((tmp, list(shard)))

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = t
        size += nbytes
        total += nbytes
    if shard:
        flush()
    weight_map: dict[str, str] = {}
    for i, (tmp, names) in enumerate(written):
        final = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({k: final for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
