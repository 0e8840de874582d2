"""Static QDQ quantization of a float npu graph with onnxruntime's quantizer.

Weights become int8 (symmetric, one scale per output channel) or int4 where
asked; activations get calibrated scales — 16-bit by default (``A16W8``): the
residual stream and the attention scores of a language model have a range that
8-bit activations cannot resolve (see docs/providers.md for the measured gap).
The QNN flavour of the quantizer config is used because its overrides keep
every node in a form the QNN HTP backend accepts (e.g. matching scales where an
op requires them); the same graph runs on the CPU and OpenVINO providers.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgeinfer.errors import ExportError

ACTIVATION_BITS = (8, 16)
WEIGHT_BITS = (4, 8)


def quantize_qdq(float_path: Path, out_path: Path, reader, activation_bits: int = 16, weight_bits: int = 8,
                 fixed_ranges: dict[str, tuple[float, float]] | None = None) -> None:
    """Write the QDQ model of FLOAT_PATH to OUT_PATH (weights in OUT_PATH.data), calibrated on READER's feeds.

    FIXED_RANGES: tensor name -> (min, max) used instead of the calibrated range (the KV cache edges, which
    two graphs must quantize identically)."""
    if activation_bits not in ACTIVATION_BITS or weight_bits not in WEIGHT_BITS:
        raise ExportError(f"npu quantization takes {ACTIVATION_BITS} activation bits and {WEIGHT_BITS} weight bits.")
    try:
        from onnxruntime.quantization import CalibrationMethod, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    except ImportError as e:  # onnxruntime's quantization tools need onnx
        raise ExportError(f"the npu target needs onnxruntime's quantization tools ({e}): pip install "
                          "'edgeinfer[export]'.") from None
    weight_type = QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8
    config = get_qnn_qdq_config(
        str(float_path), reader, calibrate_method=CalibrationMethod.MinMax,
        activation_type=QuantType.QUInt16 if activation_bits == 16 else QuantType.QUInt8,
        weight_type=QuantType.QInt8, per_channel=True, weight_symmetric=True,
        init_overrides={**per_channel_overrides(float_path, weight_type),
                        **{name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                           for name, (lo, hi) in (fixed_ranges or {}).items()}})
    config.use_external_data_format = True
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs generic advice on the root logger
    try:
        with _calibration_sessions_fit_process():
            quantize(str(float_path), str(out_path), config)
    finally:
        root.setLevel(level)


@contextmanager
def _calibration_sessions_fit_process():
    """The calibrator makes its session with default options, which onnxruntime refuses once this process
    runs models on the shared global thread pool (edgeinfer.load before an export): give it options that fit."""
    import onnxruntime as ort
    from edgeinfer.runtimes.cpu import compatible_session_options
    from onnxruntime.quantization.calibrate import CalibraterBase

    original = CalibraterBase.create_inference_session

    def create_inference_session(self):
        so = compatible_session_options()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so,
                                                  providers=self.execution_providers)

    CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        CalibraterBase.create_inference_session = original


def per_channel_overrides(float_path: Path, weight_type) -> dict:
    """One symmetric scale per output channel for every MatMul weight (axis 1 of a (in, out) weight):
    the quantizer's QNN config leaves MatMul weights per-tensor, which a (576, 49152) LM head cannot afford."""
    import onnx

    model = onnx.load_model(str(float_path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return {n.input[1]: [{"quant_type": weight_type, "symmetric": True, "axis": 1}]
            for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
