"""Training data for the demo model: images → frozen-tower features, conversations → token ids + labels.

Every image's QA pairs form one multi-turn conversation in the training format of §5.2:

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>...

Only answer tokens and their `<|endoftext|>` are trained (labels = -100 elsewhere), as in
LLaVA. The text before `<image>` is the same for every conversation, so a batch is
`[shared prefix | image rows | right-padded suffix]`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from medmoe_edge.calibration.synth import DOMAINS, Sample, caption
from medmoe_edge.imaging import ImageProcessorSpec, PreprocessMode, load_image, preprocess
from medmoe_edge.prompt import IMAGE_PLACEHOLDER, SYSTEM
from medmoe_edge.tokenizer import Tokenizer

IGNORE = -100
DESCRIBE = "describe the image."


@dataclass
class ImageSet:
    """Preprocessed pixels of every distinct image, with its domain index and caption."""

    pixels: torch.Tensor  # [N, 3, S, S] float32
    domains: torch.Tensor  # [N] int64, index into DOMAINS
    captions: list[str]
    qa: list[list[tuple[str, str]]]  # per image: (question, answer) pairs


def load_images(manifest_dir: Path, samples: list[Sample], processor: ImageProcessorSpec) -> ImageSet:
    """Group samples by image; preprocess each image once (pad mode, as at inference)."""
    by_image: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_image[s.image].append(s)
    paths = sorted(by_image)
    pixels = torch.stack([preprocess(load_image(manifest_dir / p).image, processor, PreprocessMode.PAD) for p in paths])
    first = [by_image[p][0] for p in paths]
    return ImageSet(
        pixels=pixels,
        domains=torch.tensor([DOMAINS.index(s.domain) for s in first]),
        captions=[caption(s.findings) for s in first],
        qa=[[(s.question, s.answer) for s in by_image[p]] for p in paths],
    )


@dataclass(frozen=True)
class Encoded:
    """A conversation's tokens after the image: ids and aligned labels (next-token targets)."""

    ids: list[int]
    labels: list[int]


class ConversationEncoder:
    """Tokenises conversations exactly as `medmoe_edge.prompt` tokenises inference prompts."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        head = f"{SYSTEM} USER: {IMAGE_PLACEHOLDER}"
        self.prefix = tok.encode(head.split(IMAGE_PLACEHOLDER)[0])  # same chunk as tokenize_prompt

    def encode(self, turns: list[tuple[str, str]]) -> Encoded:
        ids: list[int] = []
        labels: list[int] = []
        for i, (q, a) in enumerate(turns):
            # Turn 1 continues the chunk after <image>; later turns follow sep2 (§5.2).
            context = self.tok.encode(f"\n{q} ASSISTANT:" if i == 0 else f"USER: {q} ASSISTANT:")
            answer = self.tok.encode(f" {a}") + [self.tok.eos_id]
            ids += context + answer
            labels += [IGNORE] * len(context) + answer
        return Encoded(ids, labels)

    def encode_text_only(self, turns: list[tuple[str, str]]) -> Encoded:
        """For base-LM pretraining: the same text with no image, every token trained."""
        enc = self.encode(turns)
        ids = self.prefix + enc.ids
        return Encoded(ids, list(ids))


@dataclass
class Batch:
    """Tensors for one training step (B rows, T = suffix length after the image)."""

    image_index: torch.Tensor  # [B]
    suffix: torch.Tensor  # [B, T] ids (padding = eos, masked)
    suffix_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] target of each suffix position's *own* token (shifted in the loss)


def collate(encoded: list[Encoded], image_index: list[int], pad_id: int, max_len: int) -> Batch:
    t = min(max(len(e.ids) for e in encoded), max_len)
    b = len(encoded)
    suffix = torch.full((b, t), pad_id, dtype=torch.int64)
    mask = torch.zeros(b, t, dtype=torch.int64)
    labels = torch.full((b, t), IGNORE, dtype=torch.int64)
    for i, e in enumerate(encoded):
        n = min(len(e.ids), t)
        suffix[i, :n] = torch.tensor(e.ids[:n])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels[:n])
    return Batch(torch.tensor(image_index), suffix, mask, labels)
