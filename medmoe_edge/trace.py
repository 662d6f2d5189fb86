"""A recorded reference trace: the PyTorch reference's behaviour on a set of questions, saved once.

`record` runs a runtime (the reference) greedily over prepared requests and keeps, per
question, everything a fidelity check compares against (llm.c's `write_state` idea):

* the prepared inputs: prompt ids (with IMAGE_TOKEN_INDEX placeholders) and the preprocessed
  pixels, so the trace replays without the images, the checkpoint or the preprocessing code;
* the reference's argmax at every forward pass (prefill, then one decode step per generated
  token, the step that predicts EOS included) and its answer text;
* per-step logits: the full rows in fp32 when the whole trace stays under `FULL_LOGITS_BYTES`
  (the demo model), else the top-`TOPK` values and indices of every step;
* routing: the experts of every prompt position and of every decode step, per MoE layer.

A trace is two files, `<stem>.safetensors` (tensors) and `<stem>.json` (header and per-item
facts), both written atomically; loading goes through safetensors only (no pickle). Bundles
embed a small one (`trace.safetensors` / `trace.json`), so `verify BUNDLE` works on a device
that has no room for, or no copy of, the reference checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import CheckpointError
from .generation import GenerationConfig, StepOutput
from .imaging import PreprocessMode
from .runtime_contract import PreparedRequest, Runtime

TRACE_VERSION = 1
TRACE_STEM = "trace"  # the embedded trace's files inside a bundle
TOPK = 64
FULL_LOGITS_BYTES = 64 << 20


@dataclass(frozen=True)
class TraceHeader:
    """What a trace was recorded from and how.

    Attributes:
        source_sha256: hash of the reference checkpoint (as in a bundle manifest's `source`).
        label: the reference model's name.
        max_new_tokens: generation bound of every item.
        preprocess: image preprocessing mode the pixels were made with.
        set_name: the data set the questions came from (a split name or a manifest path).
        full_logits: whether every step's full logits row is stored (else top-`topk`).
        vocab_rows: logits row length.
        eos_id: the reference tokenizer's EOS.
        num_threads: CPU threads the reference computed with (fp32 sums follow the thread count,
            so a bit-exact replay uses the same; None in traces from before it was recorded).
    """

    source_sha256: str
    label: str
    max_new_tokens: int
    preprocess: str
    set_name: str
    full_logits: bool
    topk: int
    vocab_rows: int
    eos_id: int
    num_threads: int | None = None
    tool: str = __version__
    version: int = TRACE_VERSION


@dataclass
class TraceItem:
    """One question of a trace (tensors in `tensors`, keyed without the item prefix).

    Attributes:
        id: the question's id in its set.
        question: the question text (never any DICOM header field).
        token_ids: prompt ids with IMAGE_TOKEN_INDEX where images are spliced.
        argmax: the reference's argmax at each forward pass; its length is the number of steps.
        answer: the reference's greedy answer text.
        meta: facts of the set (domain, answer type, ground truth) for reports.
        tensors: "pixel_values" [N, 3, S, S]; "logits" [steps, V] or "topk_values"/"topk_indices"
            [steps, K]; "prompt_experts.<layer>" [L, k]; "step_experts.<layer>" [steps - 1, k].
    """

    id: str
    question: str
    token_ids: list[int]
    argmax: list[int]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.argmax)

    @property
    def request(self) -> PreparedRequest:
        return PreparedRequest(list(self.token_ids), self.tensors["pixel_values"])

    def experts(self, kind: str) -> dict[int, torch.Tensor]:
        """{MoE layer: experts} of the prompt ("prompt_experts") or of the decode steps ("step_experts")."""
        prefix = kind + "."
        return {int(k[len(prefix) :]): v for k, v in self.tensors.items() if k.startswith(prefix)}


@dataclass
class Trace:
    header: TraceHeader
    items: list[TraceItem]

    def save(self, directory: Path, stem: str = TRACE_STEM) -> list[Path]:
        """Write `<stem>.safetensors` and `<stem>.json` into `directory` (each atomically); returns the paths."""
        from safetensors.torch import save_file

        tensors = {f"{i}/{k}": v.contiguous() for i, item in enumerate(self.items) for k, v in item.tensors.items()}
        meta = {"header": asdict(self.header), "items": [{k: v for k, v in asdict(it).items() if k != "tensors"} for it in self.items]}
        st, js = directory / f"{stem}.safetensors", directory / f"{stem}.json"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{st.name}.")
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, st)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{js.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        os.replace(tmp, js)
        return [st, js]

    @classmethod
    def load(cls, directory: Path, stem: str = TRACE_STEM) -> Trace:
        """Read a trace written by `save`.

        Raises:
            CheckpointError: missing, corrupt, or of another version (naming the fix).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        st, js = Path(directory) / f"{stem}.safetensors", Path(directory) / f"{stem}.json"
        if not (st.is_file() and js.is_file()):
            raise CheckpointError(f"no reference trace {stem}.json/.safetensors in {directory}: record one with `medmoe-edge trace` or pass --reference CKPT")
        try:
            meta = json.loads(js.read_text())
            header = TraceHeader(**meta["header"])
            if header.version != TRACE_VERSION:
                raise CheckpointError(f"{js} is trace version {header.version}; this medmoe-edge reads version {TRACE_VERSION}: record it again")
            flat = load_file(str(st))
            items = []
            for i, d in enumerate(meta["items"]):
                prefix = f"{i}/"
                items.append(TraceItem(**d, tensors={k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:
            raise CheckpointError(f"reference trace {st.name} in {directory} is corrupt ({type(e).__name__}: {e}): record it again") from None
        for it in items:
            if "pixel_values" not in it.tensors or ("logits" not in it.tensors and "topk_values" not in it.tensors):
                raise CheckpointError(f"reference trace {js} item {it.id} lacks its pixels or logits: record it again")
        return cls(header, items)


@dataclass(frozen=True)
class TraceQuestion:
    """A prepared question to record: id, text, prepared request and set facts for reports."""

    id: str
    question: str
    request: PreparedRequest
    meta: dict[str, Any] = field(default_factory=dict)


def trace_questions(pipe: Any, samples: Sequence, root: Path, preprocess: PreprocessMode) -> list[TraceQuestion]:
    """Set samples (images relative to `root`) prepared into traceable questions by `pipe` (an
    `api.Pipeline`, or anything with its `prepare`), each with its domain, answer type and answer."""
    out = []
    for s in samples:
        req, _ = pipe.prepare(root / s.image, s.question, preprocess_mode=preprocess)
        domain = s.domain.value if hasattr(s.domain, "value") else str(s.domain)
        out.append(TraceQuestion(s.id, s.question, req, {"domain": domain, "answer_type": s.answer_type, "ground_truth": s.answer}))
    return out


def record(
    reference: Runtime,
    questions: Sequence[TraceQuestion],
    *,
    source_sha256: str,
    max_new_tokens: int,
    preprocess: str,
    set_name: str,
    full_logits: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Trace:
    """Run `reference` greedily over `questions` (through `Runtime.generate`) and record the trace.

    Args:
        full_logits: keep every step's whole logits row; None chooses by size (`FULL_LOGITS_BYTES`).
    """
    info = reference.model_info
    vocab = info.vocab_rows
    if full_logits is None:
        full_logits = len(questions) * max_new_tokens * vocab * 4 <= FULL_LOGITS_BYTES
    header = TraceHeader(source_sha256, info.label, max_new_tokens, preprocess, set_name, full_logits, TOPK, vocab, info.eos_id, reference.options.num_threads)
    items: list[TraceItem] = []
    for n, q in enumerate(questions):
        steps: list[StepOutput] = []
        result = None
        for ev in reference.generate([q.request], GenerationConfig(max_new_tokens=max_new_tokens), on_step=lambda _s, out: steps.append(out)):
            if isinstance(ev, list):
                result = ev[0]
        assert result is not None
        logits = torch.stack([s.logits[0].float() for s in steps])
        tensors: dict[str, torch.Tensor] = {"pixel_values": q.request.pixel_values.float().contiguous()}
        if full_logits:
            tensors["logits"] = logits
        else:
            k = min(TOPK, vocab)
            top = logits.topk(k, dim=-1)
            tensors["topk_values"], tensors["topk_indices"] = top.values, top.indices
        length = q.request.spliced_length(info.spec.image_tokens)
        for layer, e in (steps[0].prompt_experts or {}).items():
            tensors[f"prompt_experts.{layer}"] = e[0, :length].to(torch.int64)
        if len(steps) > 1:
            for layer in steps[1].experts:
                tensors[f"step_experts.{layer}"] = torch.stack([s.experts[layer][0] for s in steps[1:]]).to(torch.int64)
        answer = info.tokenizer.decode(result.token_ids).strip()  # §5.4
        items.append(TraceItem(q.id, q.question, list(q.request.token_ids), logits.argmax(-1).tolist(), answer, dict(q.meta), tensors))
        if progress:
            progress(n + 1, len(questions))
    return Trace(header, items)


__all__ = ["TOPK", "TRACE_STEM", "Trace", "TraceHeader", "TraceItem", "TraceQuestion", "record", "trace_questions"]
