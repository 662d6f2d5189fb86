"""The Python API behind the CLI: load a model, ask a question about an image, stream tokens.

    >>> from medmoe_edge import api
    >>> pipe = api.load("path/to/checkpoint")                  # PyTorch reference runtime
    >>> ans = pipe.answer("scan.dcm", "Is there a lesion?")
    >>> ans.text, ans.routing.generated[0]
    >>> for piece in pipe.stream("scan.png", "Which organ is shown?"):
    ...     print(piece, end="")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .generation import FinishReason, GenerationConfig, LoopTimings, RowResult, TokenEvent
from .imaging import LoadedImage, PreprocessMode, as_loaded_image, preprocess
from .prompt import build_prompt, tokenize_prompt
from .runtime_contract import PreparedRequest, Runtime, RuntimeOptions
from .runtimes.registry import get_runtime


# What the API takes as an image: a path (PNG, JPEG, TIFF, ..., DICOM), a LoadedImage, a
# PIL.Image.Image, a numpy array or a pydicom Dataset (see imaging.as_loaded_image).
ImageInput = Union[str, os.PathLike, LoadedImage, Any]


MIN_RATE_TOKENS = 8  # decode steps below which a tokens/s figure is noise (one step is one token)


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of each phase of one answer."""

    preprocess_s: float
    time_to_first_token_s: float
    decode_s: float
    decode_tokens: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Decode rate, or None when too few tokens were decoded for a rate to mean anything."""
        if self.decode_tokens < MIN_RATE_TOKENS or self.decode_s <= 0:
            return None
        return self.decode_tokens / self.decode_s


@dataclass(frozen=True)
class RoutingReport:
    """Experts chosen per MoE layer.

    Attributes:
        moe_layers: the MoE layer indices.
        prompt: {layer: {"image": [tokens per expert], "text": [...]}} over the prompt (top-1 choice).
        generated: per generated token, {layer: [expert ids]} of the forward pass that produced it.
    """

    moe_layers: list[int]
    prompt: dict[int, dict[str, list[int]]]
    generated: list[dict[int, list[int]]]


@dataclass(frozen=True)
class Answer:
    """The answer to one question, with everything needed to audit it."""

    text: str
    token_ids: list[int]
    prompt_tokens: int  # spliced positions (text tokens + image rows)
    finish_reason: FinishReason
    timings: Timings
    routing: RoutingReport
    image: dict = field(default_factory=dict)  # technical image facts (format, size, frame); never patient data

    def to_json(self) -> dict:
        return {
            "answer": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "finish_reason": self.finish_reason.value,
            "timings": {
                "preprocess_s": self.timings.preprocess_s,
                "time_to_first_token_s": self.timings.time_to_first_token_s,
                "decode_s": self.timings.decode_s,
                "decode_tokens": self.timings.decode_tokens,
                "decode_tokens_per_s": self.timings.decode_tokens_per_s,
            },
            "routing": {
                "moe_layers": self.routing.moe_layers,
                "prompt": {str(k): v for k, v in self.routing.prompt.items()},
                "generated": [{str(k): v for k, v in step.items()} for step in self.routing.generated],
            },
            "image": self.image,
        }


def _image_facts(img: LoadedImage) -> dict:
    w, h = img.image.size
    return {"format": img.source_format, "width": w, "height": h, "frame": img.frame, "frames": img.n_frames}


class Pipeline:
    """A loaded runtime plus the shared front end (image loading, preprocessing, prompt)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def prepare(self, image: ImageInput, question: str, *, preprocess_mode: PreprocessMode = PreprocessMode.PAD, frame: int | None = None) -> tuple[PreparedRequest, LoadedImage]:
        """Load and preprocess the image and tokenise the prompt (§5.1-5.3).

        Args:
            image: a file path, `LoadedImage`, `PIL.Image.Image`, numpy array or pydicom `Dataset`.
        """
        info = self.runtime.model_info
        loaded = as_loaded_image(image, frame=frame)
        pixels = preprocess(loaded.image, info.processor, preprocess_mode)
        ids = tokenize_prompt(info.tokenizer, build_prompt(question))
        return PreparedRequest(token_ids=ids, pixel_values=pixels.unsqueeze(0)), loaded

    def _run(self, image, question, generation: GenerationConfig, preprocess_mode: PreprocessMode, frame: int | None) -> Iterator[TokenEvent | Answer]:
        t0 = time.perf_counter()
        req, loaded = self.prepare(image, question, preprocess_mode=preprocess_mode, frame=frame)
        t_pre = time.perf_counter() - t0
        loop = LoopTimings()
        result: RowResult | None = None
        for ev in self.runtime.generate([req], generation, loop):
            if isinstance(ev, TokenEvent):
                yield ev
            else:
                result = ev[0]
        assert result is not None  # generate() always ends with the results
        info = self.runtime.model_info
        yield Answer(
            text=info.tokenizer.decode(result.token_ids).strip(),  # §5.4: decode, skip specials, strip
            token_ids=result.token_ids,
            prompt_tokens=req.spliced_length(info.spec.image_tokens),
            finish_reason=result.finish_reason,
            timings=Timings(t_pre, loop.prefill_s, loop.decode_s, loop.decode_steps),
            routing=RoutingReport(list(info.spec.moe.layers), result.prompt_routing, result.routing),
            image=_image_facts(loaded),
        )

    def answer(
        self,
        image: ImageInput,
        question: str,
        *,
        generation: GenerationConfig | None = None,
        preprocess_mode: PreprocessMode = PreprocessMode.PAD,
        frame: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Answer `question` about `image`.

        Args:
            image: a path to an image or DICOM file, a `LoadedImage`, `PIL.Image.Image`, numpy array or pydicom `Dataset`.
            question: the question text.
            generation: decoding settings (default: greedy, 512 new tokens).
            preprocess_mode: `pad` (training, default) or `crop` (official eval), §5.1.
            frame: DICOM frame (default: the middle frame).
            on_text: called with each new piece of answer text as it is generated.
        Raises:
            medmoe_edge.errors.MedmoeError: bad image, question or option.
        """
        text = _TextStream(self.runtime.model_info.tokenizer) if on_text else None
        answer: Answer | None = None
        for ev in self._run(image, question, generation or GenerationConfig(), preprocess_mode, frame):
            if isinstance(ev, TokenEvent):
                if text and on_text:
                    piece = text.push(ev.token_id)
                    if piece:
                        on_text(piece)
            else:
                answer = ev
        assert answer is not None
        return answer

    def stream(self, image: ImageInput, question: str, **kwargs) -> Iterator[str]:
        """Yield the answer text piece by piece (same arguments as `answer`, except `on_text`)."""
        text = _TextStream(self.runtime.model_info.tokenizer)
        for ev in self._run(image, question, kwargs.pop("generation", None) or GenerationConfig(), kwargs.pop("preprocess_mode", PreprocessMode.PAD), kwargs.pop("frame", None)):
            if isinstance(ev, TokenEvent):
                piece = text.push(ev.token_id)
                if piece:
                    yield piece

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _TextStream:
    """Incremental detokenisation: emit only text that is final (no partial UTF-8 sequence)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        if not self.sent:
            text_l = text.lstrip()  # the answer is stripped (§5.4); don't stream leading spaces
            piece, self.sent = text_l, len(text)
            return piece
        piece, self.sent = text[self.sent :], len(text)
        return piece


def load(model: str | Path, *, runtime: str = "torch", options: RuntimeOptions | None = None) -> Pipeline:
    """Load `model` with the named runtime plugin.

    Args:
        model: a checkpoint directory or hub id (torch runtime), or an exported bundle.
        runtime: runtime plugin name (`medmoe-edge runtimes` lists them).
        options: device / dtype / threads / vision tower.
    Raises:
        medmoe_edge.errors.RuntimeUnavailable: unknown or unavailable runtime.
        medmoe_edge.errors.CheckpointError: the model cannot be loaded.
    """
    cls = get_runtime(runtime)
    return Pipeline(cls(model, options or RuntimeOptions()))


__all__ = ["Answer", "GenerationConfig", "Pipeline", "PreprocessMode", "RoutingReport", "RuntimeOptions", "Timings", "load"]
