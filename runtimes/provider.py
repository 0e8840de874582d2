"""The record every provider module fills in: what the provider is, and what differs from a
classic host-memory provider that takes every package (the defaults)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeinfer.package import Manifest


def _no_library() -> str | None:
    return None


def _takes_every_package(spec) -> str | None:
    return None


def _no_config(spec) -> dict:
    return {}


def _not_emulated(devices: list) -> bool:
    return False


@dataclass(frozen=True)
class Provider:
    name: str  # short name: cpu, cuda, ...
    ort_name: str  # onnxruntime's provider name
    device_kind: str  # cpu | gpu | npu
    needs: dict  # static_shapes, qdq, fp16, note: what its graphs must be (info, docs)
    install: str  # how to get it
    session_options: Callable  # (threads) -> ort.SessionOptions
    device_memory: str = "cpu"  # where IO-bound buffers (the KV cache) live
    plugin_library: Callable[[], str | None] = _no_library  # a plugin provider's library, if it ships here
    provider_options: Callable[[], dict] = dict
    companions: Callable[[], list] = list  # other providers its sessions list after it
    accepts: Callable[[Manifest | None], str | None] = _takes_every_package  # why it refuses a package, or None
    session_config: Callable[[Manifest | None], dict] = _no_config  # session config entries for a package
    emulated: Callable[[list], bool] = _not_emulated  # its devices are an emulation: auto never picks it
