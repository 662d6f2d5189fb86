"""Exporters (installed as `medmoe_edge.export`): ONNX, GGUF and TensorRT builds of a Med-MoE checkpoint.

Exporters are added per target; each consumes the same reference model and writes a
bundle with a manifest (see the project README for the status of each target).
"""
