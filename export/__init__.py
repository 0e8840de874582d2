"""The build side of edgeinfer: read a model, build staged ONNX graphs, quantize,
write a model package. Needs the ``export`` extra (torch, transformers, gguf)."""

from .exporter import ExportResult, export_model

__all__ = ["ExportResult", "export_model"]
