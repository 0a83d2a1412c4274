"""Quantized artifacts: INT8 Q/DQ graphs calibrated on real requests (`fusion-export quantize`).

calibration_set -> calibrate (activation ranges, through the artifact's own graphs) -> qdq (graph rewrite)
-> quantize (the command's staging, manifest and checks).
"""
