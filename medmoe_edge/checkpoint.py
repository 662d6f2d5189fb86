"""Load a released-layout Med-MoE checkpoint into the reference model (§4).

A checkpoint is a directory with `config.json` (model_type `moe_llava_phi` /
`moe_llava_stablelm`, nested `moe` dict), weights (sharded safetensors with an index,
or `pytorch_model.bin`), and the tokenizer. The CLIP vision tower is a separate HF
directory named by `config.mm_image_tower` (§1.1, §4.2.7).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo import demo_dir, is_demo
from .errors import CheckpointError, ConfigError, UnsupportedCheckpoint
from .hfconfig import moe_spec_from_config, text_spec_from_config, vision_spec_from_config
from .imaging import ImageProcessorSpec
from .model.medmoe import MedMoE
from .spec import Generation, ModelSpec
from .tokenizer import Tokenizer
from .weights import TensorInfo, load_tensors, tensor_infos, weight_files

CLIP_L14_336_ID = "openai/clip-vit-large-patch14-336"
# OWNER/NAME, optionally followed by the folder of the checkpoint inside the repository
# (the released weights sit under stage3/... of JsST/Med-MoE).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<sub>[\w.-]+(?:/[\w.-]+)*))?$")

def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or fix it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory for `model`: "demo" (the built-in model), an existing
    directory, or a hub id downloaded with huggingface_hub when the network allows (cached afterwards).

    Raises:
        CheckpointError: neither a directory nor a downloadable hub id.
    """
    if is_demo(model):
        return demo_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    m = _HUB_ID.match(model) if isinstance(model, str) else None
    if m:
        try:
            return _hub_checkpoint(m.group("repo"), m.group("sub"))
        except CheckpointError as e:
            raise CheckpointError(f"{model} is not a local directory, and as a hub id: {e}") from None
    raise CheckpointError(f"model directory {model} does not exist: pass a local checkpoint directory or a hub id like JsST/Med-MoE/stage3/llavastablelm-1.6b-medmoe")


def _hub_checkpoint(repo_id: str, sub: str | None) -> Path:
    """The checkpoint folder `sub` (or the root) of a hub repository, downloading only that folder.

    A repository without a config.json where one is asked for is refused with the folders that
    have one, after fetching only the repository's small JSON files.
    """
    prefix = f"{sub}/" if sub else ""
    configs = _hub_snapshot(repo_id, [f"{prefix}config.json", "**/config.json", "config.json"])
    if not (configs / prefix / "config.json").is_file():
        dirs = sorted(p.parent.relative_to(configs) for p in configs.rglob("config.json") if p.parent != configs)
        found = [str(d) for d in dirs if not any(o in d.parents for o in dirs)]  # not a tower folder inside a checkpoint
        where = f"; its checkpoints are in: {', '.join(found)}: pass --model {repo_id}/{found[0]}" if found else ""
        raise CheckpointError(f"{repo_id} has no config.json {'in ' + sub if sub else 'at its root'}{where}")
    root = _hub_snapshot(repo_id, [f"{prefix}*"] if sub else None)
    return root / prefix if sub else root


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns))
    except Exception:  # noqa: BLE001 - not cached; try the network below
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth...
        raise CheckpointError(
            f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}): "
            "download it on a machine with network access and pass the local directory"
        ) from None


def detect_generation(names: list[str]) -> Generation:
    """§0 detection rule: meta expert or gate bias → Med-MoE; bias-less gate only → TinyMed v1."""
    if any(".mlp.meta_moe." in n or n.endswith("deepspeed_moe.gate.wg.bias") for n in names):
        return Generation.MEDMOE
    if any(n.endswith("deepspeed_moe.gate.wg.weight") for n in names):
        return Generation.TINYMED_V1
    raise CheckpointError("the weights contain no MoE gate (deepspeed_moe.gate.wg): this is not a Med-MoE checkpoint")


def refuse_v1(generation: Generation) -> None:
    if generation is Generation.TINYMED_V1:
        raise UnsupportedCheckpoint(
            "this is a TinyMed v1 checkpoint (no meta expert, no gate bias): its stock-DeepSpeed top-2 routing "
            "draws random noise and drops tokens by capacity, so it cannot be reproduced; use a Med-MoE stage-3 checkpoint (JsST/Med-MoE)"
        )


def _is_ignored(name: str) -> bool:
    # Vision-tower keys saved inside the checkpoint are discarded, as the official loader does (§2.6).
    return name.startswith("model.image_tower.") or name.startswith("model.vision_tower.")


