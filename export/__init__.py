"""The build side of edgeinfer: read a model, build staged ONNX graphs, quantize,
write a model package. Needs the ``export`` extra (onnx, gguf, safetensors, ...).

``export_model`` is imported on first use, so light modules of this package (aliases,
gguf_metadata, hf_folder) can be imported without loading the graph builders."""

__all__ = ["ExportResult", "export_model"]


def __getattr__(name):
    if name in __all__:
        from . import exporter

        return getattr(exporter, name)
    raise AttributeError(name)
