"""The demo training recipe's building blocks (the full run is a 20-minute command, not a test)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medmoe_edge.model.medmoe import MedMoE
from medmoe_edge.presets import PRESETS, Preset
from medmoe_edge.prompt import build_prompt, tokenize_prompt
from medmoe_edge.spec import MoESpec
from medmoe_edge.tokenizer import PHI_SPECIALS, Tokenizer, default_corpus, train_bpe
from medmoe_edge.training.data import IGNORE, ConversationEncoder, collate
from medmoe_edge.training.stages import StageConfig, multimodal_loss, to_moe, train_router


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tok")
    train_bpe(default_corpus(), 400, PHI_SPECIALS, d)
    return Tokenizer.from_dir(d)


def test_training_tokens_match_inference_prompt(tok):
    """Turn 1 of a training conversation must be token-identical to the inference prompt (§5.3)."""
    enc = ConversationEncoder(tok)
    e = enc.encode([("is there a lesion?", "yes"), ("which side?", "left")])
    prompt = tokenize_prompt(tok, build_prompt("is there a lesion?"))
    image_at = prompt.index(-200)
    assert enc.prefix == prompt[:image_at]
    q_len = len(prompt) - image_at - 1
    assert e.ids[:q_len] == prompt[image_at + 1 :]
    # Labels: only answers and their <|endoftext|>.
    answer1 = tok.encode(" yes") + [tok.eos_id]
    assert e.labels[:q_len] == [IGNORE] * q_len
    assert e.labels[q_len : q_len + len(answer1)] == answer1
    assert tok.decode([t for t in e.labels if t != IGNORE]).replace(" ", "") == "yesleft"


def test_to_moe_copies_dense_ffn_into_experts_and_meta_and_router_into_gate():
    dense = MedMoE(replace(PRESETS[Preset.TINY_PHI], moe=MoESpec(layers=()))).eval()
    router = torch.nn.Linear(dense.spec.text.hidden_size, 4)
    moe = to_moe(dense, MoESpec(layers=(0, 2)), router).eval()
    d, m = dense.lm.state_dict(), moe.lm.state_dict()
    for layer in (0, 2):
        for e in range(4):
            assert torch.equal(m[f"model.layers.{layer}.mlp.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"], d[f"model.layers.{layer}.mlp.fc1.weight"])
        assert torch.equal(m[f"model.layers.{layer}.mlp.meta_moe.fc2.bias"], d[f"model.layers.{layer}.mlp.fc2.bias"])
        assert torch.equal(m[f"model.layers.{layer}.mlp.deepspeed_moe.gate.wg.bias"], router.bias)
    assert torch.equal(m["model.layers.1.mlp.fc1.weight"], d["model.layers.1.mlp.fc1.weight"])


def test_router_learns_a_separable_domain_signal():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat(256)
    x = centers[y] + torch.randn(1024, 16, generator=g)
    _, acc = train_router(x, y, 4, g)
    assert acc > 0.95


def test_multimodal_loss_is_finite_and_decreases(tok):
    spec = replace(PRESETS[Preset.TINY_PHI], text=replace(PRESETS[Preset.TINY_PHI].text, vocab_size=len(tok)))
    torch.manual_seed(0)
    m = MedMoE(spec).train()
    enc = ConversationEncoder(tok)
    feats = torch.randn(2, spec.image_tokens, spec.mm_hidden_size)
    batch = collate([enc.encode([("is there a lesion?", "yes")]), enc.encode([("which side?", "left")])], [0, 1], tok.pad_id, 64)
    prefix = torch.tensor(enc.prefix)
    opt = torch.optim.AdamW(m.lm.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = multimodal_loss(m, feats, batch, prefix)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    assert StageConfig(steps=1).batch == 32
