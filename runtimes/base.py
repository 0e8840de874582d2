"""Provider registry and session creation shared by every provider module."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from edgeinfer.errors import PackageError, ProviderError

from . import cpu


@dataclass(frozen=True)
class ExecutionTarget:
    """A resolved provider with the options its sessions are created with."""

    name: str  # short name: cpu, cuda, ...
    ort_name: str  # onnxruntime's provider name
    options: dict = field(default_factory=dict)
    threads: int | None = None


# short name -> (onnxruntime provider name, module that configures it)
PROVIDERS = {"cpu": ("CPUExecutionProvider", cpu)}
AUTO_ORDER = ["cpu"]


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [short for short, (name, _) in PROVIDERS.items() if name in have]


def resolve_provider(name: str = "auto", threads: int | None = None) -> ExecutionTarget:
    name = (name or "auto").lower()
    if name == "auto":
        for short in AUTO_ORDER:
            if short in available_providers():
                name = short
                break
    if name not in PROVIDERS:
        raise ProviderError(f"unknown execution provider '{name}': choose one of auto, {', '.join(PROVIDERS)}.")
    if name not in available_providers():
        raise ProviderError(f"execution provider '{name}' is not available in this onnxruntime build "
                            f"(available: {', '.join(available_providers())}).")
    ort_name, module = PROVIDERS[name]
    return ExecutionTarget(name, ort_name, module.provider_options(), threads)


def create_session(path: Path, target: ExecutionTarget) -> ort.InferenceSession:
    """One inference session for a graph of a (verified) package."""
    _, module = PROVIDERS[target.name]
    so = module.session_options(target.threads)
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=so,
                                    providers=[(target.ort_name, target.options)])
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0][:300]
        raise PackageError(f"graph '{path.name}' could not be loaded by onnxruntime ({msg}): "
                           "the package is corrupt or was built for another runtime.") from None
