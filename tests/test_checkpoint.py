"""Checkpoint loading: round trip of init-random output, and every documented refusal."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmoe_edge.checkpoint import load_model
from medmoe_edge.errors import CheckpointError, InputError, UnsupportedCheckpoint
from medmoe_edge.info import checkpoint_info
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.random_init import write_random_checkpoint
from medmoe_edge.spec import Generation


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(ckpt: Path, fn) -> None:
    """Apply `fn(state_dict)` to the single safetensors shard of a tiny checkpoint."""
    shard = next(ckpt.glob("model-*.safetensors"))
    sd = load_file(str(shard))
    fn(sd)
    save_file(sd, str(shard), metadata={"format": "pt"})
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard.name for k in sd}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def test_init_random_round_trips(tiny_ckpt):
    loaded = load_model(tiny_ckpt)
    files = {}
    for shard in tiny_ckpt.glob("model-*.safetensors"):
        files.update(load_file(str(shard)))
    state = loaded.model.lm.state_dict()
    assert set(state) == set(files)
    for k, v in files.items():
        n = state[k].shape[0]  # embeddings/lm_head may be truncated to the tokenizer (§4.2.6)
        assert torch.equal(state[k], v[:n] if k in ("model.embed_tokens.weight", "lm_head.weight") else v), k
    tower = load_file(str(tiny_ckpt / "clip-vision" / "model.safetensors"))
    for k, v in loaded.model.vision.state_dict().items():
        assert torch.equal(v, tower[k]), k
    assert loaded.generation is Generation.MEDMOE
    assert loaded.model.n_vocab == len(loaded.tokenizer)


def test_init_random_is_deterministic_and_seeded(tmp_path):
    a = write_random_checkpoint(PRESETS[Preset.TINY_PHI], tmp_path / "a", seed=3)
    b = write_random_checkpoint(PRESETS[Preset.TINY_PHI], tmp_path / "b", seed=3, shard_bytes=200_000)
    c = write_random_checkpoint(PRESETS[Preset.TINY_PHI], tmp_path / "c", seed=4)
    sa, sb, sc = (load_model(p).model.lm.state_dict() for p in (a, b, c))
    assert len(list(b.glob("model-*.safetensors"))) > 1  # sharded differently, same values
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_a_padded_tokenizer_keeps_every_embedding_row(tmp_path):
    """The loader truncates the vocabulary to the tokenizer (§4.2.6); `full_vocab` pads the random
    checkpoint's tokenizer with unreachable tokens, so a real-dimension proxy keeps its lm_head."""
    base = PRESETS[Preset.TINY_PHI]
    spec = replace(base, text=replace(base.text, vocab_size=1024))
    small = load_model(write_random_checkpoint(spec, tmp_path / "small", seed=0))
    full = load_model(write_random_checkpoint(spec, tmp_path / "full", seed=0, full_vocab=True))
    assert small.model.n_vocab == len(small.tokenizer) == 512
    assert full.model.n_vocab == len(full.tokenizer) == 1024
    assert full.model.lm.state_dict()["lm_head.weight"].shape == (1024, spec.text.hidden_size)
    text = " Is there a lesion in the left lung?"
    assert full.tokenizer.encode(text) == small.tokenizer.encode(text)  # the padding is never produced


