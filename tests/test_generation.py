"""Sampling functions and the shared generation loop on the torch runtime."""

from __future__ import annotations

import pytest
import torch

from medmoe_edge import api
from medmoe_edge.errors import InputError
from medmoe_edge.generation import FinishReason, GenerationConfig, sample, top_p_filter
from medmoe_edge.presets import Preset


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1  # always keeps the best token


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, GenerationConfig()).tolist() == logits.argmax(-1).tolist()
    cfg = GenerationConfig(temperature=1.0, top_p=0.9, seed=1)
    a = sample(logits, cfg, torch.Generator().manual_seed(5))
    b = sample(logits, cfg, torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize(("kw", "msg"), [({"max_new_tokens": 0}, "max-new-tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top-p")])
def test_generation_config_validation(kw, msg):
    with pytest.raises(InputError, match=msg):
        GenerationConfig(**kw)


def test_answer_streams_and_reports_routing(tiny_ckpts, sample_png):
    pipe = api.load(tiny_ckpts[Preset.TINY_STABLELM])
    pieces: list[str] = []
    ans = pipe.answer(sample_png, "Is there a lesion?", generation=GenerationConfig(max_new_tokens=6), on_text=pieces.append)
    assert "".join(pieces).strip() == ans.text
    assert ans.text == pipe.runtime.model_info.tokenizer.decode(ans.token_ids).strip()
    assert len(ans.routing.generated) == len(ans.token_ids)
    assert all(set(step) == {0, 2} and all(len(e) == 1 for e in step.values()) for step in ans.routing.generated)
    # Prompt routing counts every image row and text token once per MoE layer.
    n_img = pipe.runtime.model_info.spec.image_tokens
    for layer in (0, 2):
        assert sum(ans.routing.prompt[layer]["image"]) == n_img
        assert sum(ans.routing.prompt[layer]["text"]) == ans.prompt_tokens - n_img
    assert "".join(pipe.stream(sample_png, "Is there a lesion?", generation=GenerationConfig(max_new_tokens=6))).strip() == ans.text


def test_eos_stops_generation(tiny_ckpts, sample_png):
    pipe = api.load(tiny_ckpts[Preset.TINY_PHI])
    req, _ = pipe.prepare(sample_png, "Is there a lesion?")
    first = int(pipe.runtime.prefill([req], 4).logits.argmax(-1))
    pipe.runtime.model_info.tokenizer.eos_id = first  # make the greedy first token the stop token
    ans = pipe.answer(sample_png, "Is there a lesion?", generation=GenerationConfig(max_new_tokens=4))
    assert ans.finish_reason is FinishReason.EOS and ans.token_ids == []


def test_question_too_long_for_context(tiny_ckpts, sample_png):
    pipe = api.load(tiny_ckpts[Preset.TINY_PHI])
    with pytest.raises(InputError, match="needs .* positions but the model has 2048: shorten the question or lower --max-new-tokens"):
        pipe.answer(sample_png, "Is there a lesion?", generation=GenerationConfig(max_new_tokens=2040))
    with pytest.raises(InputError, match="the question is empty"):
        pipe.answer(sample_png, "  <image> ")
