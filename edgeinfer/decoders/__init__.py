"""Decoder back-ends behind one protocol (base.py): the staged chain of stage graphs over per-stage
KV caches (staged.py, kv_cache.py), the monolithic optimum graph (monolithic.py) and the
static-shape NPU graphs (static.py). The sparse-MoE decoder is edgeinfer.moe.decoder."""

from .base import Decoder
from .staged import StagedDecoder

__all__ = ["Decoder", "StagedDecoder"]
