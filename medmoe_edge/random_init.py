"""Write a random Med-MoE checkpoint in exactly the released layout (`medmoe-edge init-random`).

See `medmoe_edge.ckpt_writer` for the layout. Each tensor is drawn from its own
generator seeded by (seed, tensor name), so the values do not depend on sharding or
write order.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .ckpt_writer import atomic_dir, full_tower_names, write_checkpoint
from .model.medmoe import MedMoELM
from .spec import ModelSpec, Variant
from .vocab import FLOAT_PRECISIONS, Precision
from .tokenizer import PHI_SPECIALS, STABLELM_SPECIALS, Tokenizer, default_corpus, pad_vocab, train_bpe
from .weights import DEFAULT_SHARD_BYTES

def _init(name: str, shape: tuple[int, ...], spec: ModelSpec, g: torch.Generator) -> torch.Tensor:
    """Random values that keep activations in a realistic range and routing diverse."""
    randn = lambda std: torch.randn(shape, generator=g, dtype=torch.float32) * std  # noqa: E731
    if name.endswith("gate.wg.weight"):
        return randn(spec.text.hidden_size**-0.5)  # logits ~N(0,1): every expert gets tokens
    if name.endswith("gate.wg.bias"):
        return randn(0.5)
    if "layernorm" in name or "layer_norm" in name or name.endswith(("norm.weight", "norm.bias")):
        return 1.0 + randn(0.05) if name.endswith("weight") else randn(0.02)
    return randn(0.02)


def _tensors(names: list[tuple[str, tuple[int, ...]]], spec: ModelSpec, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in names:
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        yield name, _init(name, shape, spec, g).to(dtype)


def write_random_checkpoint(
    spec: ModelSpec, out: str | Path, *, seed: int = 0, dtype: str = "float32", shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_vocab: int | None = None, full_vocab: bool = False
) -> Path:
    """Write a random checkpoint of `spec` to `out` (which must not exist or be empty).

    Args:
        spec: model to write (e.g. a preset from `medmoe_edge.presets`).
        out: destination directory, written atomically.
        seed: seed of every tensor and nothing else (the tokenizer is deterministic).
        dtype: storage dtype name: float32, float16 or bfloat16.
        shard_bytes: maximum bytes per safetensors shard.
        tokenizer_vocab: BPE vocabulary to train (default min(512, vocab_size)).
        full_vocab: pad the tokenizer to `spec.text.vocab_size` with unreachable tokens
            (`tokenizer.pad_vocab`), so loading keeps every embedding and lm_head row.
    Returns:
        The checkpoint directory.
    Raises:
        InputError: `out` exists and is not empty, or an unknown dtype.
    """
    precision = Precision.parse(dtype, allowed=FLOAT_PRECISIONS, option="--dtype")
    tdt, dtype = precision.torch, precision.torch_name
    out = Path(out)
    with atomic_dir(out) as tmp:
        specials = PHI_SPECIALS if spec.variant is Variant.PHI else STABLELM_SPECIALS
        train_bpe(default_corpus(), tokenizer_vocab or min(512, spec.text.vocab_size), specials, tmp)
        if full_vocab:
            pad_vocab(tmp, spec.text.vocab_size)
        tok = Tokenizer.from_dir(tmp)
        with torch.device("meta"):
            lm_names = [(k, tuple(v.shape)) for k, v in MedMoELM(spec).state_dict().items()]
        tower = dict(_tensors(full_tower_names(spec), spec, seed + 1, tdt))
        write_checkpoint(tmp, spec, _tensors(lm_names, spec, seed, tdt), tower, dtype=dtype, eos_id=tok.eos_id, pad_id=tok.pad_id, shard_bytes=shard_bytes)
    return out
