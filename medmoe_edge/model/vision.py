"""CLIP ViT vision tower (§1.1), parameter names as in HF `CLIPVisionModel` (`vision_model.*`).

Med-MoE takes `hidden_states[mm_vision_select_layer]` (-2: the input of the last
encoder layer) and drops CLS. The official code still runs the last layer and
`post_layernorm` and throws them away; we build and run only the layers whose output
is used, which gives identical features with less work.
"""

from __future__ import annotations

import torch
from torch import nn

from ..spec import VisionSpec


def _act(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return nn.functional.gelu
    return lambda x: nn.functional.gelu(x, approximate="tanh")  # gelu_new / gelu_pytorch_tanh


class _Embeddings(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(v.hidden_size))
        self.patch_embedding = nn.Conv2d(v.num_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.position_embedding = nn.Embedding(v.num_patches + 1, v.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [B, P, C]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class _Attention(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        c = v.hidden_size
        self.heads = v.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        d = c // self.heads
        q, k, v = (p(x).view(b, t, self.heads, d).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = (torch.matmul(q, k.transpose(2, 3)) * d**-0.5).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        return self.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)
        self.act = _act(v.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _EncoderLayer(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.self_attn = _Attention(v)
        self.layer_norm2 = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)
        self.mlp = _MLP(v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_EncoderLayer(v) for _ in range(v.layers_used))


class _VisionTransformer(nn.Module):
    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.embeddings = _Embeddings(v)
        self.pre_layrnorm = nn.LayerNorm(v.hidden_size, eps=v.layer_norm_eps)  # sic: HF's spelling
        self.encoder = _Encoder(v)


class VisionTower(nn.Module):
    """Pixels [B, 3, S, S] → patch features [B, P, C] from the selected layer, CLS dropped."""

    def __init__(self, v: VisionSpec) -> None:
        super().__init__()
        self.spec = v
        self.vision_model = _VisionTransformer(v)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixels))  # hidden_states[0]
        for layer in vm.encoder.layers:  # after i layers: hidden_states[i]
            h = layer(h)
        return h[:, 1:]  # select_feature 'patch': drop CLS
