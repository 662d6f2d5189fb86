"""What the two GGUF writers (text model, mmproj) share: the tensors named by the TensorId table,
planned tensors and the streaming, atomic write."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmoe_edge.errors import RuntimeUnavailable, UnmappedTensor
from medmoe_edge.spec import ModelSpec
from medmoe_edge.tensor_ids import TensorId, gguf_target

DTYPES = ("f32", "f16")
FILE_TYPE = {"f32": 0, "f16": 1}  # general.file_type: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_F16
NUMPY = {"f32": np.float32, "f16": np.float16}


def require_gguf():
    """The gguf-py module, or RuntimeUnavailable naming the install command."""
    try:
        import gguf
    except ImportError:
        raise RuntimeUnavailable("GGUF export needs the gguf package: pip install 'gguf==0.19.0'") from None
    return gguf


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, final numpy dtype and shape, and how to produce the data.

    The data is produced only when it is written, so besides the loaded model at most one
    converted tensor (one expert stack; the F32 CLIP-L tower alone is ~1.2 GB) is in memory.

    Attributes:
        raw_type: a ggml block type id when the data are already-quantized codes (uint8, `shape`
            in bytes per row, as gguf-py takes them); None for f32/f16 data.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]
    raw_type: int | None = None


def planned(name: str, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype) -> PlannedTensor:
    """A tensor whose data is `make()` widened to fp32 on the CPU, then cast to `dtype`."""
    dtype = np.dtype(dtype)

    def data() -> np.ndarray:
        t = make().detach().to(device="cpu", dtype=torch.float32).numpy()
        return np.ascontiguousarray(t.astype(dtype, copy=False))

    return PlannedTensor(name, dtype, tuple(shape), data)


@dataclass(frozen=True)
class TableTensor:
    """One GGUF tensor as the TensorId table names it (`tensor_ids.TENSOR_NAMES`).

    Attributes:
        ids: the TensorIds it holds (every expert of a layer for a stacked `ffn_*_exps` tensor).
        parts: the checkpoint tensors it is made of, in expert order when stacked.
        f32: stored F32 whatever the file type (norms, biases, the router, CLIP embeddings).
        keys: the released-name state-dict keys of `parts`, in the same order.
    """

    name: str
    ids: tuple[TensorId, ...]
    parts: tuple[torch.Tensor, ...]
    f32: bool
    stacked: bool
    keys: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape) if self.stacked else tuple(self.parts[0].shape)


def table_tensors(state: dict[str, torch.Tensor], spec: ModelSpec) -> tuple[list[TableTensor], list[TableTensor]]:
    """(text GGUF tensors, mmproj GGUF tensors) of a model's released-name state dict
    (`tensor_ids.released_state_dict`), in state-dict order, every name from the table.

    Raises:
        UnmappedTensor: a tensor the table does not name or GGUF does not store, or experts
            missing from a stack: nothing of the model may be left behind.
    """
    groups: dict[str, list] = {}
    for key, t in state.items():
        target = gguf_target(key)
        groups.setdefault(target.name, []).append((target, t, key))
    files: tuple[list[TableTensor], list[TableTensor]] = ([], [])
    for name, items in groups.items():
        first = items[0][0]
        items.sort(key=lambda it: -1 if it[0].tensor_id.expert is None else it[0].tensor_id.expert)
        ids = tuple(target.tensor_id for target, _, _ in items)
        if first.stacked and [i.expert for i in ids] != list(range(spec.moe.num_experts)):
            raise UnmappedTensor(f"GGUF tensor {name} stacks experts {[i.expert for i in ids]} but the model has {spec.moe.num_experts}")
        if not first.stacked and len(items) > 1:
            raise UnmappedTensor(f"GGUF tensor {name} would be written from {len(items)} checkpoint tensors ({', '.join(map(str, ids))})")
        files[first.mmproj].append(TableTensor(name, ids, tuple(t for _, t, _ in items), first.f32, first.stacked, tuple(k for _, _, k in items)))
    return files


def plan_table(tensors: list[TableTensor], matrix_dtype: Callable[[TableTensor], str], codes: Callable[[TableTensor], PlannedTensor | None] | None = None) -> list[PlannedTensor]:
    """Planned tensors of one file: F32 where the table says so, else the quantized codes
    `codes(tensor)` gives (a quantization plan's), else `matrix_dtype(tensor)` ("f32" or "f16")."""
    out = []
    for t in tensors:
        coded = codes(t) if codes is not None and not t.f32 else None
        if coded is not None:
            out.append(coded)
            continue
        parts = t.parts
        make = (lambda parts=parts: torch.stack(parts)) if t.stacked else (lambda parts=parts: parts[0])
        dtype = np.float32 if t.f32 else NUMPY[matrix_dtype(t)]
        out.append(planned(t.name, make, t.shape, dtype))
    return out


def write_gguf(out_path: str | Path, arch: str, write_metadata: Callable[[object], None], tensors: list[PlannedTensor]) -> None:
    """Write a GGUF file: metadata, tensor infos, then the data one tensor at a time.

    The file appears at `out_path` only when complete (temporary sibling + os.replace);
    anything written so far is removed on an error or an interrupt.
    """
    gguf = require_gguf()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        write_metadata(w)
        for t in tensors:
            raw = None if t.raw_type is None else gguf.GGMLQuantizationType(t.raw_type)
            w.add_tensor_info(t.name, t.shape, t.dtype, int(np.prod(t.shape)) * t.dtype.itemsize, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            data = t.data()
            if data.shape != t.shape or data.dtype != t.dtype:
                raise AssertionError(f"{t.name}: {data.dtype}{list(data.shape)} != planned {t.dtype}{list(t.shape)}")
            w.write_tensor_data(data)
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["DTYPES", "FILE_TYPE", "NUMPY", "PlannedTensor", "TableTensor", "plan_table", "planned", "require_gguf", "table_tensors", "write_gguf"]