def _residual_alias(name: str) -> str | None:
    """`mlp.mlp.*` (use_residual) shares storage with `mlp.meta_moe.*` (§2.2): the meta key it aliases."""
    m = re.match(r"^(model\.layers\.\d+\.mlp\.)mlp\.(.+)$", name)
    return f"{m.group(1)}meta_moe.{m.group(2)}" if m else None


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected; the error names the tensor."""
    missing = sorted(expected.keys() - found.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where} is missing tensor {missing[0]}{more}: the checkpoint is incomplete or of another model")
    extra = sorted(found.keys() - expected.keys())
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"{where} has unexpected tensor {extra[0]}{more}: config.json does not describe these weights")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {list(found[name])}, expected {list(shape)} from config.json")


@dataclass(frozen=True)
class TowerFiles:
    """A resolved vision-tower directory."""

    directory: Path
    spec_config: dict
    processor: ImageProcessorSpec


def resolve_tower_dir(mm_image_tower: str, checkpoint_dir: Path, override: str | Path | None = None) -> Path:
    """Find the CLIP directory named by `mm_image_tower` (§1.1 builder rule, §4.1).

    Order: an explicit override; the value as a path (absolute, or relative to the
    checkpoint directory, then to the working directory); a known OpenAI/LAION id, from
    the local hub cache or downloaded. Anything containing `clip-vit-large-patch14-336`
    maps to `openai/clip-vit-large-patch14-336` (the released configs carry relative paths).
    """
    if override is not None:
        p = Path(override).expanduser()
        if not p.is_dir():
            raise CheckpointError(f"--vision-tower {override} is not a directory")
        return p
    for cand in (Path(mm_image_tower).expanduser(), checkpoint_dir / mm_image_tower, Path.cwd() / mm_image_tower):
        if cand.is_dir():
            return cand
    hub_id = CLIP_L14_336_ID if "clip-vit-large-patch14-336" in mm_image_tower else mm_image_tower
    if hub_id.startswith(("openai/", "laion/")):
        return _hub_snapshot(hub_id, None)
    raise CheckpointError(
        f"vision tower {mm_image_tower!r} (config.json mm_image_tower) was not found: pass --vision-tower DIR with an HF CLIP directory"
    )


def tower_files(directory: Path) -> TowerFiles:
    cfg = read_json(directory / "config.json", "the vision tower needs an HF CLIP config.json")
    pre = directory / "preprocessor_config.json"
    vspec = vision_spec_from_config(cfg)
    processor = ImageProcessorSpec.from_preprocessor_config(read_json(pre, "")) if pre.is_file() else ImageProcessorSpec.clip(vspec.image_size)
    return TowerFiles(directory, cfg, processor)


_UNPREFIXED_CLIP = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_TOWER_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def canonical_tower_name(name: str) -> str | None:
    """`vision_model.*` name of a CLIP vision tensor, or None for anything else (text tower,
    projections, logit scale, position-id buffers). transformers 5 saves CLIPVisionModel
    without the `vision_model.` prefix; both layouts are accepted."""
    if name.startswith(_UNPREFIXED_CLIP):
        name = "vision_model." + name
    if not name.startswith("vision_model.") or name.startswith("vision_model.embeddings.position_ids"):
        return None
    return name


def tower_tensor_used(name: str, layers_used: int) -> bool:
    """Whether Med-MoE uses a canonical tower tensor: not post_layernorm, not a layer past the
    selected one (§1.1: computed but unused upstream)."""
    m = _TOWER_LAYER.match(name)
    return not name.startswith("vision_model.post_layernorm.") and not (m and int(m.group(1)) >= layers_used)


def _tower_state(directory: Path, model: MedMoE) -> dict[str, torch.Tensor]:
    """The tower tensors the model uses, under their canonical names."""
    used = model.spec.vision.layers_used
    keep: dict[str, torch.Tensor] = {}
    for name, t in load_tensors(weight_files(directory)).items():
        canon = canonical_tower_name(name)
        if canon is not None and tower_tensor_used(canon, used):
            keep[canon] = t
    return keep


@dataclass
class LoadedModel:
    """Everything `medmoe-edge run` needs from a checkpoint."""

    model: MedMoE
    tokenizer: Tokenizer
    processor: ImageProcessorSpec
    spec: ModelSpec
    generation: Generation
    checkpoint_dir: Path
    tower_dir: Path
    config: dict


def reload_vision_tower(loaded: LoadedModel, dtype: torch.dtype = torch.float32) -> None:
    """Load `loaded`'s CLIP tower again from its files in `dtype` (e.g. fp32 after a bf16 load of
    the whole model: the tower is stored in full precision, separately from the checkpoint)."""
    device = next(loaded.model.vision.parameters()).device
    state = _tower_state(loaded.tower_dir, loaded.model)
    loaded.model.vision.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)


def read_spec(checkpoint_dir: Path, vision_tower: str | Path | None = None) -> tuple[ModelSpec, dict, TowerFiles]:
    """Parse config.json and the tower config into a ModelSpec (no weights loaded)."""
    cfg = read_json(checkpoint_dir / "config.json", "a Med-MoE checkpoint directory needs config.json")
    try:
        text, moe = text_spec_from_config(cfg), moe_spec_from_config(cfg)
        tower = tower_files(resolve_tower_dir(str(cfg.get("mm_image_tower") or ""), checkpoint_dir, vision_tower))
        select = int(cfg.get("mm_vision_select_layer", -2))
        vision = vision_spec_from_config(tower.spec_config, select_layer=select)
        spec = ModelSpec(
            text,
            moe,
            vision,
            mm_hidden_size=int(cfg.get("mm_hidden_size", vision.hidden_size)),
            projector_type=str(cfg.get("image_projector_type", "mlp2x_gelu")),
            select_feature=str(cfg.get("mm_vision_select_feature", "patch")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint_dir}: {e}") from None
    return spec, cfg, tower


def checkpoint_infos(checkpoint_dir: Path) -> list[TensorInfo]:
    return tensor_infos(weight_files(checkpoint_dir))


NARROW_FLOATS = (torch.bfloat16, torch.float16)


def fp32_bytes(model_dir: Path) -> int:
    """Bytes the checkpoint's tensors take loaded whole in fp32, read from the file headers (the CLIP
    tower, stored apart and small beside the language model, not counted)."""
    return 4 * sum(i.numel for i in checkpoint_infos(model_dir))


def load_model(
    model: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", vision_tower: str | Path | None = None, keep_stored: bool = False
) -> LoadedModel:
    """Load a Med-MoE checkpoint (directory or hub id) into the reference model.

    Args:
        model: checkpoint directory, or a hub id (downloaded when the network allows).
        dtype: parameter dtype (the router always computes in fp32, §2.3).
        device: torch device.
        vision_tower: CLIP directory overriding `config.mm_image_tower`.
        keep_stored: keep the checkpoint's matrices (2-D weights) in their stored dtype where it
            is bf16 or fp16, while the model computes in `dtype` (fp32): the same results bit
            for bit, with half the weights' memory (`model.linear.Linear`). For `calibrate` and
            `quantize`, which hold a full-size model beside their statistics.
    Returns:
        The model in eval mode with its tokenizer and image-processor settings.
    Raises:
        CheckpointError: missing/corrupt files, missing/unexpected/mis-shaped tensors.
        UnsupportedCheckpoint: a TinyMed v1 checkpoint.
    """
    directory = resolve_model_dir(model)
    spec, cfg, tower = read_spec(directory, vision_tower)
    tokenizer = Tokenizer.from_dir(directory)
    state = load_tensors(weight_files(directory))
    generation = detect_generation(list(state))
    refuse_v1(generation)
    state = {k: v for k, v in state.items() if not _is_ignored(k)}
    for name in [n for n in state if _residual_alias(n)]:
        alias = _residual_alias(name)
        if spec.moe.use_residual and alias in state and torch.equal(state[alias], state[name]):
            del state[name]  # same storage as the meta expert in the official model

    with torch.device("meta"):
        m = MedMoE(spec)
    expected = {k: tuple(v.shape) for k, v in m.lm.state_dict().items()}
    check_tensors(expected, {k: tuple(v.shape) for k, v in state.items()}, f"{directory}")
    tstate = _tower_state(tower.directory, m)
    check_tensors({k: tuple(v.shape) for k, v in m.vision.state_dict().items()}, {k: tuple(v.shape) for k, v in tstate.items()}, f"vision tower {tower.directory}")

    if keep_stored and dtype != torch.float32:
        raise ValueError("keep_stored widens stored matrices to fp32: load with dtype=torch.float32")

    def kept(v: torch.Tensor) -> torch.dtype:
        return v.dtype if keep_stored and v.dim() == 2 and v.dtype in NARROW_FLOATS else dtype

    m.lm.load_state_dict({k: v.to(device=device, dtype=kept(v)) for k, v in state.items()}, strict=True, assign=True)
    m.vision.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tstate.items()}, strict=True, assign=True)
    m.eval().requires_grad_(False)
    if len(tokenizer) > m.n_vocab:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the model only {m.n_vocab} embedding rows: the tokenizer belongs to another model")
    if len(tokenizer) < m.n_vocab:
        m.truncate_vocab(len(tokenizer))  # §4.2.6, as the official loader
    return LoadedModel(m, tokenizer, tower.processor, spec, generation, directory, tower.directory, cfg)
