"""`medmoe-edge train-demo`: the whole miniature Med-MoE recipe, from generated data to a checkpoint.

Deterministic for a seed on a given machine and torch version (CPU, fixed thread count).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from medmoe_edge.calibration.synth import DOMAINS, Split, read_manifest
from medmoe_edge.ckpt_writer import atomic_dir, write_checkpoint
from medmoe_edge.imaging import ImageProcessorSpec
from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.presets import DEMO
from medmoe_edge.prompt import SYSTEM
from medmoe_edge.spec import MoESpec
from medmoe_edge.tokenizer import PHI_SPECIALS, Tokenizer, train_bpe

from .clip import ClipConfig, train_clip
from .data import ConversationEncoder, collate, load_images
from .stages import StageConfig, averaged_hidden_states, conversation_batches, multimodal_loss, run_stage, set_trainable, text_batches, text_loss, to_moe, train_router

TRAINING_LOG = "training_log.json"
MODEL_CARD = "README.md"


def model_card(record: dict) -> str:
    """The checkpoint's README: what the demo is, and that it is not for clinical use."""
    return (
        "# medmoe-edge demo model\n\n"
        "**DEMO ONLY, NOT FOR CLINICAL USE.** A miniature Med-MoE (Phi-variant structure: 4 layers, hidden 256, "
        "MoE on layers 0 and 2 with 4 experts + meta expert, top-1) trained by `medmoe-edge train-demo` on "
        "synthetic images that imitate CT, MRI, X-ray and pathology. It has never seen a patient image; "
        "its answers about real scans mean nothing clinically.\n\n"
        f"Training data: `{record['data']['manifest']}` (sha256 {record['data']['sha256']}), "
        f"{record['data']['images']} images, {record['data']['qa_pairs']} QA pairs. "
        f"Router label → expert: {record['router_label_map']}. Recipe and losses: `training_log.json`.\n"
    )


@dataclass(frozen=True)
class DemoRecipe:
    """Every knob of the demo training run (recorded in the checkpoint's training_log.json)."""

    seed: int = 0
    threads: int = 2
    vocab: int = DEMO.text.vocab_size  # requested BPE size (an upper bound)
    clip: ClipConfig = field(default_factory=ClipConfig)
    stage0: StageConfig = field(default_factory=lambda: StageConfig(steps=150, lr=2e-3))
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=150, lr=2e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=500, lr=1e-3))
    router_samples_per_domain: int = 256
    stage3: StageConfig = field(default_factory=lambda: StageConfig(steps=300, lr=5e-4))


def _tokenizer(samples, captions: list[str], vocab: int, out_dir: Path) -> Tokenizer:
    corpus = [f"{SYSTEM} USER: \n{s.question} ASSISTANT: {s.answer}<|endoftext|>" for s in samples] + captions
    train_bpe(corpus, vocab, PHI_SPECIALS, out_dir)
    return Tokenizer.from_dir(out_dir)


