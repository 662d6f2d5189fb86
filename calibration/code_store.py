"""Where a plan's candidate codes live while `quantize` measures and allocates.

`quantize` makes the codes of every matrix at every candidate type once (the sensitivities and
the plan's router check read them, and the final plan copies the picked ones). On the demo they
fit in memory many times over; on a full-size checkpoint they do not: a Phi-2 Med-MoE's 6.4 G
weights at int4 and int8 take 15 GB as `QTensor`s (a byte per code), its ggml candidates more.

`CodeStore` holds them in memory up to a byte cap and writes each one to a spill directory as it
is made, so one dropped from memory is read back instead of quantized again (GPTQ of a
real-dimension matrix takes seconds to minutes; reading it back, milliseconds). Without a cap it
holds everything, as before. The files are the store's own, in safetensors, read back with it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from safetensors.torch import load, save_file

from medmoe_edge.ggml_codes import GgmlCodes
from medmoe_edge.quant_plan import QuantMethod
from medmoe_edge.quantizer import QTensor
from medmoe_edge.vocab import Precision

Codes = TypeVar("Codes", QTensor, GgmlCodes)


def qtensor_bytes(params: int, block: int) -> int:
    """Bytes a `QTensor` of `params` weights takes in memory: a byte per code, and an fp32 scale
    and a byte zero point per block of `block` weights (whatever its bit width)."""
    return params + 5 * params // block


def held_bytes(codes: QTensor | GgmlCodes) -> int:
    """Bytes one set of codes takes in memory."""
    if isinstance(codes, GgmlCodes):
        return codes.nbytes
    return sum(t.numel() * t.element_size() for t in (codes.codes, codes.scales, codes.zeros))


def _save(codes: QTensor | GgmlCodes, path: Path) -> None:
    if isinstance(codes, GgmlCodes):
        meta = {"kind": "ggml", "precision": codes.precision.value, "shape": list(codes.shape), "imatrix": codes.imatrix, "gptq": codes.gptq}
        tensors = {"data": torch.from_numpy(np.ascontiguousarray(codes.data))}
    else:
        meta = {"kind": "int", "bits": codes.bits, "block": codes.block, "symmetric": codes.symmetric, "method": codes.method.value}
        tensors = {"codes": codes.codes, "scales": codes.scales, "zeros": codes.zeros}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"codes": json.dumps(meta)})


def _load(path: Path) -> QTensor | GgmlCodes:
    raw = path.read_bytes()  # in memory of its own: `load_file` maps the file, which the folder's removal would pull away
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors: a u64 length, then the JSON header
    meta = json.loads(header["__metadata__"]["codes"])
    t = load(raw)
    if meta["kind"] == "ggml":
        return GgmlCodes(Precision(meta["precision"]), t["data"].numpy(), tuple(meta["shape"]), meta["imatrix"], meta["gptq"])  # type: ignore[arg-type]
    return QTensor(t["codes"], t["scales"], t["zeros"], meta["bits"], meta["block"], meta["symmetric"], QuantMethod(meta["method"]))


class CodeStore:
    """Codes by key, made once: in memory up to `memory` bytes (least recently used dropped first),
    each also written to `spill` when a cap is set. `memory` None: everything stays in memory."""

    def __init__(self, memory: int | None = None, spill: Path | None = None) -> None:
        if memory is not None and spill is None:
            raise ValueError("a CodeStore with a memory cap needs a spill directory")
        self.memory, self.spill = memory, spill
        self._held: OrderedDict[Hashable, QTensor | GgmlCodes] = OrderedDict()
        self._files: dict[Hashable, Path] = {}
        self.nbytes = 0  # what `_held` takes
        self.made = 0  # codes computed (each key once)
        self.read_back = 0  # codes read back from the spill directory

    def __contains__(self, key: Hashable) -> bool:
        return key in self._held or key in self._files

    def __len__(self) -> int:
        return len(self._held.keys() | self._files.keys())

    def resident(self) -> int:
        """How many codes are in memory now."""
        return len(self._held)

    def get(self, key: Hashable, make: Callable[[], Codes]) -> Codes:
        """The codes of `key`: from memory, else read back, else `make()` (once per key)."""
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]  # type: ignore[return-value]
        if key in self._files:
            codes = _load(self._files[key])
            self.read_back += 1
        else:
            codes = make()
            self.made += 1
            if self.spill is not None:
                path = self.spill / f"codes-{len(self._files):06d}.safetensors"
                _save(codes, path)
                self._files[key] = path
        self._hold(key, codes)
        return codes  # type: ignore[return-value]

    def _hold(self, key: Hashable, codes: QTensor | GgmlCodes) -> None:
        self._held[key] = codes
        self.nbytes += held_bytes(codes)
        while self.memory is not None and self.nbytes > self.memory and len(self._held) > 1:
            _, dropped = self._held.popitem(last=False)  # written when made: dropping loses nothing
            self.nbytes -= held_bytes(dropped)


__all__ = ["CodeStore", "held_bytes", "qtensor_bytes"]
