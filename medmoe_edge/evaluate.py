"""`medmoe-edge eval`: answer a VQA set with any runtime, score it as the paper does (§5.5), report routing.

Routing report (the paper's Fig. 5 for our model): for each imaging domain, the share of
its image rows that each expert received (top-1 choice), pooled over the MoE layers,
and per layer in the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .api import Pipeline
from .generation import GenerationConfig
from .imaging import PreprocessMode
from .scoring import ScoreRow, summarize


@dataclass(frozen=True)
class Prediction:
    id: str
    domain: str
    answer_type: str
    question: str
    reference: str
    prediction: str


@dataclass
class EvalResult:
    predictions: list[Prediction]
    summary: dict[str, dict]
    routing_image: dict[str, list[float]]  # domain → share of image rows per expert (pooled over MoE layers)
    routing_by_layer: dict[str, dict[int, dict[str, list[int]]]]  # domain → layer → {"image","text"} counts

    def to_json(self) -> dict:
        return {
            "summary": self.summary,
            "routing_image_share": self.routing_image,
            "routing_counts_by_layer": {d: {str(k): v for k, v in per.items()} for d, per in self.routing_by_layer.items()},
            "n": len(self.predictions),
        }


def evaluate(
    pipe: Pipeline,
    samples: list,
    root: Path,
    *,
    generation: GenerationConfig = GenerationConfig(max_new_tokens=32),
    preprocess_mode: PreprocessMode = PreprocessMode.PAD,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Answer every sample (greedy by default, as the official eval) and score it.

    Args:
        pipe: a loaded pipeline (any runtime).
        samples: `calibration.synth.Sample`s (image paths relative to `root`).
        root: directory the sample image paths are relative to.
    """
    preds: list[Prediction] = []
    counts: dict[str, dict[int, dict[str, list[int]]]] = {}
    for i, s in enumerate(samples):
        ans = pipe.answer(root / s.image, s.question, generation=generation, preprocess_mode=preprocess_mode)
        domain = s.domain.value if hasattr(s.domain, "value") else str(s.domain)
        preds.append(Prediction(s.id, domain, s.answer_type, s.question, s.answer, ans.text))
        per = counts.setdefault(domain, {})
        for layer, c in ans.routing.prompt.items():
            acc = per.setdefault(layer, {"image": [0] * len(c["image"]), "text": [0] * len(c["text"])})
            for kind in ("image", "text"):
                acc[kind] = [a + b for a, b in zip(acc[kind], c[kind])]
        if progress:
            progress(i + 1, len(samples))
    summary = summarize([ScoreRow(p.domain, p.answer_type, p.prediction, p.reference) for p in preds])
    shares: dict[str, list[float]] = {}
    for domain, per in sorted(counts.items()):
        pooled = [sum(layer["image"][e] for layer in per.values()) for e in range(len(next(iter(per.values()))["image"]))] if per else []
        total = sum(pooled)
        shares[domain] = [c / total if total else 0.0 for c in pooled]
    return EvalResult(preds, summary, shares, dict(sorted(counts.items())))


def write_report(result: EvalResult, out_dir: Path, title: str, provenance: dict | None = None) -> list[Path]:
    """Write predictions.jsonl, summary.json (with `provenance`) and routing.png into a new
    directory `out_dir`, atomically (a non-empty directory is refused, never replaced)."""
    from .ckpt_writer import atomic_dir
    from .heatmap import render_heatmap

    names = ["predictions.jsonl", "summary.json"]
    with atomic_dir(out_dir) as tmp:
        (tmp / names[0]).write_text("".join(json.dumps(p.__dict__) + "\n" for p in result.predictions))
        summary = result.to_json() | ({"provenance": provenance} if provenance else {})
        (tmp / names[1]).write_text(json.dumps(summary, indent=2) + "\n")
        if result.routing_image:
            domains = list(result.routing_image)
            n_exp = len(next(iter(result.routing_image.values())))
            render_heatmap([result.routing_image[d] for d in domains], domains, [f"expert {e}" for e in range(n_exp)], title, tmp / "routing.png")
            names.append("routing.png")
    return [out_dir / n for n in names]
