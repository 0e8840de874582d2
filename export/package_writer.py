"""Write a model package atomically: everything goes to a temporary sibling
folder, the manifest (with every file's sha256) is written last, and the folder
is renamed into place. An interrupted export leaves no half package, and an
existing package is replaced only with ``force``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgeinfer.errors import ExportError
from edgeinfer.package import FORMAT_NAME, FORMAT_VERSION, MANIFEST, Manifest, sha256_file

PARTIAL = ".partial-"


@contextmanager
def staging_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it becomes OUT."""
    out = out.expanduser().absolute()
    if out.exists() and not force:
        raise ExportError(f"'{out}' already exists: choose another -o or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"'{out}' exists and is not a folder: remove it or choose another -o.")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        _swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"the disk is full while writing '{out}': free some space and export again "
                              "(nothing was left behind).") from e
        raise ExportError(f"could not write the package to '{out}': {e.strerror or e}.") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders of exports that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}{PARTIAL}*"):
        pid = p.name[len(f".{out.name}{PARTIAL}"):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    # Replace in one atomic step (Linux renameat2 RENAME_EXCHANGE): at every instant either
    # the old or the new package is at OUT, even if the process is killed right here.
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old package
        return
    old = out.parent / f".{out.name}{PARTIAL}{os.getpid()}-old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def write_manifest(folder: Path, spec: Manifest | dict) -> dict:
    """Hash every file under FOLDER into the manifest SPEC and write it (last); returns it as written.
    (A dict is written as it is: the tests' deliberately damaged manifests.)"""
    manifest = spec.to_dict() if isinstance(spec, Manifest) else dict(spec)
    manifest.pop("files", None)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = {"format": FORMAT_NAME, "format_version": list(FORMAT_VERSION), **manifest, "files": files}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest
