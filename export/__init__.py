"""Exporters (installed as `medmoe_edge.export`): ONNX, GGUF and TensorRT builds of a Med-MoE checkpoint.

Each format is an `medmoe_edge.exporter.Exporter` subclass (`onnx_export.OnnxExporter`,
`gguf_export.GgufExporter`), registered in pyproject.toml's `medmoe_edge.exporters` entry-point
group exactly as a third-party exporter would be; the CLI finds them through that registry. Every
exporter names tensors through `medmoe_edge.tensor_ids` and writes a bundle whose manifest the
shared builder makes. This package imports nothing from `medmoe_edge.runtimes` (nor the reverse).
"""
