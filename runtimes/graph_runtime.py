"""The graph runner shared by the runtimes of exported graph bundles (ONNX Runtime, TensorRT).

Both run the same three graphs (`export/onnx_graphs.py`): vision, embed and the decoder with a
preallocated KV cache. This base does everything above one graph call: assembling the prompt's
rows (image rows from the vision graph spliced in at the placeholder, text rows from the embed
graph), one KV buffer per layer and key/value for the whole generation (prompt +
`max_new_tokens` slots) that the decoder reads in place and whose new rows are copied in after
each pass, and the routing it reports. A subclass loads its graphs and implements `_run`.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch

from medmoe_edge.bundle import Manifest
from medmoe_edge.checkpoint import read_spec
from medmoe_edge.generation import StepOutput
from medmoe_edge.model.medmoe import IMAGE_TOKEN_INDEX, pad_batch
from medmoe_edge.tokenizer import Tokenizer

from .base import ModelInfo, Precision, PreparedRequest, Runtime, prompt_routing_counts, token_kinds


class GraphRuntime(Runtime):
    """Prefill/decode over a bundle's vision, embed and decoder graphs; subclasses run one graph (`_run`)."""

    dir: Path
    manifest: Manifest
    compute: Precision  # what the graphs compute in
    device: torch.device

    def _setup_model(self, what: str, context_length: int | None = None) -> None:
        """Model facts from the manifest, the tokenizer and processor from the bundle, an empty cache.

        Args:
            what: shown in the model label, e.g. "onnx fp32, cpu".
            context_length: positions the graphs take when below the model's (TensorRT profiles).
        """
        mm = self.manifest.model
        spec, _cfg, tower = read_spec(self.dir)
        self.spec = spec
        self.moe_layers = list(mm.moe_layers)
        self.n_layers = mm.num_layers
        self.vocab_rows = mm.vocab_rows
        self.kv_shape = (mm.num_kv_heads, mm.head_dim)
        self.hidden = mm.hidden_size
        self.top_k = mm.top_k
        self.n_experts = mm.num_experts
        self.torch_dtype = self.compute.torch
        self._info = ModelInfo(
            spec=spec,
            tokenizer=Tokenizer.from_dir(self.dir),
            processor=tower.processor,
            label=f"{self.manifest.source.get('label', self.dir.name)} ({what})",
            context_length=context_length or mm.context_length,
            vocab_rows=mm.vocab_rows,
        )
        self._kv: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None
        self._filled = 0

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    # ---- graph calls -------------------------------------------------------------------

    @abstractmethod
    def _run(self, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run graph `name` reading `inputs` and writing into the preallocated `outputs` (all on `self.device`)."""

    def _check_batch(self, batch: int) -> None:
        """Refuse a batch the graphs cannot take (engines are built for a bounded batch)."""

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(ids.shape[0], self.hidden, dtype=self.torch_dtype, device=self.device)
        if ids.shape[0]:
            self._run("embed", {"input_ids": ids.to(self.device)}, {"embeds": out})
        return out

    def _decoder(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One decoder pass; writes the new keys/values into the cache buffers. Returns (logits [B,V], experts {layer: [B,T,k]})."""
        b, t = embeds.shape[0], embeds.shape[1]
        kv, d = self.kv_shape
        inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, "last_index": last}
        for i in range(self.n_layers):
            inputs[f"past_key_{i}"], inputs[f"past_value_{i}"] = self._kv[2 * i], self._kv[2 * i + 1]
        outputs = {"logits": torch.empty(b, self.vocab_rows, dtype=torch.float32, device=self.device)}
        experts = {}
        for m in self.moe_layers:
            experts[m] = outputs[f"experts_{m}"] = torch.empty(b, t, self.top_k, dtype=torch.int64, device=self.device)
            outputs[f"router_probs_{m}"] = torch.empty(b, t, self.n_experts, dtype=torch.float32, device=self.device)
        new = [torch.empty(b, kv, t, d, dtype=self.torch_dtype, device=self.device) for _ in range(2 * self.n_layers)]
        for i in range(self.n_layers):
            outputs[f"new_key_{i}"], outputs[f"new_value_{i}"] = new[2 * i], new[2 * i + 1]
        start = self._filled  # the base reserved the slots: prefill sized the cache for max_new_tokens decodes
        self._run("decoder", inputs, outputs)
        for buf, rows in zip(self._kv, new):
            buf[:, :, start : start + t].copy_(rows)
        self._filled = start + t
        return outputs["logits"], experts

    # ---- Runtime interface ---------------------------------------------------------------

    def _prefill(self, requests: list[PreparedRequest], max_new_tokens: int) -> StepOutput:
        p = self.spec.image_tokens
        self._check_batch(len(requests))
        pixels = torch.cat([r.pixel_values for r in requests]).to(torch.float32)
        image_rows = torch.empty(pixels.shape[0], p, self.hidden, dtype=self.torch_dtype, device=self.device)
        if pixels.shape[0]:
            self._run("vision", {"pixel_values": pixels.to(self.device)}, {"image_embeds": image_rows})
        text_ids = torch.tensor([i for r in requests for i in r.token_ids if i != IMAGE_TOKEN_INDEX], dtype=torch.int64)
        text_rows = self._embed(text_ids)
        rows, ti, ii = [], 0, 0
        for r in requests:
            parts = []
            for i in r.token_ids:
                if i == IMAGE_TOKEN_INDEX:
                    parts.append(image_rows[ii])
                    ii += 1
                else:
                    parts.append(text_rows[ti : ti + 1])
                    ti += 1
            rows.append(torch.cat(parts))
        batch = pad_batch(rows, self.hidden, dtype=self.torch_dtype, device=self.device)
        B, L = batch.embeds.shape[0], batch.embeds.shape[1]
        kv, d = self.kv_shape
        self._kv = [torch.zeros(B, kv, L + max_new_tokens, d, dtype=self.torch_dtype, device=self.device) for _ in range(2 * self.n_layers)]
        self._filled = 0
        last = torch.tensor([n - 1 for n in batch.lengths], dtype=torch.int64, device=self.device)
        logits, experts = self._decoder(batch.embeds, batch.mask, batch.positions, last)
        self._mask = batch.mask
        self._next_pos = torch.tensor(batch.lengths, dtype=torch.int64, device=self.device)
        rows_idx = torch.arange(B)
        kinds = token_kinds(requests, p, L)
        return StepOutput(
            logits=logits.cpu(),
            experts={m: e.cpu()[rows_idx, last.cpu()] for m, e in experts.items()},
            prompt_routing=prompt_routing_counts({m: e[..., 0] for m, e in experts.items()}, kinds, self.n_experts),
            prompt_experts={m: e.cpu() for m, e in experts.items()},
        )

    def _decode(self, tokens: torch.Tensor) -> StepOutput:
        if not self._kv:
            raise RuntimeError("decode() called after close()")
        embeds = self._embed(tokens.to(torch.int64))[:, None]
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        b = tokens.shape[0]
        logits, experts = self._decoder(embeds, self._mask, self._next_pos[:, None], torch.zeros(b, dtype=torch.int64, device=self.device))
        self._next_pos = self._next_pos + 1
        return StepOutput(logits=logits.cpu(), experts={m: e[:, 0].cpu() for m, e in experts.items()})

    def close(self) -> None:
        self._kv = []


__all__ = ["GraphRuntime"]
