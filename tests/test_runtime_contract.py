"""The runtime contract (`medmoe_edge.runtime_contract.Runtime`), one suite for every registered runtime.

Each scenario runs on every runtime the `medmoe_edge.runtimes` entry-point group lists and that is
available here (torch on checkpoints, onnxruntime on fp32 ONNX bundles, llamacpp on F32 GGUF
bundles; a new runtime joins by registering and naming its tolerances in FIDELITY), against the
PyTorch reference on the two tiny random checkpoints and the built-in demo model:

* capabilities are declared and hold (routing reported iff StepOutput.experts is filled, the
  batch limit, devices, precisions, options) and no runtime overrides the public contract;
* the greedy answer through `Runtime.generate` equals the reference's (per-step logits within
  the runtime's tolerance), batched with right padding where the runtime batches;
* a KV-cache decode step equals a fresh prefill of the longer prompt;
* every validation error is raised by the base class before the runtime's own `_load`,
  `_prefill` or `_decode` runs;
* timings (load, one entry per prefill and decode call), the `on_step` observer (one call per
  forward pass) and `close()` as a context manager.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

from medmoe_edge import api, runtime_contract
from medmoe_edge.errors import InputError
from medmoe_edge.generation import GenerationConfig, LoopTimings, RowResult, StepOutput
from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX
from medmoe_edge.presets import Preset
from medmoe_edge.runtime_contract import DTYPE, KV_TYPE, PROVIDER, THREADS, VISION_TOWER, Capabilities, PreparedRequest, ResolvedOptions, Runtime, RuntimeOptions, greedy_tokens
from medmoe_edge.runtimes.registry import discover
from medmoe_edge.runtimes.torch_runtime import TorchRuntime
from medmoe_edge.vocab import ArtifactKind, Device, DeviceKind, KvType, Precision

MODELS = ["tiny-phi", "tiny-stablelm", "demo"]
TEXT_IDS = [[11, 42, 7, 300, 5, 99, 123, 64, 201, 17, 3, 250], [5, 17, 230, 8, 8, 61, 140]]  # text-only prompts, valid in every vocabulary here
QUESTIONS = ["Is there a lesion?", "Which organ is shown in this image, and what is abnormal about it?"]  # two lengths: right padding in a batch
NEW_TOKENS = 16  # greedy steps compared (test_gguf compared 16 on the tiny checkpoints)


@dataclass(frozen=True)
class Fidelity:
    """How closely a runtime follows the PyTorch reference on its fp32 / F32 artifact.

    Attributes:
        text_logits: max |Δ logits| per greedy step on text-only prompts (None: tokens only).
        image_logits: the same on prompts with an image (None: tokens only).
        image_tokens_on_tiny: image prompts give the reference's tokens on the random tiny
            checkpoints too (their logit gaps are small); else images are compared on the demo only.
        routing: the experts of every prompt position and generated token equal the reference's.
        kv_cache: max |Δ logits| between a KV-cache decode step and a fresh prefill of the longer prompt.
        options: how the shared instance is loaded for these bounds (llamacpp: an F32 KV cache, the
            exact one; its f16 default is checked against F32 in tests/test_llamacpp_kv.py).
    """

    text_logits: float | None
    image_logits: float | None
    image_tokens_on_tiny: bool
    routing: bool
    kv_cache: float
    options: RuntimeOptions = RuntimeOptions()


# Measured on these models (CPU): onnxruntime ≤ 1e-5 and llamacpp ≤ 1e-3 per step, KV cache ≤ 3e-6 for both.
FIDELITY = {
    "torch": Fidelity(0.0, 0.0, True, True, 1e-4),
    # fp32 graphs with the reference's expert-sparse dispatch: logits within 1e-4, routing identical
    "onnxruntime": Fidelity(1e-4, 1e-4, True, True, 1e-4),
    # F32 GGUF with an F32 KV cache: ggml's GELU goes through an fp16 table (≤ 2e-3 on text); the
    # patched mtmd projector computes erf GELU, but the CLIP tower's own GELU is the same fp16
    # table, so image prompts keep a slightly looser bound
    "llamacpp": Fidelity(2e-3, 5e-3, True, False, 1e-4, RuntimeOptions(kv_type=KvType.F32)),
}
UNKNOWN = Fidelity(None, None, False, False, 1e-2)  # a third-party runtime with no entry above: tokens on the demo only
RUNTIMES = sorted(discover())
OPTION_VALUES = {DTYPE: Precision.FP16, PROVIDER: "cuda", VISION_TOWER: Path("clip-vision"), THREADS: 2, KV_TYPE: KvType.F16}
OPTION_FLAGS = {DTYPE: "--dtype", PROVIDER: "--provider", VISION_TOWER: "--vision-tower", THREADS: "--threads", KV_TYPE: "--kv-type"}


# ---- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sources(tiny_ckpts) -> dict[str, object]:
    return {"tiny-phi": tiny_ckpts[Preset.TINY_PHI], "tiny-stablelm": tiny_ckpts[Preset.TINY_STABLELM], "demo": "demo"}


def exporter_for(cls: type[Runtime]) -> str | None:
    """The --format whose bundles `cls` loads: the exporter naming it, else the one of its artifact kind (None: none installed)."""
    from medmoe_edge.exporter import registered

    exporters = registered()
    named = [name for name, e in exporters.items() if e.runtime == cls.name]
    return next(iter(named), None) or next((name for name, e in exporters.items() if e.artifact_kind is cls.artifact_kind and e.runtime is None), None)


@pytest.fixture(scope="session")
def artifacts(sources, tmp_path_factory):
    """artifact(runtime class, model) -> what that runtime loads (bundles exported once per session, default fp32 / F32)."""
    from medmoe_edge.workflows import export_bundle

    root = tmp_path_factory.mktemp("contract")
    cache: dict[tuple[str, str], object] = {}

    def artifact(cls: type[Runtime], model: str):
        if cls.artifact_kind is ArtifactKind.CHECKPOINT:
            return sources[model]
        fmt = exporter_for(cls)
        assert fmt is not None
        if (fmt, model) not in cache:
            out = root / f"{fmt}-{model}"
            manifest = export_bundle(fmt, sources[model], out, trace_questions=0)
            assert manifest.precision is Precision.FP32, "the contract suite compares full-precision artifacts"
            cache[fmt, model] = out
        return cache[fmt, model]

    return artifact


@pytest.fixture(scope="session")
def references(sources):
    """model -> the PyTorch reference runtime (loaded once)."""
    cache: dict[str, TorchRuntime] = {}

    def reference(model: str) -> TorchRuntime:
        if model not in cache:
            cache[model] = TorchRuntime(sources[model])
        return cache[model]

    return reference


@pytest.fixture(params=RUNTIMES)
def runtime_cls(request) -> type[Runtime]:
    entry = discover()[request.param]
    av = entry.availability()
    if not av.available or entry.cls is None:
        pytest.skip(f"runtime {request.param} is not available here: {av.reason}")
    cls = entry.cls
    # the scenarios run on the CPU; a GPU-only runtime (tensorrt) runs them only where torch sees a GPU
    if DeviceKind.CPU not in cls.capabilities.devices and not torch.cuda.is_available():
        pytest.skip(f"runtime {request.param} runs on a GPU only and there is none here")
    if cls.artifact_kind is not ArtifactKind.CHECKPOINT and exporter_for(cls) is None:
        pytest.skip(f"no installed exporter writes {cls.artifact_kind.value} artifacts for runtime {request.param}")
    return cls


@pytest.fixture(scope="session")
def loaded(artifacts):
    """(runtime class, model) -> one shared instance (scenarios that need a fresh one construct it)."""
    cache: dict[tuple[str, str], Runtime] = {}

    def get(cls: type[Runtime], model: str) -> Runtime:
        if (cls.name, model) not in cache:
            cache[cls.name, model] = cls(artifacts(cls, model), fidelity(cls).options)
        return cache[cls.name, model]

    yield get
    for rt in cache.values():
        rt.close()


def fidelity(cls: type[Runtime]) -> Fidelity:
    return FIDELITY.get(cls.name, UNKNOWN)


def text_request(rt: Runtime, ids: list[int]) -> PreparedRequest:
    size = rt.model_info.processor.crop_size
    return PreparedRequest(token_ids=list(ids), pixel_values=torch.zeros(0, 3, *size))


def image_requests(rt: Runtime, image: Path) -> list[PreparedRequest]:
    pipe = api.Pipeline(rt)
    return [pipe.prepare(image, q)[0] for q in QUESTIONS]


def run(rt: Runtime, requests: list[PreparedRequest], max_new_tokens: int = NEW_TOKENS) -> tuple[list[RowResult], list[StepOutput]]:
    """Greedy generation through `Runtime.generate`: the rows' results and every forward pass's output."""
    steps: list[StepOutput] = []
    results: list[RowResult] = []
    for ev in rt.generate(requests, GenerationConfig(max_new_tokens=max_new_tokens), on_step=lambda _i, out: steps.append(out)):
        if isinstance(ev, list):
            results = ev
    return results, steps


def max_logit_gap(a: list[StepOutput], b: list[StepOutput]) -> float:
    assert len(a) == len(b)
    return max(float((x.logits - y.logits).abs().max()) for x, y in zip(a, b))


class Spy:
    """Stands in for `_load` / `_prefill` / `_decode`: records calls and runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)


