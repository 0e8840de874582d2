"""Calibration text (``export --calibration FILE``): the paragraphs of a UTF-8 file, blank-line separated."""

from __future__ import annotations

from pathlib import Path

from edgeinfer.errors import ExportError


def read_paragraphs(path: str | Path) -> list[str]:
    """The non-blank paragraphs of PATH, as written; a clear error if it cannot be read as UTF-8 text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"cannot read the calibration text '{path}' ({e}): give a UTF-8 text file.") from None
    return [p for p in text.split("\n\n") if p.strip()]
