"""The runtime contract: what every runtime plugin is, in the shape of Polygraphy's `BaseRunner`.

A runtime runs one kind of artifact (a checkpoint, an ONNX bundle, a GGUF bundle, a TensorRT
engine bundle). The public methods of `Runtime` validate and time, then call the subclass's
`_load` / `_prefill` / `_decode`; a subclass never re-checks what the base already did:

* `__init__(model, options)`: refuses options the runtime does not declare in its
  `capabilities`, parses `--device` and `--threads` once (`ResolvedOptions`), then `_load`.
* `prefill(requests, max_new_tokens)`: a non-empty batch within `capabilities.max_batch`,
  one image per `<image>` placeholder with the processor's shape, token ids inside the
  vocabulary, prompt + generation inside the context; then `_prefill`.
* `decode(tokens)`: after a prefill, one token per row, inside the vocabulary and the
  positions reserved by the prefill; then `_decode`.
* `generate(requests, cfg)`: the one generation loop of the code base (sampling, EOS,
  streaming, timings); every runtime, every command and every benchmark goes through it.

Runtimes are discovered through the `medmoe_edge.runtimes` entry-point group
(`medmoe_edge.runtimes.registry`); the built-in ones register exactly as a third-party
package would. Implementations live in `medmoe_edge.runtimes`; this module is core and
imports none of them.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .errors import InputError
from .generation import FinishReason, GenerationConfig, LoopTimings, RowResult, StepOutput, TokenEvent, sample
from .imaging import ImageProcessorSpec
from .model.medmoe import IMAGE_TOKEN_INDEX
from .spec import ModelSpec
from .tokenizer import Tokenizer
from .vocab import ArtifactKind, Device, DeviceKind, KvType, Precision


@dataclass(frozen=True)
class Availability:
    """Whether a runtime can run on this machine, with the reason (or the fix) when it cannot."""

    available: bool
    reason: str


# Names of the optional `RuntimeOptions` fields a runtime may declare in `Capabilities.options`.
DTYPE, PROVIDER, VISION_TOWER, THREADS, KV_TYPE = "dtype", "provider", "vision_tower", "num_threads", "kv_type"
_OPTION_FLAGS = {DTYPE: "--dtype", PROVIDER: "--provider", VISION_TOWER: "--vision-tower", THREADS: "--threads", KV_TYPE: "--kv-type"}


@dataclass(frozen=True)
class RuntimeOptions:
    """Options common to runtimes, as the user gave them. A runtime refuses an option it does not
    declare in `Capabilities.options`, instead of silently ignoring it.

    Attributes:
        device: "cpu", "cuda" or "cuda:N".
        dtype: compute precision, or None for the runtime's default.
        num_threads: CPU threads, or None for the runtime's default.
        vision_tower: CLIP directory overriding the checkpoint's `mm_image_tower`.
        provider: execution provider, for runtimes that have them (onnxruntime: cpu, cuda, tensorrt).
        kv_type: KV cache element type, for runtimes whose cache type is a choice (llamacpp).
    """

    device: str = "cpu"
    dtype: Precision | None = None
    num_threads: int | None = None
    vision_tower: Path | None = None
    provider: str | None = None
    kv_type: KvType | None = None


@dataclass(frozen=True)
class ResolvedOptions:
    """`RuntimeOptions` after the base class checked them: what `_load` receives."""

    device: Device
    dtype: Precision | None
    num_threads: int  # always set: the user's value, else `default_threads()`
    threads_given: bool  # whether the user chose the thread count
    vision_tower: Path | None
    provider: str | None
    kv_type: KvType | None = None  # None: the runtime's default


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Usable cores counted once per physical core (SMT siblings merged), from Linux's topology files."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return usable_cores()
    seen = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            seen.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return usable_cores()
    return max(1, len(seen))


def other_runnable() -> int:
    """Tasks other than this one that are runnable right now (the kernel's instantaneous count in
    /proc/loadavg, not the 1-minute average, which lags a load that just started)."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 0
    return max(0, running - 1)


THREAD_POLICIES = ("all", "all-1", "physical", "load-aware")


def choose_threads(policy: str) -> int:
    """CPU threads by policy: every usable core, one fewer, physical cores, or the usable cores
    minus the other runnable tasks (at least 1). benchmarks/threads_under_load.py compares them."""
    n = usable_cores()
    if policy == "all":
        return n
    if policy == "all-1":
        return max(1, n - 1)
    if policy == "physical":
        return physical_cores()
    if policy == "load-aware":
        return max(1, min(n, n - other_runnable()))
    raise InputError(f"thread policy {policy!r} is not one of {', '.join(THREAD_POLICIES)}")


