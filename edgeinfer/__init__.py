"""edgeinfer: a lean on-device inference runtime for small language models.

    import edgeinfer
    model = edgeinfer.load("smollm2-int4")
    for event in model.chat([{"role": "user", "content": "Hi"}]):
        print(event.text, end="", flush=True)

``import edgeinfer`` pulls in onnxruntime, numpy and tokenizers only.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ContextLengthError,
    EdgeInferError,
    ExportError,
    GenerationError,
    PackageError,
    ProviderError,
)


def __getattr__(name):
    # Lazy: keeps `import edgeinfer` cheap and lets the build side import errors alone.
    if name in ("load", "Model"):
        from . import model

        return getattr(model, name)
    if name in ("GenerationConfig", "TokenEvent", "GenerationResult"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(name)


__all__ = ["load", "Model", "GenerationConfig", "TokenEvent", "GenerationResult", "EdgeInferError", "PackageError",
           "ExportError", "ContextLengthError", "ProviderError", "GenerationError", "__version__"]
