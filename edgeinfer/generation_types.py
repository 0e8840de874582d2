"""Small shared types of the decode loop."""

from __future__ import annotations

# (token id, log-probability or None, source: "model", "exit@L", "draft", ...)
Emitted = tuple[int, "float | None", str]
