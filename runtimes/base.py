"""The runtime plugin interface (installed as `medmoe_edge.runtimes.base`).

A runtime runs one kind of artifact (a checkpoint, an ONNX bundle, a GGUF bundle, a
TensorRT engine). Runtimes are found through the `medmoe_edge.runtimes` entry-point
group, the built-in ones included (see `registry.py`). A runtime subclass provides:

* `availability()`: can it run here, and if not, why (imports optional libraries lazily);
* `__init__(model, options)`: load the artifact; reject options it does not support;
* `model_info`: tokenizer, image processing and limits the shared front end needs;
* `prefill(requests, max_new_tokens)` and `decode(tokens)`: one forward pass each.

The shared generation loop (`medmoe_edge.generation.generate`) drives `prefill` and
`decode`, so sampling, stopping and streaming behave the same on every runtime. A
runtime with its own native loop may override `generate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import ClassVar

import torch

from medmoe_edge.errors import InputError
from medmoe_edge.generation import GenerationConfig, LoopTimings, RowResult, StepOutput, TokenEvent, generate
from medmoe_edge.imaging import ImageProcessorSpec
from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX
from medmoe_edge.spec import ModelSpec
from medmoe_edge.tokenizer import Tokenizer


class ArtifactKind(str, Enum):
    """What a runtime loads."""

    CHECKPOINT = "checkpoint"  # a released-layout Med-MoE directory
    ONNX = "onnx"
    GGUF = "gguf"
    TENSORRT = "tensorrt"


class DType(str, Enum):
    """Compute precision choices of `--dtype`."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}[self]


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str


@dataclass(frozen=True)
class RuntimeOptions:
    """Options common to runtimes. A runtime raises `InputError` for an option it does not
    support instead of silently ignoring it.

    Attributes:
        device: "cpu", "cuda" or "cuda:N".
        dtype: compute precision, or None for the runtime's default.
        num_threads: CPU threads, or None for the library default.
        vision_tower: CLIP directory overriding the checkpoint's `mm_image_tower`.
        provider: execution provider, for runtimes that have them (onnxruntime: cpu, cuda, tensorrt).
    """

    device: str = "cpu"
    dtype: DType | None = None
    num_threads: int | None = None
    vision_tower: Path | None = None
    provider: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime-independent front end needs to know about the loaded model."""

    spec: ModelSpec
    tokenizer: Tokenizer
    processor: ImageProcessorSpec
    label: str  # human-readable model name for output
    context_length: int  # positions available (prompt + generated)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id


@dataclass
class PreparedRequest:
    """One prompt ready for a runtime.

    Attributes:
        token_ids: prompt ids with IMAGE_TOKEN_INDEX where image rows are spliced.
        pixel_values: [N_images, 3, S, S] float32 preprocessed images.
    """

    token_ids: list[int]
    pixel_values: torch.Tensor

    def spliced_length(self, image_tokens: int) -> int:
        n_img = self.pixel_values.shape[0]
        return len(self.token_ids) - n_img + n_img * image_tokens


TOKEN_PAD, TOKEN_TEXT, TOKEN_IMAGE = 0, 1, 2


def token_kinds(requests: list[PreparedRequest], image_tokens: int, length: int) -> torch.Tensor:
    """[B, length] int64: TOKEN_IMAGE / TOKEN_TEXT per spliced prompt position, TOKEN_PAD after the end."""
    kinds = torch.full((len(requests), length), TOKEN_PAD, dtype=torch.int64)
    for i, r in enumerate(requests):
        row = [k for t in r.token_ids for k in ([TOKEN_IMAGE] * image_tokens if t == IMAGE_TOKEN_INDEX else [TOKEN_TEXT])]
        kinds[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return kinds


def prompt_routing_counts(top1: dict[int, torch.Tensor], kinds: torch.Tensor, n_experts: int) -> list[dict[int, dict[str, list[int]]]]:
    """Per row and MoE layer: how many image / text prompt positions each expert received.

    Args:
        top1: {MoE layer: [B, L] first-choice expert per spliced prompt position}.
        kinds: [B, L] from `token_kinds`.
    """
    out: list[dict[int, dict[str, list[int]]]] = [{} for _ in range(kinds.shape[0])]
    for layer, experts in top1.items():
        experts = experts.cpu()
        for i in range(kinds.shape[0]):
            out[i][layer] = {
                name: torch.bincount(experts[i][kinds[i] == code], minlength=n_experts).tolist() for name, code in (("image", TOKEN_IMAGE), ("text", TOKEN_TEXT))
            }
    return out


class Runtime(ABC):
    """Base class of runtime plugins; subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    artifact_kind: ClassVar[ArtifactKind]
    description: ClassVar[str]

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether this runtime can run on this machine, with the reason when it cannot."""

    @property
    @abstractmethod
    def model_info(self) -> ModelInfo:
        """Tokenizer, image settings and limits of the loaded model."""

    @abstractmethod
    def prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        """Process the prompts (a new sequence per request); return next-token logits per row."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor) -> StepOutput:
        """Feed one token per row [B] after the previous pass; return the next logits."""

    def check_fits(self, requests: list[PreparedRequest], max_new_tokens: int) -> None:
        """Refuse prompts that cannot fit the model's context with `max_new_tokens` generated."""
        info = self.model_info
        for r in requests:
            need = r.spliced_length(info.spec.image_tokens) + max_new_tokens
            if need > info.context_length:
                raise InputError(
                    f"prompt ({r.spliced_length(info.spec.image_tokens)} positions incl. {info.spec.image_tokens} image rows) "
                    f"plus --max-new-tokens {max_new_tokens} needs {need} positions but the model has {info.context_length}: "
                    "shorten the question or lower --max-new-tokens"
                )

    def generate(self, requests: list[PreparedRequest], cfg: GenerationConfig, timings: LoopTimings | None = None) -> Iterator[TokenEvent | list[RowResult]]:
        """Generate for a batch: yields TokenEvents as produced, then the list of RowResults."""
        self.check_fits(requests, cfg.max_new_tokens)
        return generate(self, requests, cfg, timings)

    def close(self) -> None:
        """Free the runtime's resources."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
