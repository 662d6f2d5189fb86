"""Teacher-forced sequences of a question set: prompt + the set's answer + EOS, run through the reference.

Calibration and sensitivity both run the PyTorch reference once per sequence on the whole
teacher-forced sequence (no generation): the prompt with its image rows spliced in (§5.3), then
the ground-truth answer tokens and EOS exactly as training formats them (`" " + answer`, then
`<|endoftext|>`). The answer positions (answer tokens + EOS) are the ones whose logits the
sensitivity objective compares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from medmoe_edge.checkpoint import LoadedModel
from medmoe_edge.imaging import PreprocessMode, as_loaded_image, preprocess
from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX
from medmoe_edge.model.moe import Routing
from medmoe_edge.prompt import build_prompt, tokenize_prompt


@dataclass(frozen=True)
class TeacherSequence:
    """One teacher-forced sequence.

    Attributes:
        token_ids: prompt ids with IMAGE_TOKEN_INDEX placeholders, then answer ids and EOS.
        pixel_values: [1, 3, S, S].
        answer_start: spliced position of the first answer token.
        domain: the sample's domain.
        id: the sample id.
    """

    token_ids: list[int]
    pixel_values: torch.Tensor
    answer_start: int
    domain: str
    id: str

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "pixel_values": self.pixel_values, "answer_start": self.answer_start, "domain": self.domain, "id": self.id}

    @classmethod
    def from_json(cls, d: dict) -> TeacherSequence:
        return cls(list(d["token_ids"]), d["pixel_values"], int(d["answer_start"]), str(d["domain"]), str(d["id"]))


def spliced_kinds(token_ids: Sequence[int], image_tokens: int, answer_start: int) -> torch.Tensor:
    """Per spliced position: 0 image row, 1 question (prompt text), 2 answer (token or EOS)."""
    kinds: list[int] = []
    for t in token_ids:
        kinds += [0] * image_tokens if t == IMAGE_TOKEN_INDEX else [1]
    out = torch.tensor(kinds)
    out[answer_start:] = 2
    return out


def prepare(loaded: LoadedModel, samples: Sequence, root: Path, mode: PreprocessMode = PreprocessMode.PAD) -> list[TeacherSequence]:
    """Teacher-forced sequences of set samples (images relative to `root`)."""
    tok = loaded.tokenizer
    out = []
    for s in samples:
        pixels = preprocess(as_loaded_image(root / s.image).image, loaded.processor, mode).unsqueeze(0)
        prompt = tokenize_prompt(tok, build_prompt(s.question))
        answer = tok.encode(f" {s.answer}") + [tok.eos_id]
        start = sum(loaded.spec.image_tokens if t == IMAGE_TOKEN_INDEX else 1 for t in prompt)
        domain = s.domain.value if hasattr(s.domain, "value") else str(s.domain)
        out.append(TeacherSequence(prompt + answer, pixels, start, domain, s.id))
    return out


def image_features(loaded: LoadedModel, seq: TeacherSequence) -> torch.Tensor:
    """The vision tower's output for the sequence's image (before the projector) [1, P, C]: the
    tower stays in floating point, so sensitivity passes compute it once."""
    m = loaded.model
    with torch.inference_mode():
        return m.vision(seq.pixel_values.to(m.vision.vision_model.pre_layrnorm.weight.dtype)).to(m.dtype)


def embeddings(loaded: LoadedModel, seq: TeacherSequence, features: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's input for the sequence [1, L, H]: token embeddings with the projected image
    rows spliced in (§5.3)."""
    m = loaded.model
    with torch.inference_mode():
        feats = image_features(loaded, seq) if features is None else features
        return m.splice(seq.token_ids, m.lm.model.mm_projector(feats))[None]


def hidden(
    loaded: LoadedModel, seq: TeacherSequence, features: torch.Tensor | None = None, *, start: int = 0, stop: int | None = None, inputs: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[int, Routing]]:
    """One teacher-forced pass up to the lm_head: (final hidden states [L, H] over every spliced
    position, routing per MoE layer).

    `start` and `stop` run only the decoder layers in between, from `inputs` (the hidden states
    entering `start` [1, L, H], as an earlier call returned them; None: the embeddings), and with
    a `stop` return the hidden states entering it (after the last layer: before the final norm)
    instead of the final ones.
    """
    m = loaded.model
    with torch.inference_mode():
        x = embeddings(loaded, seq, features) if inputs is None else inputs
        n = x.shape[1]
        h, routing = m.lm.model(x, torch.arange(n)[None], torch.ones(1, n, dtype=torch.int64), None, from_layer=start, to_layer=stop)
    return h[0], routing


__all__ = ["TeacherSequence", "embeddings", "hidden", "image_features", "prepare", "spliced_kinds"]
