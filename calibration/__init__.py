"""Calibration sets and per-expert quantization (installed as `medmoe_edge.calibration`).

Holds the per-domain calibration/evaluation data machinery; filled in by the
calibration and quantization work (see README "Roadmap").
"""
