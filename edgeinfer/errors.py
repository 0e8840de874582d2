"""Errors a user can meet. Each message is one sentence: what is wrong, what to do."""


class EdgeInferError(Exception):
    """Base class of every error edgeinfer raises on purpose."""


class PackageError(EdgeInferError):
    """A model package is missing, corrupt, tampered with, or of an unknown format."""


class ExportError(EdgeInferError):
    """An export could not be done (bad source, missing dependency, unsupported family)."""


class ContextLengthError(EdgeInferError):
    """The prompt (plus generation) does not fit the context the model was loaded with."""


class ProviderError(EdgeInferError):
    """An execution provider is unknown or not available on this machine."""


class GenerationError(EdgeInferError):
    """Invalid generation parameters."""


class EvaluationError(EdgeInferError):
    """A perplexity evaluation cannot be done (unreadable or too short text, mismatched packages)."""


class MemoryBudgetError(EdgeInferError):
    """A memory budget is malformed, or too small for the model (dense weights and KV cache, or MoE experts)."""