# ---- capabilities ----------------------------------------------------------------------


def test_capabilities_are_declared_and_the_contract_is_not_overridden(runtime_cls):
    caps = runtime_cls.capabilities
    assert isinstance(caps, Capabilities)
    assert isinstance(runtime_cls.name, str) and runtime_cls.name and isinstance(runtime_cls.artifact_kind, ArtifactKind) and runtime_cls.description
    assert caps.max_batch is None or caps.max_batch >= 1
    assert DeviceKind.CPU in caps.devices and all(isinstance(d, DeviceKind) for d in caps.devices)
    assert caps.options <= set(OPTION_VALUES)
    assert THREADS in caps.options  # every runtime here computes on CPU threads
    # precisions are declared exactly when --dtype is taken, and are compute (floating-point) types
    assert bool(caps.precisions) == (DTYPE in caps.options)
    assert all(p.is_float for p in caps.precisions)
    # one loop, one set of checks: a runtime implements only the underscore methods
    for name in ("__init__", "prefill", "decode", "generate", "_loop", "check_requests", "check_fits", "resolve_options"):
        owner = next(c for c in runtime_cls.__mro__ if name in vars(c))
        assert owner is Runtime, f"{owner.__name__} overrides Runtime.{name}"


@pytest.mark.parametrize("model", MODELS)
def test_routing_is_reported_iff_declared(runtime_cls, model, loaded, sample_png):
    rt = loaded(runtime_cls, model)
    req = image_requests(rt, sample_png)[0]
    first = rt.prefill([req], 2)
    then = rt.decode(first.logits.argmax(-1))
    moe_layers = set(rt.model_info.spec.moe.layers)
    if runtime_cls.capabilities.reports_routing:
        k, n_experts = rt.model_info.spec.moe.top_k, rt.model_info.spec.moe.num_experts
        for out in (first, then):
            assert set(out.experts) == moe_layers and all(e.shape == (1, k) for e in out.experts.values())
        assert first.prompt_routing is not None and set(first.prompt_routing[0]) == moe_layers
        n_img = rt.model_info.spec.image_tokens
        for counts in first.prompt_routing[0].values():
            assert len(counts["image"]) == n_experts and sum(counts["image"]) == n_img
            assert sum(counts["text"]) == req.spliced_length(n_img) - n_img
        assert set(first.prompt_experts) == moe_layers
    else:
        assert first.experts == {} and then.experts == {}
        assert first.prompt_routing is None and not first.prompt_experts
    assert first.logits.shape == then.logits.shape == (1, rt.model_info.vocab_rows) and first.logits.dtype == torch.float32


