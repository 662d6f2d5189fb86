"""Write a random Med-MoE checkpoint in exactly the released layout (`medmoe-edge init-random`).

Layout written into OUT (atomically: built in a temporary sibling, then renamed):

    config.json                          released config (§4.1), mm_image_tower = "clip-vision"
    model-0000i-of-0000n.safetensors     shards, with model.safetensors.index.json (§2.6)
    tokenizer.json, tokenizer_config.json   GPT-2-style byte-level BPE
    clip-vision/                         an HF CLIPVisionModel directory (config, weights, preprocessor)

Each tensor is drawn from its own generator seeded by (seed, tensor name), so the
values do not depend on sharding or write order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import DTYPES
from .errors import InputError
from .hfconfig import text_config_dict, vision_config_dict
from .imaging import ImageProcessorSpec
from .model.medmoe import MedMoELM
from .model.vision import VisionTower
from .spec import ModelSpec, Variant
from .tokenizer import PHI_SPECIALS, STABLELM_SPECIALS, Tokenizer, default_corpus, train_bpe

TOWER_DIRNAME = "clip-vision"
DEFAULT_SHARD_BYTES = 2 * 1024**3


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


def _named_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def _tensors(names: list[tuple[str, tuple[int, ...]]], spec: ModelSpec, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape in names:
        g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        yield name, _init(name, shape, spec, g).to(dtype)


def _write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> None:
    """Write tensors into shards of at most `shard_bytes` as they are generated, then name them
    `model-0000i-of-0000n.safetensors` and write the index, as transformers' `save_pretrained` does."""
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


def _tower_names(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """All keys of a full HF CLIPVisionModel (every layer and post_layernorm), not only the used ones."""
    from dataclasses import replace

    full = VisionTower(replace(spec.vision, select_layer=spec.vision.num_layers))
    names = _named_shapes(full)
    c = spec.vision.hidden_size
    return names + [("vision_model.post_layernorm.weight", (c,)), ("vision_model.post_layernorm.bias", (c,))]


def write_random_checkpoint(spec: ModelSpec, out: str | Path, *, seed: int = 0, dtype: str = "float32", shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer_vocab: int | None = None) -> Path:
    """Write a random checkpoint of `spec` to `out` (which must not exist or be empty).

    Args:
        spec: model to write (e.g. a preset from `medmoe_edge.presets`).
        out: destination directory.
        seed: seed of every tensor and nothing else (the tokenizer is deterministic).
        dtype: storage dtype name: float32, float16 or bfloat16.
        shard_bytes: maximum bytes per safetensors shard.
        tokenizer_vocab: BPE vocabulary to train (default min(512, vocab_size)).
    Returns:
        The checkpoint directory.
    Raises:
        InputError: `out` exists and is not empty, or an unknown dtype.
    """
    out = Path(out)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out} already exists and is not empty: choose a new --out directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        specials = PHI_SPECIALS if spec.variant is Variant.PHI else STABLELM_SPECIALS
        train_bpe(default_corpus(), tokenizer_vocab or min(512, spec.text.vocab_size), specials, tmp)
        tok = Tokenizer.from_dir(tmp)
        tdt = DTYPES[dtype]
        with torch.device("meta"):
            lm_names = _named_shapes(MedMoELM(spec))
            tower_names = _tower_names(spec)
        _write_sharded(_tensors(lm_names, spec, seed, tdt), tmp, shard_bytes)
        cfg = text_config_dict(spec.text, spec.moe, mm_image_tower=TOWER_DIRNAME, mm_hidden_size=spec.mm_hidden_size, dtype=dtype, eos_id=tok.eos_id, pad_id=tok.pad_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

        tower = tmp / TOWER_DIRNAME
        tower.mkdir()
        save_file(dict(_tensors(tower_names, spec, seed + 1, tdt)), str(tower / "model.safetensors"), metadata={"format": "pt"})
        (tower / "config.json").write_text(json.dumps(vision_config_dict(spec.vision), indent=2) + "\n")
        pre = ImageProcessorSpec.clip(spec.vision.image_size).to_preprocessor_config()
        (tower / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
