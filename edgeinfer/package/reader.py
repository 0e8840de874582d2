"""The model package: a folder with an ``edgeinfer.json`` manifest, ONNX graphs,
and a tokenizer. This module reads and checks it; ``export/package_writer.py``
writes it. Nothing here trusts the package: every path is confined to the
package folder and every file is checked against the manifest before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from edgeinfer.errors import PackageError
from edgeinfer.jsonfile import read_json_object

from .manifest import GraphEntry, KVCacheSpec, Manifest, TokenizerSpec

MANIFEST = "edgeinfer.json"
FORMAT_NAME = "edgeinfer-package"
FORMAT_VERSION = (1, 0)  # (major, minor): a newer major is refused, a newer minor is read
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# beside the package cache (edgeinfer/package_cache.py): $EDGEINFER_HOME, else ~/.cache/edgeinfer
_VERIFY_CACHE = Path(os.environ.get("EDGEINFER_CACHE") or os.environ.get("EDGEINFER_HOME")
                     or Path.home() / ".cache" / "edgeinfer").expanduser() / "verified.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_member(root: Path, rel: str) -> Path:
    """Resolve a manifest path inside ROOT, refusing anything that could leave it."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise PackageError(f"package manifest has an invalid file path {rel!r}: re-export the package.")
    p = Path(rel)
    if not p.parts:  # "." or "./": the package folder itself, not a file in it (found by hypothesis)
        raise PackageError(f"package manifest has an invalid file path {rel!r}: re-export the package.")
    if p.is_absolute() or rel.startswith(("/", "\\")) or ".." in p.parts or ":" in p.parts[0]:
        raise PackageError(f"package manifest path '{rel}' points outside the package: refusing to open it.")
    full = root / p
    try:
        resolved = full.resolve(strict=False)
    except OSError as e:
        raise PackageError(f"package path '{rel}' cannot be resolved ({e}).") from None
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise PackageError(f"package file '{rel}' is a link leading outside the package: refusing to open it.")
    return full


@dataclass
class Package:
    """A checked model package on disk: ``manifest`` is the JSON as written (its file table
    checked), ``spec`` its typed view (edgeinfer.package.manifest), what the runtime reads."""

    root: Path
    manifest: dict

    @cached_property
    def spec(self) -> Manifest:
        return Manifest.from_dict(self.manifest)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def name(self) -> str:
        return self.spec.name or self.root.name

    @property
    def format_version(self) -> list[int]:
        return list(self.manifest["format_version"])

    @property
    def files(self) -> dict[str, dict]:
        """The file table: relative path -> {"size", "sha256"} (checked by open_package)."""
        return self.manifest["files"]

    @property
    def size_bytes(self) -> int:
        return sum(int(meta.get("size", 0)) for meta in self.files.values())

    @property
    def stages(self) -> list[GraphEntry]:
        return self.spec.stages

    @property
    def kv_cache(self) -> KVCacheSpec:
        return self.spec.kv_cache

    @property
    def tokenizer(self) -> TokenizerSpec:
        return self.spec.tokenizer

    def path(self, rel: str) -> Path:
        """A file of the package, confined to its folder; one the manifest's file table does not
        list (so its size and hash were never checked) is refused."""
        files = self.manifest.get("files")
        if isinstance(files, dict) and rel not in files:
            raise PackageError(f"package file '{rel}' is not in the manifest's file table, so it was never "
                               "checked: refusing to open it; re-export the package.")
        return safe_member(self.root, rel)

    def verify(self, full: bool = True) -> None:
        """Check every listed file: size always; sha256 when ``full``."""
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise PackageError(f"package '{self.root}' lists no files in its manifest: re-export it.")
        for rel, meta in files.items():
            p = self.path(rel)
            if not p.is_file():
                raise PackageError(f"package file '{rel}' is missing: the package is incomplete, re-export it.")
            size = p.stat().st_size
            if size != meta.get("size"):
                raise PackageError(f"package file '{rel}' has {size} bytes, the manifest says {meta.get('size')}: "
                                   "it is truncated or altered, re-export the package.")
            if full and sha256_file(p) != meta.get("sha256"):
                raise PackageError(f"package file '{rel}' does not match its sha256 in the manifest: "
                                   "it is corrupt or altered, re-export the package.")


def open_package(path: str | os.PathLike, verify: bool | None = None) -> Package:
    """Read and check a package. ``verify``: True = hash every file, False = sizes
    only, None = hash files not already verified with the same size and mtime."""
    root = Path(path).expanduser()
    if not root.exists():
        raise PackageError(f"no model package at '{path}': export one with 'edgeinfer export SOURCE -o {path}'.")
    if not root.is_dir():
        raise PackageError(f"'{path}' is a file, not a model package folder.")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise PackageError(f"'{path}' has no {MANIFEST}: it is not an edgeinfer package "
                           "(or its export did not finish).")
    manifest = read_json_object(mpath, error=PackageError, remedy="the package is corrupt, re-export it",
                                what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    check_manifest(manifest, mpath)
    pkg = Package(root, manifest)
    pkg.spec  # noqa: B018  (parse the typed view now: a malformed section fails here, in one sentence)
    for rel in manifest["files"]:
        pkg.path(rel)  # refuse escaping paths before anything is opened
    _refuse_escaping_links(root)
    if verify is None:
        _verify_cached(pkg)
    else:
        pkg.verify(full=verify)
    return pkg


def _refuse_escaping_links(root: Path) -> None:
    """No link anywhere in the package may lead outside it (a graph's external data
    could otherwise name an unlisted link; onnxruntime itself refuses '..' and
    absolute external-data paths)."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                target = p.resolve()
                if target != base and base not in target.parents:
                    rel = p.relative_to(root).as_posix()
                    raise PackageError(f"package file '{rel}' is a link leading outside the package: "
                                       "refusing to open it.")


def check_manifest(manifest: dict, where: Path | str = MANIFEST) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PackageError(f"'{where}' is not an edgeinfer manifest (no 'format': '{FORMAT_NAME}').")
    version = manifest.get("format_version")
    if not (isinstance(version, list) and len(version) == 2 and all(isinstance(v, int) for v in version)):
        raise PackageError(f"'{where}' has an invalid format_version {version!r}: re-export the package.")
    if version[0] > FORMAT_VERSION[0]:
        raise PackageError(f"package was exported for format {version[0]}, this runtime reads format "
                           f"{FORMAT_VERSION[0]}: upgrade edgeinfer.")
    if version[0] < FORMAT_VERSION[0]:
        raise PackageError(f"package format {version[0]} is older than this runtime's {FORMAT_VERSION[0]}: "
                           "re-export it with this edgeinfer.")
    for key in ("graphs", "files", "tokenizer", "kv_cache"):
        if key not in manifest:
            raise PackageError(f"'{where}' lacks '{key}': the package is incomplete, re-export it.")
    if not isinstance(manifest["files"], dict):
        raise PackageError(f"'{where}' has a malformed 'files' table: re-export the package.")


def _verify_cached(pkg: Package) -> None:
    pkg.verify(full=False)
    try:
        cache = json.loads(_VERIFY_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    key = str(pkg.root.resolve())
    stamp = {rel: [pkg.path(rel).stat().st_size, pkg.path(rel).stat().st_mtime_ns, meta.get("sha256")]
             for rel, meta in pkg.manifest["files"].items()}
    if cache.get(key) == stamp:
        return
    pkg.verify(full=True)
    cache[key] = stamp
    try:
        _VERIFY_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _VERIFY_CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, _VERIFY_CACHE)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
