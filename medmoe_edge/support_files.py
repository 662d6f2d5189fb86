"""Files every bundle carries besides its model files, so it runs without the source checkpoint.

    config.json                                   the checkpoint's config, mm_image_tower = "clip-vision"
    clip-vision/config.json, preprocessor_config.json   the tower's configs (no weights)
    tokenizer files                               as the checkpoint has them
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.ckpt_writer import TOWER_DIRNAME
from medmoe_edge.weights import weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model")


def copy_support_files(loaded: LoadedModel, out: Path) -> dict[str, str]:
    """Write the config, tower configs and tokenizer into `out`; return {relative path: manifest role}."""
    roles: dict[str, str] = {}
    cfg = dict(loaded.config, mm_image_tower=TOWER_DIRNAME)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    roles["config.json"] = "config"
    (out / TOWER_DIRNAME).mkdir(exist_ok=True)  # an exporter may have put tower files there
    src = loaded.tower_dir / "config.json"
    shutil.copyfile(src, out / TOWER_DIRNAME / "config.json")
    pre = out / TOWER_DIRNAME / "preprocessor_config.json"
    # The processor actually used (the tower's own file, or CLIP defaults when it has none).
    pre.write_text(json.dumps(loaded.processor.to_preprocessor_config(), indent=2) + "\n")
    roles[f"{TOWER_DIRNAME}/config.json"] = roles[f"{TOWER_DIRNAME}/preprocessor_config.json"] = "vision-config"
    for name in TOKENIZER_FILES:
        f = loaded.checkpoint_dir / name
        if f.is_file():
            shutil.copyfile(f, out / name)
            roles[name] = "tokenizer"
    return roles


def source_files(loaded: LoadedModel) -> list[Path]:
    """The files that identify the source checkpoint (config and weights, tower weights)."""
    return identity_files(loaded.checkpoint_dir, loaded.tower_dir)


def identity_files(checkpoint_dir: Path, tower_dir: Path) -> list[Path]:
    """The files a source hash covers, in order: one list for exports and for checks against them."""
    return [checkpoint_dir / "config.json", *weight_files(checkpoint_dir), *weight_files(tower_dir)]


def checkpoint_source_sha256(checkpoint_dir: Path, vision_tower: str | Path | None = None) -> str:
    """The source hash a bundle exported from `checkpoint_dir` records (no weights loaded)."""
    from medmoe_edge.bundle import checkpoint_sha256
    from medmoe_edge.checkpoint import read_spec

    _spec, _cfg, tower = read_spec(checkpoint_dir, vision_tower)
    return checkpoint_sha256(identity_files(checkpoint_dir, tower.directory))
