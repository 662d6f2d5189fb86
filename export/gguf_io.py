"""What the two GGUF writers (text model, mmproj) share: planned tensors and the streaming, atomic write."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmoe_edge.errors import RuntimeUnavailable

DTYPES = ("f32", "f16")
FILE_TYPE = {"f32": 0, "f16": 1}  # general.file_type: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_F16


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
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]


def planned(name: str, make: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype) -> PlannedTensor:
    """A tensor whose data is `make()` widened to fp32 on the CPU, then cast to `dtype`."""
    dtype = np.dtype(dtype)

    def data() -> np.ndarray:
        t = make().detach().to(device="cpu", dtype=torch.float32).numpy()
        return np.ascontiguousarray(t.astype(dtype, copy=False))

    return PlannedTensor(name, dtype, tuple(shape), data)


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
            w.add_tensor_info(t.name, t.shape, t.dtype, int(np.prod(t.shape)) * t.dtype.itemsize)
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


__all__ = ["DTYPES", "FILE_TYPE", "PlannedTensor", "planned", "require_gguf", "write_gguf"]
