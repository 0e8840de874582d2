"""What every export pipeline returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeinfer.package import Manifest


@dataclass
class ExportResult:
    path: Path
    manifest: dict  # as written
    size_bytes: int

    @property
    def spec(self) -> Manifest:
        """The typed view of the written manifest (edgeinfer.package.manifest)."""
        return Manifest.from_dict(self.manifest)