def test_init_random_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep me")
    with pytest.raises(InputError, match="already exists and is not empty"):
        write_random_checkpoint(PRESETS[Preset.TINY_PHI], tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no partial directory left behind


def test_missing_tensor_is_named(tiny_ckpts, tmp_path):
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    _edit_weights(ckpt, lambda sd: sd.pop("model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.3\.fc2\.bias"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(tiny_ckpts, tmp_path):
    ckpt = _copy(tiny_ckpts[Preset.TINY_STABLELM], tmp_path)
    _edit_weights(ckpt, lambda sd: sd.__setitem__("model.layers.1.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.1\.mlp\.extra\.weight"):
        load_model(ckpt)


def test_misshaped_tensor_is_named(tiny_ckpts, tmp_path):
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    _edit_weights(ckpt, lambda sd: sd.__setitem__("model.layers.0.mlp.deepspeed_moe.gate.wg.weight", torch.zeros(5, 80)))
    with pytest.raises(CheckpointError, match=r"gate\.wg\.weight has shape \[5, 80\], expected \[4, 80\]"):
        load_model(ckpt)


def test_vision_tower_keys_inside_checkpoint_are_ignored(tiny_ckpts, tmp_path):
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    _edit_weights(ckpt, lambda sd: sd.__setitem__("model.image_tower.image_tower.vision_model.pre_layrnorm.weight", torch.full((32,), 7.0)))
    loaded = load_model(ckpt)
    assert not torch.equal(loaded.model.vision.vision_model.pre_layrnorm.weight, torch.full((32,), 7.0))
    assert checkpoint_info(ckpt).ignored_vision_tensors == 1


def _to_bin(ckpt: Path, payload: dict) -> None:
    for f in list(ckpt.glob("model*.safetensors*")):
        f.unlink()
    torch.save(payload, ckpt / "pytorch_model.bin")


def test_pytorch_model_bin_loads_with_weights_only(tiny_ckpts, tmp_path):
    src = tiny_ckpts[Preset.TINY_STABLELM]
    ckpt = _copy(src, tmp_path)
    sd = {}
    for shard in ckpt.glob("model-*.safetensors"):
        sd.update(load_file(str(shard)))
    _to_bin(ckpt, sd)
    a, b = load_model(src).model.lm.state_dict(), load_model(ckpt).model.lm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_is_refused_and_not_run(tiny_ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    _to_bin(ckpt, {"lm_head.weight": torch.zeros(2), "evil": _Payload()})
    with pytest.raises(CheckpointError, match="refuses to load.*weights_only=True.*convert the checkpoint to safetensors"):
        load_model(ckpt)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_tinymed_v1_checkpoint_is_refused_clearly(tiny_ckpts, tmp_path):
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)

    def to_v1(sd):  # §0: no meta expert, no gate bias
        for k in [k for k in sd if ".meta_moe." in k or k.endswith("gate.wg.bias")]:
            del sd[k]

    _edit_weights(ckpt, to_v1)
    with pytest.raises(UnsupportedCheckpoint, match="TinyMed v1 checkpoint.*cannot be reproduced"):
        load_model(ckpt)
    assert checkpoint_info(ckpt).generation == "tinymed-v1"  # info still describes it


def test_use_residual_checkpoint_with_shared_meta_keys_loads(tmp_path):
    from dataclasses import replace

    from medmoe_edge.spec import MoESpec

    spec = replace(PRESETS[Preset.TINY_PHI], moe=MoESpec(layers=(0, 2), use_residual=True))
    ckpt = write_random_checkpoint(spec, tmp_path / "res")
    # The official state dict also holds mlp.mlp.* (same storage as meta_moe, §2.2).
    _edit_weights(ckpt, lambda sd: sd.update({k.replace(".meta_moe.", ".mlp."): v.clone() for k, v in list(sd.items()) if ".meta_moe." in k}))
    loaded = load_model(ckpt)
    assert loaded.spec.moe.use_residual
    assert hasattr(loaded.model.lm.model.layers[0].mlp, "coefficient")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(model_type="llava_llama"), "model_type is 'llava_llama'"),
        (lambda c: c.pop("moe"), "no 'moe' dict"),
        (lambda c: c["moe"].update(top_k_experts=3), "top_k_experts=3 is not supported"),
        (lambda c: c.update(mm_image_tower="/nowhere/clip"), "vision tower '/nowhere/clip'.*--vision-tower"),
    ],
)
def test_bad_config_is_a_clear_error(tiny_ckpts, tmp_path, edit, message):
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def test_missing_and_corrupt_files(tiny_ckpts, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nothing-here")
    ckpt = _copy(tiny_ckpts[Preset.TINY_PHI], tmp_path)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(ckpt)
    ckpt2 = _copy(tiny_ckpts[Preset.TINY_STABLELM], tmp_path / "2")
    shard = next(ckpt2.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        load_model(ckpt2)


def test_vision_tower_override_and_unprefixed_transformers5_layout(tiny_ckpts, tmp_path):
    src = tiny_ckpts[Preset.TINY_PHI]
    tower = tmp_path / "tower"
    shutil.copytree(src / "clip-vision", tower)
    sd = load_file(str(tower / "model.safetensors"))
    save_file({k.removeprefix("vision_model."): v for k, v in sd.items()}, str(tower / "model.safetensors"))
    a = load_model(src).model.vision.state_dict()
    b = load_model(src, vision_tower=tower).model.vision.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    prefixed, unprefixed = checkpoint_info(src).counts, checkpoint_info(src, vision_tower=tower).counts
    assert (unprefixed.vision_total, unprefixed.vision_used) == (prefixed.vision_total, prefixed.vision_used)
    assert 0 < prefixed.vision_used < prefixed.vision_total
