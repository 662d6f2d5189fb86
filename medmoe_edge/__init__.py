"""medmoe-edge: Med-MoE from its training checkpoint to fast, faithful inference on small devices."""

__version__ = "0.1.0"
