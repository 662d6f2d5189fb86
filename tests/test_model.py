"""The reference model against the spec: KV cache, expert-sparse MoE, batching, routing math."""

from __future__ import annotations

import pytest
import torch

from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX, MedMoE
from medmoe_edge.model.moe import Dispatch, MoEFFN, route
from medmoe_edge.presets import Preset
from medmoe_edge.spec import MoESpec
from tiny_models import tiny_model

TINY = [Preset.TINY_PHI, Preset.TINY_STABLELM]
MOE_FORMS = {
    "top1": MoESpec(layers=(0, 2)),
    "top2": MoESpec(layers=(0, 2), top_k=2),
    "top1-residual": MoESpec(layers=(0, 2), use_residual=True),
}


def dense_all_experts(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Oracle (§2.3, §7.14): run all experts on all tokens and combine with one-hot × weight."""
    xf = x.reshape(-1, x.shape[-1])
    wg = moe.deepspeed_moe.gate.wg
    p = torch.softmax(xf.float() @ wg.weight.float().T + wg.bias.float(), dim=-1)
    n, e = p.shape
    combine = torch.zeros(n, e)
    top1 = p.argmax(-1)
    if moe.top_k == 1:
        combine[torch.arange(n), top1] = p[torch.arange(n), top1]  # raw probability, no renormalisation
    else:
        p2 = p.clone()
        p2[torch.arange(n), top1] = -1
        top2 = p2.argmax(-1)
        a, b = p[torch.arange(n), top1], p[torch.arange(n), top2]
        combine[torch.arange(n), top1] = a / (a + b)
        combine[torch.arange(n), top2] = b / (a + b)
    outs = torch.stack([ex(xf) for ex in moe.experts], dim=1)  # [N, E, H]
    routed = (combine[..., None] * outs).sum(1)
    meta = moe.meta_moe(xf)
    if moe.use_residual:
        c = torch.softmax(moe.coefficient(xf), -1)
        y = routed * c[:, :1] + meta * c[:, 1:] + meta
    else:
        y = routed + meta
    return y.reshape(x.shape)


@pytest.mark.parametrize("form", MOE_FORMS)
@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.value)
def test_expert_sparse_equals_dense_all_experts(preset, form):
    m = tiny_model(preset, MOE_FORMS[form])
    moe = m.lm.model.layers[0].mlp
    assert isinstance(moe, MoEFFN)
    x = torch.randn(3, 37, m.spec.text.hidden_size)
    y, r = moe(x)
    torch.testing.assert_close(y, dense_all_experts(moe, x), atol=1e-6, rtol=1e-5)
    assert len(r.experts.unique()) == m.spec.moe.num_experts  # the test really exercises every expert


@pytest.mark.parametrize("dispatch", [Dispatch.SCATTER, Dispatch.MASKED], ids=lambda d: d.value)
@pytest.mark.parametrize("form", MOE_FORMS)
@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.value)
def test_traceable_dispatch_for_export_equals_eager(preset, form, dispatch):
    """The fixed-trip-count dispatches traced into ONNX compute what eager inference does.

    SCATTER runs each expert on the same rows as eager, so it is bit for bit; MASKED runs every
    expert on all rows, and a matmul's bits for a row may depend on how many rows it is computed
    with (BLAS blocking), so it is equal to float rounding.
    """
    m = tiny_model(preset, MOE_FORMS[form])
    moe = m.lm.model.layers[0].mlp
    x = torch.randn(2, 29, m.spec.text.hidden_size)
    eager, _ = moe(x)
    moe.dispatch = dispatch
    traced, _ = moe(x)
    moe.dispatch = Dispatch.EAGER
    if dispatch is Dispatch.SCATTER:
        assert torch.equal(eager, traced)
    else:
        torch.testing.assert_close(traced, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.value)
def test_sparse_runs_only_selected_experts(preset):
    """With one token, exactly the selected expert and the meta expert execute (counted by hooks)."""
    m = tiny_model(preset)
    moe = m.lm.model.layers[0].mlp
    calls: list[str] = []
    for i, ex in enumerate(moe.experts):
        ex.register_forward_hook(lambda *_, i=i: calls.append(f"expert{i}"))
    moe.meta_moe.register_forward_hook(lambda *_: calls.append("meta"))
    x = torch.randn(1, 1, m.spec.text.hidden_size)
    _, r = moe(x)
    assert sorted(calls) == sorted([f"expert{int(r.experts[0, 0])}", "meta"])


def test_top1_weight_is_raw_softmax_probability():
    wg = torch.nn.Linear(2, 4)
    with torch.no_grad():
        wg.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [-1.0, 0.0]]))
        wg.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
    r = route(torch.tensor([[1.0, 0.0]]), wg, top_k=1)
    logits = torch.tensor([1.5, 0.0, 0.0, -1.0])
    assert r.experts.tolist() == [[0]]
    assert r.weights.item() == pytest.approx(torch.softmax(logits, 0)[0].item(), abs=1e-7)
    assert r.weights.item() < 0.75  # not renormalised to 1


def _prompt(m: MedMoE, n_text_before: int, n_text_after: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.n_vocab, (n_text_before + n_text_after,), generator=g).tolist()
    return ids[:n_text_before] + [IMAGE_TOKEN_INDEX] + ids[n_text_before:]


def _greedy(m: MedMoE, prompts: list[list[int]], pixels: torch.Tensor, steps: int, use_cache: bool) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy decode; with use_cache=False every step recomputes the whole sequence."""
    rows_img = m.encode_images(pixels)
    rows = [m.splice(p, rows_img[i : i + 1]) for i, p in enumerate(prompts)]
    out_ids: list[list[int]] = [[] for _ in prompts]
    step_logits = []
    if use_cache:
        batch = m.make_batch(rows)
        cache = m.new_cache(len(rows), batch.embeds.shape[1] + steps)
        logits, _ = m.forward_embeds(batch.embeds, batch.positions, batch.mask, cache)
        last = logits[torch.arange(len(rows)), torch.tensor(batch.lengths) - 1]
        mask, pos = batch.mask, torch.tensor(batch.lengths)
        for _ in range(steps):
            step_logits.append(last)
            tok = last.argmax(-1)
            for i, t in enumerate(tok.tolist()):
                out_ids[i].append(t)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits, _ = m.forward_embeds(m.embed_tokens(tok)[:, None], pos[:, None], mask, cache)
            last, pos = logits[:, 0], pos + 1
        return out_ids, step_logits
    assert len(prompts) == 1
    seq = rows[0]
    for _ in range(steps):
        L = seq.shape[0]
        logits, _ = m.forward_embeds(seq[None], torch.arange(L)[None], torch.ones(1, L, dtype=torch.int64), None)
        last = logits[:, -1]
        step_logits.append(last)
        tok = int(last.argmax(-1))
        out_ids[0].append(tok)
        seq = torch.cat([seq, m.embed_tokens(torch.tensor([tok]))])
    return out_ids, step_logits


@pytest.mark.parametrize("form", MOE_FORMS)
@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.value)
def test_kv_cache_decoding_equals_full_recomputation(preset, form):
    m = tiny_model(preset, MOE_FORMS[form])
    pixels = torch.randn(1, 3, 32, 32)
    prompt = [_prompt(m, 5, 7, seed=1)]
    ids_c, logits_c = _greedy(m, prompt, pixels, steps=8, use_cache=True)
    ids_f, logits_f = _greedy(m, prompt, pixels, steps=8, use_cache=False)
    assert ids_c == ids_f
    worst = max((a - b).abs().max().item() for a, b in zip(logits_c, logits_f))
    assert worst <= 1e-5, f"KV-cache logits differ from recomputation by {worst}"


