"""`medmoe-edge run`: answer a question about an image, streaming the answer."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..api import load
from ..demo import DEMO_LABEL, is_demo
from ..generation import GenerationConfig
from ..imaging import PreprocessMode
from .common import err, print_json, runtime_options, user_errors


@user_errors
def run(
    image: Annotated[Path, typer.Option("--image", help="PNG, JPEG, TIFF, BMP or DICOM file.")],
    question: Annotated[str, typer.Option("--question", help="Question about the image.")],
    model: Annotated[str, typer.Option("--model", help="'demo' (built-in), a checkpoint directory, a hub id, or a bundle from `export` (with its --runtime).")] = "demo",
    runtime: Annotated[str, typer.Option("--runtime", help="Runtime plugin (see `medmoe-edge runtimes`).")] = "torch",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Maximum tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (official eval); >0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    preprocess: Annotated[PreprocessMode, typer.Option("--preprocess", help="pad: pad to square as in training (default); crop: resize + centre crop as the official eval.")] = PreprocessMode.PAD,
    frame: Annotated[int | None, typer.Option("--frame", help="DICOM frame index [default: middle frame].")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")] = "cpu",
    provider: Annotated[str | None, typer.Option("--provider", help="onnxruntime execution provider: cpu, cuda or tensorrt (never a silent fallback).")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Compute precision: float32 (default), float16 or bfloat16.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads [default: library default].")] = None,
    vision_tower: Annotated[Path | None, typer.Option("--vision-tower", help="HF CLIP directory overriding config.json mm_image_tower.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer, token ids, timings, experts per MoE layer).")] = False,
) -> None:
    """Answer a question about a medical image with Med-MoE."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    options = runtime_options(device=device, dtype=dtype, threads=threads, vision_tower=vision_tower, provider=provider)
    with err.status(f"loading {model} with the {runtime} runtime"):
        pipe = load(model, runtime=runtime, options=options)
    if is_demo(model) and not as_json:
        err.print(f"[yellow]{DEMO_LABEL}[/]")
    with pipe:
        if as_json:
            ans = pipe.answer(image, question, generation=gen, preprocess_mode=preprocess, frame=frame)
            obj = ans.to_json()
            obj.update(runtime=runtime, model=str(model), preprocess=preprocess.value, generation=gen.__dict__)
            if is_demo(model):
                obj["model_note"] = DEMO_LABEL
            print_json(obj)
            return

        def emit(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        ans = pipe.answer(image, question, generation=gen, preprocess_mode=preprocess, frame=frame, on_text=emit)
        sys.stdout.write("\n")
        t = ans.timings
        err.print(
            f"[dim]{len(ans.token_ids)} tokens ({ans.finish_reason.value}), prompt {ans.prompt_tokens} positions, "
            f"first token {t.time_to_first_token_s * 1000:.0f} ms, decode {t.decode_tokens_per_s:.1f} tok/s[/]"
        )
