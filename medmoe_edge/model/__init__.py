"""The PyTorch reference implementation of Med-MoE (../shared/reference/medmoe-spec.md)."""

from .medmoe import IMAGE_TOKEN_INDEX, MedMoE
from .moe import MoEFFN, Routing, route

__all__ = ["IMAGE_TOKEN_INDEX", "MedMoE", "MoEFFN", "Routing", "route"]
