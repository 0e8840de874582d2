"""Continuous batching: several generations of one model decoded together (engine.py), over
per-sequence KV slots of the stage graphs (slots.py)."""

from .engine import BatchEngine, SlotStrategy

__all__ = ["BatchEngine", "SlotStrategy"]