# Measured by benchmarks/threads_under_load.py (docs/BENCHMARKS.md): on an idle machine load-aware
# is every core; with other work on the cores, spinning one thread per core waits for the slowest
# at every barrier, and fewer threads are several times faster (llama.cpp most of all).
DEFAULT_THREAD_POLICY = "load-aware"


def default_threads() -> int:
    """CPU threads a runtime uses when the user gives none (`DEFAULT_THREAD_POLICY`)."""
    return choose_threads(DEFAULT_THREAD_POLICY)


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can do, declared by the class (read by `runtimes`, `verify`, `compare`).

    Attributes:
        reports_routing: `StepOutput.experts` / `prompt_experts` are filled.
        max_batch: largest batch `prefill` takes (None: no limit of its own).
        devices: device kinds `--device` may name.
        precisions: compute precisions `--dtype` may name (empty: fixed by the artifact).
        options: which optional `RuntimeOptions` fields it takes (DTYPE, PROVIDER, VISION_TOWER, THREADS, KV_TYPE).
    """

    reports_routing: bool
    max_batch: int | None
    devices: tuple[DeviceKind, ...]
    precisions: tuple[Precision, ...] = ()
    options: frozenset[str] = frozenset({THREADS})


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime-independent front end needs to know about the loaded model."""

    spec: ModelSpec
    tokenizer: Tokenizer
    processor: ImageProcessorSpec
    label: str  # human-readable model name for output
    context_length: int  # positions available (prompt + generated)
    vocab_rows: int  # rows of the embedding / lm_head: valid token ids are 0..vocab_rows-1

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


@dataclass
class CallTimings:
    """Seconds spent inside the runtime's own calls, accumulated since load (for `bench`/`compare`)."""

    load_s: float = 0.0
    load_parts_s: dict[str, float] = field(default_factory=dict)  # where load_s went, when the runtime measures it (e.g. bundle check, weights, context)
    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)


StepObserver = Callable[[int, StepOutput], None]