@torch.no_grad()
def _features(m: MedMoE, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([m.vision(pixels[i : i + batch]) for i in range(0, pixels.shape[0], batch)])


def train_demo(data_dir: Path, out: Path, recipe: DemoRecipe = DemoRecipe(), log: Callable[[str], None] = print) -> Path:
    """Train the demo model on `data_dir` (from `medmoe-edge make-data`) and write it to `out`.

    Returns:
        The checkpoint directory (released layout, with `training_log.json`).
    """
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    gen = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"{name} done in {timings[name]:.0f} s")

    with atomic_dir(out) as tmp:
        t0 = time.perf_counter()
        samples = read_manifest(data_dir / f"{Split.TRAIN.value}.jsonl")
        processor = ImageProcessorSpec.clip(DEMO.vision.image_size)
        images = load_images(data_dir, samples, processor)
        tok = _tokenizer(samples, images.captions, recipe.vocab, tmp)
        # The template language is small: BPE stops below the requested size when no pair
        # is frequent enough; the model's vocabulary is exactly the tokenizer's.
        spec = replace(DEMO, text=replace(DEMO.text, vocab_size=len(tok)))
        log(f"{len(images.qa)} training images, {len(samples)} QA pairs, tokenizer {len(tok)}")
        timed("data", t0)

        t0 = time.perf_counter()
        tower_state, losses["clip"] = train_clip(spec.vision, images.pixels, images.captions, recipe.clip, gen, log)
        timed("clip", t0)

        dense = MedMoE(replace(spec, moe=MoESpec(layers=())))
        dense.vision.load_state_dict({k: v for k, v in tower_state.items() if k in dense.vision.state_dict()})
        dense.vision.eval()
        feats = _features(dense, images.pixels)
        enc = ConversationEncoder(tok)
        prefix = torch.tensor(enc.prefix)
        pad = tok.pad_id

        t0 = time.perf_counter()
        params = set_trainable(dense, lambda n: not n.startswith("model.mm_projector."))
        make = text_batches(enc, images.qa, images.captions, recipe.stage0, rng, pad)
        losses["stage0_lm"] = run_stage("stage0 base LM", params, recipe.stage0, lambda s: text_loss(dense, make(s)), log)
        timed("stage0", t0)

        t0 = time.perf_counter()
        params = set_trainable(dense, lambda n: n.startswith("model.mm_projector."))
        make = conversation_batches(enc, images.qa, recipe.stage1, rng, pad, describe=images.captions)
        losses["stage1_align"] = run_stage("stage1 align", params, recipe.stage1, lambda s: multimodal_loss(dense, feats, make(s), prefix), log)
        timed("stage1", t0)

        t0 = time.perf_counter()
        params = set_trainable(dense, lambda n: True)
        make = conversation_batches(enc, images.qa, recipe.stage2, rng, pad)
        losses["stage2_dense"] = run_stage("stage2 dense", params, recipe.stage2, lambda s: multimodal_loss(dense, feats, make(s), prefix), log)
        timed("stage2", t0)

        t0 = time.perf_counter()
        dense.eval()
        picks = torch.cat([torch.nonzero(images.domains == d).flatten()[: recipe.router_samples_per_domain] for d in range(len(DOMAINS))])
        xs = []
        for s in range(0, len(picks), 64):
            idx = picks[s : s + 64].tolist()
            batch = collate([enc.encode([images.qa[i][0]]) for i in idx], idx, pad, 64)
            # The router sees the prompt only (question, no answer), as in the notebook.
            q_len = [len(tok.encode(f"\n{images.qa[i][0][0]} ASSISTANT:")) for i in idx]
            for r, n in enumerate(q_len):
                batch.suffix_mask[r, n:] = 0
            xs.append(averaged_hidden_states(dense, feats, batch, prefix))
        router, acc = train_router(torch.cat(xs), images.domains[picks], len(DOMAINS), gen)
        losses["router_train_accuracy"] = acc
        log(f"router: domain classification accuracy {acc:.1%} on {len(picks)} training prompts")
        timed("router", t0)

        t0 = time.perf_counter()
        moe = to_moe(dense, MoESpec(layers=spec.moe.layers, num_experts=len(DOMAINS)), router)
        moe.train()
        params = set_trainable(moe, lambda n: ".deepspeed_moe.experts." in n or ".meta_moe." in n or n.startswith("model.mm_projector."))
        make = conversation_batches(enc, images.qa, recipe.stage3, rng, pad)
        losses["stage3_moe"] = run_stage("stage3 moe", params, recipe.stage3, lambda s: multimodal_loss(moe, feats, make(s), prefix), log)
        timed("stage3", t0)

        lm_state = {k: v.detach().contiguous() for k, v in moe.lm.state_dict().items()}
        write_checkpoint(tmp, moe.spec, iter(lm_state.items()), tower_state, dtype="float32", eos_id=tok.eos_id, pad_id=tok.pad_id)
        timings["total"] = round(time.perf_counter() - t_start, 1)
        record = {
            "recipe": asdict(recipe),
            "data": {"manifest": str(data_dir / "train.jsonl"), "sha256": (data_dir / "train.sha256").read_text().strip(), "images": len(images.qa), "qa_pairs": len(samples)},
            "router_label_map": {d.value: i for i, d in enumerate(DOMAINS)},
            "losses": losses,
            "seconds": timings,
            "torch": torch.__version__,
        }
        (tmp / TRAINING_LOG).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / MODEL_CARD).write_text(model_card(record))
    log(f"wrote {out} in {timings['total']:.0f} s")
    return out
