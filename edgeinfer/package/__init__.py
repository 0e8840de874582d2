"""The model package: the manifest schema (manifest.py: written by export/, read by the
runtime) and the reader that checks a package folder before anything is opened (reader.py)."""

from .manifest import (
    AudioSpec,
    ExitEntry,
    ExpertsSpec,
    GenerationSpec,
    GraphEntry,
    KVCacheSpec,
    Manifest,
    StaticSpec,
    TokenizerSpec,
)
from .reader import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    Package,
    check_manifest,
    open_package,
    safe_member,
    sha256_file,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "MAX_MANIFEST_BYTES", "AudioSpec", "ExitEntry",
           "GenerationSpec", "GraphEntry", "KVCacheSpec", "ExpertsSpec", "StaticSpec",
           "Manifest", "Package", "TokenizerSpec", "check_manifest", "open_package", "safe_member", "sha256_file"]
