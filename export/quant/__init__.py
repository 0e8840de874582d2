"""Quantization: block-wise int4/int8 (and how blocks are fitted), static QDQ for the npu target, its calibration."""
