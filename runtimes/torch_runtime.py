"""The PyTorch reference runtime (`--runtime torch`): the model every export is compared against."""

from __future__ import annotations

from pathlib import Path

import torch

from medmoe_edge.bundle import is_bundle, read_manifest
from medmoe_edge.checkpoint import LoadedModel, load_model
from medmoe_edge.errors import CheckpointError, InputError
from medmoe_edge.generation import StepOutput
from medmoe_edge.vocab import FLOAT_PRECISIONS

from .base import DTYPE, THREADS, VISION_TOWER, ArtifactKind, Availability, Capabilities, Device, DeviceKind, ModelInfo, Precision, PreparedRequest, ResolvedOptions, Runtime, prompt_routing_counts, token_kinds


def _bundle_runtime_hint(bundle: str | Path) -> str:
    try:
        fmt = read_manifest(bundle).format
    except CheckpointError:
        return "onnxruntime (or the runtime of its format)"
    return {ArtifactKind.ONNX: "onnxruntime", ArtifactKind.GGUF: "llamacpp", ArtifactKind.TENSORRT: "tensorrt"}.get(fmt, fmt.value)


def _torch_device(device: Device) -> torch.device:
    """The torch device of a parsed --device, refusing a CUDA device this torch cannot use."""
    if device.kind is DeviceKind.CPU:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device} was requested but this torch has no usable CUDA device: use --device cpu")
    n = torch.cuda.device_count()
    if device.index is not None and device.index >= n:
        raise InputError(f"--device {device} was requested but this machine has {n} CUDA device(s): use --device cuda:0 .. cuda:{n - 1}")
    return torch.device("cuda", device.index)


class TorchRuntime(Runtime):
    """Runs a Med-MoE checkpoint directory with the PyTorch reference model (expert-sparse MoE, KV cache)."""

    name = "torch"
    artifact_kind = ArtifactKind.CHECKPOINT
    description = "PyTorch reference implementation (CPU or CUDA), the fidelity baseline"
    capabilities = Capabilities(reports_routing=True, max_batch=None, devices=(DeviceKind.CPU, DeviceKind.CUDA), precisions=FLOAT_PRECISIONS, options=frozenset({DTYPE, THREADS, VISION_TOWER}))

    @classmethod
    def availability(cls) -> Availability:
        gpu = "CUDA available" if torch.cuda.is_available() else "CPU only"
        return Availability(True, f"torch {torch.__version__}, {gpu}")

    def _load(self, model: str | Path | LoadedModel, options: ResolvedOptions) -> None:
        if not isinstance(model, LoadedModel) and is_bundle(model):
            raise InputError(f"{model} is an exported bundle, not a checkpoint: run it with --runtime {_bundle_runtime_hint(model)}")
        self._load_checkpoint(model, options)

    def _load_checkpoint(self, model: str | Path | LoadedModel, options: ResolvedOptions) -> None:
        """Load a checkpoint directory or hub id (for subclasses that find one inside their artifact),
        or take a `LoadedModel` the caller already holds (`quantize` records its bundle's trace on
        the model it planned with, a bf16 checkpoint's matrices kept as stored: one load, not two)."""
        device = _torch_device(options.device)
        # the user's count, else the contract's default (which leaves room for other work on the cores)
        torch.set_num_threads(options.num_threads)
        dtype = options.dtype or Precision.FP32
        if isinstance(model, LoadedModel):
            if model.model.dtype != dtype.torch or model.model.device != device:
                raise ValueError(f"the model computes in {model.model.dtype} on {model.model.device}, not {dtype.torch} on {device}")
            self.loaded = model
        else:
            self.loaded = load_model(model, dtype=dtype.torch, device=device, vision_tower=options.vision_tower)
        self.model = self.loaded.model
        self._info = ModelInfo(
            spec=self.loaded.spec,
            tokenizer=self.loaded.tokenizer,
            processor=self.loaded.processor,
            label=self.loaded.checkpoint_dir.name,
            context_length=self.loaded.spec.text.max_position_embeddings,
            vocab_rows=self.model.n_vocab,
        )
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    def _prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        m = self.model
        pixels = torch.cat([r.pixel_values for r in requests])
        image_rows = m.encode_images(pixels) if pixels.shape[0] else None
        rows, offset = [], 0
        for r in requests:
            n = r.pixel_values.shape[0]
            rows.append(m.splice(r.token_ids, image_rows[offset : offset + n] if n else torch.zeros(0, m.spec.image_tokens, m.spec.text.hidden_size)))
            offset += n
        batch = m.make_batch(rows)
        self._cache = m.new_cache(len(requests), batch.embeds.shape[1] + max_new_tokens)
        logits, routing = m.forward_embeds(batch.embeds, batch.positions, batch.mask, self._cache)
        last = torch.tensor([n - 1 for n in batch.lengths], device=logits.device)
        b = torch.arange(len(requests), device=logits.device)
        self._mask = batch.mask
        self._next_pos = torch.tensor(batch.lengths, device=logits.device)
        B, L = len(requests), batch.embeds.shape[1]
        kinds = token_kinds(requests, m.spec.image_tokens, L)
        return StepOutput(
            logits=logits[b, last],
            experts={layer: r.experts.view(B, L, -1)[b.cpu(), last.cpu()].cpu() for layer, r in routing.items()},
            prompt_routing=prompt_routing_counts({layer: r.experts[:, 0].view(B, L) for layer, r in routing.items()}, kinds, m.spec.moe.num_experts),
            prompt_experts={layer: r.experts.view(B, L, -1).cpu() for layer, r in routing.items()},
        )

    def _decode(self, tokens: torch.Tensor) -> StepOutput:
        if self._cache is None:
            raise RuntimeError("decode() called after close()")
        m = self.model
        embeds = m.embed_tokens(tokens.to(m.device))[:, None]
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        logits, routing = m.forward_embeds(embeds, self._next_pos[:, None], self._mask, self._cache)
        self._next_pos = self._next_pos + 1
        return StepOutput(logits=logits[:, 0], experts={layer: r.experts.cpu() for layer, r in routing.items()})

    def close(self) -> None:
        self._cache = self._mask = self._next_pos = None