@pytest.mark.parametrize("preset", TINY, ids=lambda p: p.value)
def test_results_independent_of_batch_composition_and_padding(preset):
    m = tiny_model(preset)
    pixels = torch.randn(3, 3, 32, 32)
    prompts = [_prompt(m, 4, 9, seed=2), _prompt(m, 11, 2, seed=3), _prompt(m, 1, 1, seed=4)]
    batched_ids, batched_logits = _greedy(m, prompts, pixels, steps=6, use_cache=True)
    # Alone, and in another batch order (different padding per row).
    order = [2, 0, 1]
    perm_ids, perm_logits = _greedy(m, [prompts[i] for i in order], pixels[order], steps=6, use_cache=True)
    for i in range(3):
        alone_ids, alone_logits = _greedy(m, [prompts[i]], pixels[i : i + 1], steps=6, use_cache=True)
        assert batched_ids[i] == alone_ids[0] == perm_ids[order.index(i)]
        for s in range(6):
            torch.testing.assert_close(batched_logits[s][i], alone_logits[s][0], atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(perm_logits[s][order.index(i)], alone_logits[s][0], atol=2e-5, rtol=1e-5)


def test_positions_are_contiguous_over_spliced_image_rows():
    m = tiny_model(Preset.TINY_PHI)
    rows = m.splice(_prompt(m, 3, 2, seed=5), m.encode_images(torch.randn(1, 3, 32, 32)))
    batch = m.make_batch([rows, rows[:4]])
    assert rows.shape[0] == 3 + m.spec.image_tokens + 2
    assert batch.positions[0].tolist() == list(range(rows.shape[0]))
    assert batch.mask[1].tolist() == [1] * 4 + [0] * (rows.shape[0] - 4)
