"""`medmoe-edge run`: answer a question about an image, streaming the answer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..api import load
from ..demo import DEMO_LABEL, is_demo
from ..generation import GenerationConfig
from ..imaging import PreprocessMode, load_image
from ..perf import peak_rss_bytes
from ..prompt import build_prompt
from .common import DeviceOption, DtypeOption, KvTypeOption, ProviderOption, ThreadsOption, VisionTowerOption, err, print_json, runtime_options, user_errors


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a `run` started by a large parent
    (a benchmark, a PACS bridge in Python) reported the parent's peak (2.5 GB too much, measured).
    """
    return peak_rss_bytes() / 2**20


@user_errors
def run(
    image: Annotated[Path, typer.Option("--image", help="Image file: DICOM or any raster format (PNG, JPEG, TIFF, ...).")],
    question: Annotated[str, typer.Option("--question", help="Question about the image.")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, a hub id, or a bundle from `export` (with its --runtime).")] = "demo",
    runtime: Annotated[str, typer.Option("--runtime", help="Runtime plugin (see `medmoe-edge runtimes`).")] = "torch",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Maximum tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (official eval); >0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad: pad to square as in training (default); crop: resize + centre crop as the official eval.")] = PreprocessMode.PAD,
    frame: Annotated[int | None, typer.Option("--frame", help="Frame of a multi-frame image [default: the middle DICOM frame, else 0].")] = None,
    device: DeviceOption = "cpu",
    provider: ProviderOption = None,
    dtype: DtypeOption = None,
    threads: ThreadsOption = None,
    vision_tower: VisionTowerOption = None,
    kv_type: KvTypeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer, token ids, timings, memory, experts per MoE layer).")] = False,
) -> None:
    """Answer a question about a medical image with Med-MoE."""
    # Everything that can be checked without the model is checked before it loads (seconds to minutes).
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    options = runtime_options(device=device, dtype=dtype, threads=threads, vision_tower=vision_tower, provider=provider, kv_type=kv_type)
    build_prompt(question)  # refuses an empty question
    loaded = load_image(image, frame=frame)
    with err.status(f"loading {model} with the {runtime} runtime"):
        pipe = load(model, runtime=runtime, options=options)
    if is_demo(model) and not as_json:
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    with pipe:
        if as_json:
            ans = pipe.answer(loaded, question, generation=gen, preprocess_mode=preprocess)
            obj = ans.to_json()
            obj["timings"] |= {"load_s": pipe.runtime.timings.load_s, "threads": pipe.runtime.options.num_threads}
            if pipe.runtime.timings.load_parts_s:
                obj["timings"]["load_parts_s"] = {k: round(v, 4) for k, v in pipe.runtime.timings.load_parts_s.items()}
            obj["memory"] = {"peak_rss_mb": round(peak_rss_mb(), 1)}
            if pipe.runtime.settings():
                obj["runtime_settings"] = pipe.runtime.settings()  # e.g. llamacpp's kv_type
            obj.update(runtime=runtime, model=str(model), preprocess=preprocess.value, generation=gen.__dict__)
            if is_demo(model):
                obj["model_note"] = DEMO_LABEL
            print_json(obj)
            return

        def emit(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        ans = pipe.answer(loaded, question, generation=gen, preprocess_mode=preprocess, on_text=emit)
        sys.stdout.write("\n")
        t = ans.timings
        rate = f"decode {t.decode_tokens_per_s:.1f} tok/s" if t.decode_tokens_per_s is not None else f"decode rate n/a ({t.decode_tokens} decode steps)"
        err.print(
            f"[dim]{len(ans.token_ids)} tokens ({ans.finish_reason.value}), prompt {ans.prompt_tokens} positions, "
            f"load {pipe.runtime.timings.load_s:.1f} s, first token {t.time_to_first_token_s * 1000:.0f} ms, {rate}, "
            f"{pipe.runtime.options.num_threads} threads, peak RSS {peak_rss_mb():.0f} MiB[/]"
        )