class Runtime(ABC):
    """Base class of runtime plugins.

    Subclasses set the class attributes and implement `availability`, `model_info`, `_load`,
    `_prefill` and `_decode` (and `close` when they hold resources). No runtime has a loop of
    its own: every one goes through `generate`, so sampling, stopping, streaming and timing
    behave the same everywhere.
    """

    name: ClassVar[str]
    artifact_kind: ClassVar[ArtifactKind]
    description: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, model: str | Path, options: RuntimeOptions | None = None) -> None:
        self.options = self.resolve_options(options or RuntimeOptions())
        self.timings = CallTimings()
        self._rows = 0  # rows of the running batch (0: no prefill yet)
        self._positions_left = 0  # decode steps reserved by the last prefill
        t0 = time.perf_counter()
        self._load(model, self.options)
        self.timings.load_s = time.perf_counter() - t0

    # -- what subclasses implement ----------------------------------------------------------

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability:
        """Whether this runtime can run on this machine, with the reason when it cannot."""

    @abstractmethod
    def _load(self, model: str | Path, options: ResolvedOptions) -> None:
        """Load the artifact with options the base class has already checked."""

    @property
    @abstractmethod
    def model_info(self) -> ModelInfo:
        """Tokenizer, image settings and limits of the loaded model."""

    @abstractmethod
    def _prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        """Process validated prompts (a new sequence per request); return next-token logits per row."""

    @abstractmethod
    def _decode(self, tokens: torch.Tensor) -> StepOutput:
        """Feed one validated token per row [B] after the previous pass; return the next logits."""

    def settings(self) -> dict[str, str | int | float | bool]:
        """Choices made at load that decide speed, memory or fidelity (e.g. the KV cache type), for
        `run --json`; empty unless the runtime has such choices."""
        return {}

    def close(self) -> None:
        """Free the runtime's resources."""

    # -- the contract ----------------------------------------------------------------------

    @classmethod
    def resolve_options(cls, options: RuntimeOptions) -> ResolvedOptions:
        """Check `options` against `capabilities` and parse device and threads (once, for every runtime).

        Raises:
            InputError: an option this runtime does not take, a device kind it cannot use,
                a --dtype it cannot compute in, or a thread count below 1.
        """
        caps = cls.capabilities
        given = {DTYPE: options.dtype, PROVIDER: options.provider, VISION_TOWER: options.vision_tower, THREADS: options.num_threads, KV_TYPE: options.kv_type}
        for key, value in given.items():
            if value is not None and key not in caps.options:
                raise InputError(f"{_OPTION_FLAGS[key]} {_option_text(value)} does not apply to the {cls.name} runtime: {_option_hint(cls, key)}")
        device = Device.parse(options.device)
        if device.kind not in caps.devices:
            raise InputError(f"--device {device} is not supported by the {cls.name} runtime: use {' or '.join(d.value for d in caps.devices)}")
        if options.dtype is not None and caps.precisions and options.dtype not in caps.precisions:
            raise InputError(f"--dtype {_option_text(options.dtype)} is not supported by the {cls.name} runtime: use one of {', '.join(p.torch_name for p in caps.precisions)}")
        if options.num_threads is not None and options.num_threads < 1:
            raise InputError(f"--threads must be at least 1, got {options.num_threads}")
        threads = options.num_threads if options.num_threads is not None else default_threads()
        return ResolvedOptions(device, options.dtype, threads, options.num_threads is not None, options.vision_tower, options.provider, options.kv_type)

    def check_fits(self, requests: list[PreparedRequest], max_new_tokens: int) -> None:
        """Refuse prompts that cannot fit the model's context with `max_new_tokens` generated.

        Raises:
            InputError: naming the positions needed and what to change.
        """
        info = self.model_info
        for r in requests:
            need = r.spliced_length(info.spec.image_tokens) + max_new_tokens
            if need > info.context_length:
                raise InputError(
                    f"prompt ({r.spliced_length(info.spec.image_tokens)} positions incl. {info.spec.image_tokens} image rows) "
                    f"plus --max-new-tokens {max_new_tokens} needs {need} positions but the model has {info.context_length}: "
                    "shorten the question or lower --max-new-tokens"
                )

    def check_requests(self, requests: list[PreparedRequest], max_new_tokens: int) -> None:
        """Every check `prefill` makes before the runtime sees the batch.

        Raises:
            InputError: empty batch, batch over `capabilities.max_batch`, empty prompt, images
                that do not match the placeholders or the processor's shape, a token id outside
                the vocabulary, or a prompt that does not fit the context.
        """
        if not requests:
            raise InputError("prefill needs at least one request")
        cap = self.capabilities.max_batch
        if cap is not None and len(requests) > cap:
            raise InputError(f"the {self.name} runtime takes at most {cap} request(s) at a time, got a batch of {len(requests)}")
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        info = self.model_info
        hw = tuple(info.processor.crop_size)
        for r in requests:
            if not r.token_ids:
                raise InputError("empty prompt")
            n_img = sum(1 for t in r.token_ids if t == IMAGE_TOKEN_INDEX)
            if n_img != r.pixel_values.shape[0]:
                raise InputError(f"prompt has {n_img} <image> placeholders but {r.pixel_values.shape[0]} images were given")
            if n_img and tuple(r.pixel_values.shape[1:]) != (3, *hw):
                raise InputError(f"image tensor has shape {list(r.pixel_values.shape[1:])}, expected [3, {hw[0]}, {hw[1]}]")
            bad = [t for t in r.token_ids if t != IMAGE_TOKEN_INDEX and not 0 <= t < info.vocab_rows]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary of {info.vocab_rows}")
        self.check_fits(requests, max_new_tokens)

    def prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        """Validate the batch (`check_requests`), then process the prompts; returns next-token logits per row."""
        self.check_requests(requests, max_new_tokens)
        self._rows = self._positions_left = 0  # a prefill that fails leaves no sequence to decode
        t0 = time.perf_counter()
        out = self._prefill(requests, max_new_tokens)
        self.timings.prefill_s.append(time.perf_counter() - t0)
        self._rows, self._positions_left = len(requests), max_new_tokens
        return out

    def decode(self, tokens: torch.Tensor) -> StepOutput:
        """Feed one token per row [B] after the previous pass; returns the next logits.

        Raises:
            InputError: no prefill yet, a row count that is not the batch's, a token outside the
                vocabulary, or more steps than the prefill reserved.
        """
        if not self._rows:
            raise InputError("decode() called before prefill()")
        if tokens.dim() != 1 or tokens.shape[0] != self._rows:
            raise InputError(f"decode takes one token per row of the batch ({self._rows}), got shape {list(tokens.shape)}")
        vocab = self.model_info.vocab_rows
        if bool(((tokens < 0) | (tokens >= vocab)).any()):
            bad = int(tokens[(tokens < 0) | (tokens >= vocab)][0])
            raise InputError(f"token id {bad} is outside the vocabulary of {vocab}")
        if self._positions_left < 1:
            raise InputError("decode() past the positions reserved by prefill(max_new_tokens): prefill with a larger --max-new-tokens")
        self._positions_left -= 1
        t0 = time.perf_counter()
        out = self._decode(tokens)
        self.timings.decode_s.append(time.perf_counter() - t0)
        return out

    def generate(
        self,
        requests: list[PreparedRequest],
        cfg: GenerationConfig,
        timings: LoopTimings | None = None,
        on_step: StepObserver | None = None,
    ) -> Iterator[TokenEvent | list[RowResult]]:
        """Generate for a batch: yields each TokenEvent as it is produced, then the list of RowResults.

        The one generation loop of medmoe-edge. Rows that reach EOS stop producing events; the
        batch continues while any row is unfinished (finished rows are fed EOS, which cannot
        change other rows: every row attends only to its own slots).

        Args:
            timings: filled with time to first token and decode time.
            on_step: called with (step, StepOutput) for every forward pass, before sampling
                (reference traces record logits and routing through it).
        Raises:
            InputError: the batch fails `check_requests`.
        """
        self.check_requests(requests, cfg.max_new_tokens)  # before the generator starts: errors surface at the call
        return self._loop(requests, cfg, timings if timings is not None else LoopTimings(), on_step)

    def _loop(self, requests: list[PreparedRequest], cfg: GenerationConfig, timings: LoopTimings, on_step: StepObserver | None) -> Iterator[TokenEvent | list[RowResult]]:
        gen = torch.Generator().manual_seed(cfg.seed)
        eos = self.model_info.eos_id
        b = len(requests)
        t0 = time.perf_counter()
        out = self.prefill(requests, cfg.max_new_tokens)
        results = [RowResult([], FinishReason.LENGTH, [], (out.prompt_routing or [{}] * b)[i]) for i in range(b)]
        done = [False] * b
        t1 = t0
        for step in range(cfg.max_new_tokens):
            if on_step is not None:
                on_step(step, out)
            tok = sample(out.logits, cfg, gen)
            if step == 0:
                timings.prefill_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            for i in range(b):
                if done[i]:
                    tok[i] = eos
                    continue
                experts = {layer: e[i].tolist() for layer, e in out.experts.items()}
                tid = int(tok[i])
                if tid == eos:
                    done[i] = True
                    results[i].finish_reason = FinishReason.EOS
                    continue
                results[i].token_ids.append(tid)
                results[i].routing.append(experts)
                yield TokenEvent(i, step, tid, experts)
            if all(done) or step == cfg.max_new_tokens - 1:
                break
            out = self.decode(tok)
            timings.decode_steps += 1
        timings.decode_s = time.perf_counter() - t1
        yield results

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _option_text(value: object) -> str:
    """An option's value as the user spelled it on the command line."""
    if isinstance(value, Precision):
        return value.torch_name if value.is_float else value.value
    if isinstance(value, KvType):
        return value.value
    return str(value)


def _option_hint(cls: type[Runtime], key: str) -> str:
    if key == PROVIDER:
        return "--provider is an option of the onnxruntime runtime"
    if key == VISION_TOWER:
        return "the tower is exported into the bundle; pass --vision-tower to `medmoe-edge export`"
    if key == DTYPE:
        return "the precision is the bundle's; export a bundle with another precision"
    if key == KV_TYPE:
        return "--kv-type is an option of the llamacpp runtime"
    return "drop the option"


def greedy_tokens(runtime: Runtime, request: PreparedRequest, max_new_tokens: int) -> list[int]:
    """The runtime's own greedy answer tokens for one request (through `Runtime.generate`)."""
    result: list[RowResult] = []
    for ev in runtime.generate([request], GenerationConfig(max_new_tokens=max_new_tokens)):
        if isinstance(ev, list):
            result = ev
    return result[0].token_ids


__all__ = [
    "Availability",
    "Capabilities",
    "ModelInfo",
    "PreparedRequest",
    "ResolvedOptions",
    "Runtime",
    "RuntimeOptions",
    "default_threads",
    "greedy_tokens",
    "prompt_routing_counts",
    "token_kinds",
]