# ---- fidelity against the reference ------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_greedy_answer_equals_the_reference(runtime_cls, model, loaded, references, sample_png, monkeypatch):
    """Greedy tokens through Runtime.generate, one prompt at a time: text-only prompts everywhere,
    image prompts on the demo (and on the tiny checkpoints where the runtime's fidelity allows)."""
    rt, ref, fid = loaded(runtime_cls, model), references(model), fidelity(runtime_cls)
    cases = [(text_request(rt, ids), fid.text_logits) for ids in TEXT_IDS]
    if model == "demo" or fid.image_tokens_on_tiny:
        cases += [(r, fid.image_logits) for r in image_requests(rt, sample_png)]
    for req, _tol in cases:  # with EOS: the answer the runtime gives (the demo stops after a few tokens)
        assert greedy_tokens(rt, req, NEW_TOKENS) == greedy_tokens(ref, req, NEW_TOKENS)
    for tok in {id(ref.model_info.tokenizer): ref.model_info.tokenizer, id(rt.model_info.tokenizer): rt.model_info.tokenizer}.values():
        monkeypatch.setattr(tok, "eos_id", -1)  # then without: every step is compared
    compared = 0
    for req, tol in cases:
        want, want_steps = run(ref, [req])
        got, got_steps = run(rt, [req])
        assert len(want[0].token_ids) == NEW_TOKENS and got[0].token_ids == want[0].token_ids
        if tol is not None:
            assert max_logit_gap(got_steps, want_steps) <= tol
        if fid.routing:
            assert got[0].routing == want[0].routing and got[0].prompt_routing == want[0].prompt_routing
            for layer, experts in want_steps[0].prompt_experts.items():
                assert torch.equal(got_steps[0].prompt_experts[layer], experts)
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("model", MODELS)
def test_batched_generation_with_padding_equals_the_reference(runtime_cls, model, loaded, references, sample_png):
    """Two prompts of different lengths in one batch (right padding, per-row positions)."""
    cap = runtime_cls.capabilities.max_batch
    if cap is not None and cap < 2:
        pytest.skip(f"the {runtime_cls.name} runtime takes {cap} request at a time")
    rt, ref, fid = loaded(runtime_cls, model), references(model), fidelity(runtime_cls)
    reqs = image_requests(rt, sample_png)
    want, want_steps = run(ref, reqs)
    got, got_steps = run(rt, reqs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    if fid.image_logits is not None:
        assert max_logit_gap(got_steps, want_steps) <= fid.image_logits
    if fid.routing:
        assert [r.routing for r in got] == [r.routing for r in want] and [r.prompt_routing for r in got] == [r.prompt_routing for r in want]
    # each row of the batch answers as it does alone
    assert [r.token_ids for r in got] == [run(rt, [r])[0][0].token_ids for r in reqs]


@pytest.mark.parametrize("model", MODELS)
def test_kv_cache_decode_equals_a_fresh_prefill(runtime_cls, model, loaded, sample_png):
    rt = loaded(runtime_cls, model)
    tol = fidelity(runtime_cls).kv_cache
    for req in (text_request(rt, TEXT_IDS[0]), image_requests(rt, sample_png)[0]):
        tok = rt.prefill([req], 4).logits.argmax(-1)
        step = rt.decode(tok)
        longer = PreparedRequest(token_ids=[*req.token_ids, int(tok[0])], pixel_values=req.pixel_values)
        fresh = rt.prefill([longer], 4)
        assert float((step.logits - fresh.logits).abs().max()) <= tol
        assert torch.equal(step.logits.argmax(-1), fresh.logits.argmax(-1))
        if runtime_cls.capabilities.reports_routing:
            assert all(torch.equal(step.experts[layer], fresh.experts[layer]) for layer in step.experts)


# ---- validation happens in the base, before the runtime runs -------------------------------


@pytest.fixture
def guarded(runtime_cls, loaded, monkeypatch):
    """The tiny-phi instance with `_prefill` and `_decode` replaced by spies."""
    rt = loaded(runtime_cls, "tiny-phi")
    spies = {"_prefill": Spy(), "_decode": Spy()}
    for name, spy in spies.items():
        monkeypatch.setattr(rt, name, spy)
    yield rt, spies
    assert not spies["_prefill"].calls and not spies["_decode"].calls, "the runtime ran on input the base should have refused"


def _bad_requests(rt: Runtime, image: Path) -> list[tuple[str, list[PreparedRequest], int, str]]:
    info = rt.model_info
    good = image_requests(rt, image)[0]
    s = info.processor.crop_size
    cases = [
        ("empty batch", [], 4, "prefill needs at least one request"),
        ("empty prompt", [PreparedRequest([], torch.zeros(0, 3, *s))], 4, "empty prompt"),
        ("placeholder without image", [PreparedRequest(good.token_ids, torch.zeros(0, 3, *s))], 4, "prompt has 1 <image> placeholders but 0 images were given"),
        ("image without placeholder", [PreparedRequest([t for t in good.token_ids if t != IMAGE_TOKEN_INDEX], good.pixel_values)], 4, "prompt has 0 <image> placeholders but 1 images were given"),
        ("wrong image shape", [PreparedRequest(good.token_ids, torch.zeros(1, 3, s[0] + 1, s[1]))], 4, rf"image tensor has shape \[3, {s[0] + 1}, {s[1]}\], expected \[3, {s[0]}, {s[1]}\]"),
        ("grey image", [PreparedRequest(good.token_ids, torch.zeros(1, 1, *s))], 4, "image tensor has shape"),
        ("token past the vocabulary", [PreparedRequest([*good.token_ids, info.vocab_rows], good.pixel_values)], 4, f"token id {info.vocab_rows} is outside the vocabulary of {info.vocab_rows}"),
        ("negative token", [PreparedRequest([-5, *good.token_ids], good.pixel_values)], 4, f"token id -5 is outside the vocabulary of {info.vocab_rows}"),
        ("no new tokens", [good], 0, "--max-new-tokens must be at least 1, got 0"),
        ("too long for the context", [good], info.context_length, rf"needs {good.spliced_length(info.spec.image_tokens) + info.context_length} positions but the model has {info.context_length}: shorten the question or lower --max-new-tokens"),
    ]
    cap = rt.capabilities.max_batch
    if cap is not None:
        cases.append(("batch over max_batch", [good] * (cap + 1), 4, rf"the {rt.name} runtime takes at most {cap} request\(s\) at a time, got a batch of {cap + 1}"))
    return cases


def test_prefill_and_generate_refuse_bad_batches_before_the_runtime_runs(guarded, sample_png):
    rt, _spies = guarded
    cases = _bad_requests(rt, sample_png)
    timed = len(rt.timings.prefill_s)
    for what, reqs, max_new, msg in cases:
        with pytest.raises(InputError, match=msg):
            rt.prefill(reqs, max_new)
        if max_new >= 1:  # GenerationConfig refuses 0 itself
            with pytest.raises(InputError, match=msg):
                rt.generate(reqs, GenerationConfig(max_new_tokens=max_new))  # at the call, before the first event
        assert len(rt.timings.prefill_s) == timed, f"{what}: a refused prefill was timed"
    assert len(cases) >= 10


def test_decode_is_refused_before_the_runtime_runs(runtime_cls, artifacts, monkeypatch, sample_png):
    rt = runtime_cls(artifacts(runtime_cls, "tiny-phi"))
    try:
        spy = Spy()
        monkeypatch.setattr(rt, "_decode", spy)
        vocab = rt.model_info.vocab_rows
        with pytest.raises(InputError, match=r"decode\(\) called before prefill\(\)"):
            rt.decode(torch.tensor([1]))
        rt.prefill([image_requests(rt, sample_png)[0]], 2)
        for tokens, msg in (
            (torch.tensor([1, 2]), r"decode takes one token per row of the batch \(1\), got shape \[2\]"),
            (torch.tensor([[1]]), r"decode takes one token per row of the batch \(1\), got shape \[1, 1\]"),
            (torch.tensor([vocab]), f"token id {vocab} is outside the vocabulary of {vocab}"),
            (torch.tensor([-1]), f"token id -1 is outside the vocabulary of {vocab}"),
        ):
            with pytest.raises(InputError, match=msg):
                rt.decode(tokens)
        assert not spy.calls
        rt.decode(torch.tensor([1]))
        rt.decode(torch.tensor([1]))  # the two positions prefill(max_new_tokens=2) reserved
        assert len(spy.calls) == 2
        with pytest.raises(InputError, match=r"decode\(\) past the positions reserved by prefill\(max_new_tokens\)"):
            rt.decode(torch.tensor([1]))
        assert len(spy.calls) == 2 and len(rt.timings.decode_s) == 2

        def failing_prefill(*_args):
            raise RuntimeError("boom")

        # a prefill the runtime fails leaves no sequence to decode
        monkeypatch.setattr(rt, "_prefill", failing_prefill)
        with pytest.raises(RuntimeError, match="boom"):
            rt.prefill([image_requests(rt, sample_png)[0]], 2)
        with pytest.raises(InputError, match=r"decode\(\) called before prefill\(\)"):
            rt.decode(torch.tensor([1]))
    finally:
        rt.close()


def test_options_are_checked_and_parsed_once_before_load(runtime_cls, artifacts, monkeypatch):
    spy = Spy()
    monkeypatch.setattr(runtime_cls, "_load", spy)
    artifact = artifacts(runtime_cls, "tiny-phi")
    caps = runtime_cls.capabilities
    refused = [key for key in OPTION_VALUES if key not in caps.options]
    for key in refused:
        with pytest.raises(InputError, match=f"{OPTION_FLAGS[key]} .*does not apply to the {runtime_cls.name} runtime"):
            runtime_cls(artifact, RuntimeOptions(**{key: OPTION_VALUES[key]}))
    bad = [
        (RuntimeOptions(device="tpu"), r"--device 'tpu' is not a device: use cpu, cuda or cuda:N"),
        (RuntimeOptions(device="cuda:x"), r"--device 'cuda:x' is not a device"),
        (RuntimeOptions(device="cpu:1"), r"--device 'cpu:1' is not a device"),
        (RuntimeOptions(num_threads=0), "--threads must be at least 1, got 0"),
        (RuntimeOptions(num_threads=-3), "--threads must be at least 1, got -3"),
    ]
    if DTYPE in caps.options:
        other = next(p for p in Precision if p not in caps.precisions)
        spelled = other.torch_name if other.is_float else other.value
        bad.append((RuntimeOptions(dtype=other), f"--dtype {spelled} is not supported by the {runtime_cls.name} runtime"))
    for options, msg in bad:
        with pytest.raises(InputError, match=msg):
            runtime_cls(artifact, options)
    assert not spy.calls, "_load ran with options the base should have refused"
    # accepted options reach _load parsed: a Device, and a thread count that is always set
    runtime_cls(artifact, RuntimeOptions(device="CPU", num_threads=3))
    monkeypatch.setattr(runtime_contract, "default_threads", lambda: 5)  # whatever the thread policy decides, once, in the base
    runtime_cls(artifact)
    (_, given), (_, default) = spy.calls
    assert isinstance(given, ResolvedOptions) and given.device == Device(DeviceKind.CPU) and given.num_threads == 3 and given.threads_given
    assert default.num_threads == 5 and not default.threads_given
    if DeviceKind.CUDA in caps.devices:  # parsing only: whether a GPU is there is the runtime's to check in _load
        assert runtime_cls.resolve_options(RuntimeOptions(device="cuda:1")).device == Device(DeviceKind.CUDA, 1)
    assert {f.name for f in fields(ResolvedOptions)} >= {"device", "num_threads", "threads_given"}


# ---- timings, the step observer, close ---------------------------------------------------


def test_timings_observer_and_close(runtime_cls, artifacts, sample_png, monkeypatch):
    closes = []
    with runtime_cls(artifacts(runtime_cls, "tiny-stablelm")) as rt:
        real_close = rt.close
        rt.close = lambda: (closes.append(1), real_close())[-1]
        assert isinstance(rt, runtime_cls)
        assert rt.timings.load_s > 0 and rt.timings.prefill_s == [] and rt.timings.decode_s == []
        monkeypatch.setattr(rt.model_info.tokenizer, "eos_id", -1)  # no stop token: the run makes every step
        req = image_requests(rt, sample_png)[0]
        seen: list[int] = []
        loop = LoopTimings()
        events = list(rt.generate([req], GenerationConfig(max_new_tokens=5), loop, on_step=lambda step, out: seen.append(step)))
        *tokens, results = events
        assert len(tokens) == 5 and results[0].token_ids == [ev.token_id for ev in tokens]
        assert seen == [0, 1, 2, 3, 4]  # one call per forward pass: the prefill and four decodes
        assert len(rt.timings.prefill_s) == 1 and len(rt.timings.decode_s) == 4 == loop.decode_steps
        assert all(t > 0 for t in rt.timings.prefill_s + rt.timings.decode_s)
        assert loop.prefill_s >= rt.timings.prefill_s[0] and loop.decode_s >= sum(rt.timings.decode_s)
        rt.prefill([req], 1)
        assert len(rt.timings.prefill_s) == 2  # one entry per prefill
    assert closes == [1]
    real_close()  # closing again is harmless
