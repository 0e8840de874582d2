"""Read a JSON object from a file that may be hostile: bounded in size, one-sentence errors."""

from __future__ import annotations

import json
from pathlib import Path

MAX_JSON_BYTES = 64 * 1024 * 1024  # configs, manifests and vocabularies are far smaller


def read_json_object(path: Path, *, error: type[Exception], remedy: str, what: str = "config",
                     max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in PATH. A file over MAX_BYTES, one that is not JSON, or JSON that is
    not an object raise ERROR with one sentence that names WHAT the file should be and ends
    with REMEDY."""
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise error(f"'{path}' is larger than {max_bytes} bytes: not a valid {what}; {remedy}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"'{path}' is not valid JSON ({e}): {remedy}.") from None
    if not isinstance(data, dict):
        raise error(f"'{path}' should hold a JSON object (a {what}): {remedy}.")
    return data
