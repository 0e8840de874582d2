"""Read a model from wherever the user points: an alias, a ``.gguf`` file, a
Hugging Face folder, or a hub id. Everything ends up as one :class:`SourceModel`
(config dict, float32 numpy state dict, tokenizer.json, chat template, special ids,
and for GGUF files the quantized blocks as the file holds them).

The hand-built families are read without torch: GGUF files with the ``gguf`` package
(export/sources/gguf_header.py reads the header, export/sources/gguf_metadata.py the config and tokenizer,
export/sources/gguf_tensors.py the weights),
Hugging Face folders with ``safetensors`` (export/sources/hf_folder.py). Other families, hub ids and
other GGUF architectures go through transformers; the tests check the torch-free readers
against transformers' reading of the same files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgeinfer.export.sources.aliases import resolve_alias

from edgeinfer.errors import ExportError


@dataclass
class SourceModel:
    name: str
    kind: str  # "gguf" | "hf-folder" | "hub"
    location: str
    config: dict
    state_dict: dict[str, np.ndarray]
    tokenizer_json: str
    chat_template: str | None
    special: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    # GGUF sources: the quantized matrices as the file holds them (export/sources/gguf_tensors.py), their
    # ggml types by Hugging Face name, and the tensors whose type has no exact form
    blocks: dict = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)
    requantized: dict[str, list[str]] = field(default_factory=dict)


def describe_source(source: str) -> tuple[str, Path | str, str | None]:
    """Classify SOURCE: returns (kind, path or hub id, gguf file name or None)."""
    alias = resolve_alias(source)
    if alias is not None:
        return "gguf", alias.parent, alias.name
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ExportError(f"GGUF file '{source}' does not exist: check the path.")
        return "gguf", path.resolve().parent, path.name
    if path.is_dir():
        if (path / "model.bin").is_file() and (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
            raise ExportError(f"'{source}' looks like a CTranslate2 folder; only its Whisper models are read, "
                              "and not by this decoder exporter yet.")
        if not (path / "config.json").is_file():
            raise ExportError(f"'{source}' is a folder without config.json: point at a Hugging Face model folder, "
                              "a .gguf file or an alias (smollm2-135m, gemma3-270m).")
        return "hf-folder", path.resolve(), None
    if path.exists():
        raise ExportError(f"'{source}' is neither a .gguf file nor a model folder.")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub", source, None
    raise ExportError(f"'{source}' is not a file, folder, hub id or known alias "
                      "(aliases: smollm2-135m, gemma3-270m).")


# architectures read without torch (their tensors by export/sources/gguf_tensors.py, their config and tokenizer by
# export/sources/gguf_metadata.py); model types whose Hugging Face folders export/sources/hf_folder.py reads
GGUF_TENSOR_ARCHS = ("llama", "qwen2", "gemma3")
HF_FOLDER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")


def load_source(source: str) -> SourceModel:
    """Load SOURCE into float32 numpy weights (and, for a GGUF file, its quantized blocks)."""
    kind, where, gguf_file = describe_source(source)
    if gguf_file:  # untrusted header: counts, lengths and extents checked against the file size first
        from edgeinfer.export.sources.gguf_check import check_gguf

        path = Path(where) / gguf_file
        check_gguf(path)
        from edgeinfer.export.sources.gguf_metadata import read_gguf_metadata

        try:
            meta = read_gguf_metadata(path)
        except (KeyError, ValueError, NotImplementedError):
            meta = None  # an architecture or tokenizer the metadata reader does not know: transformers reads it
        if meta is not None and meta.architecture in GGUF_TENSOR_ARCHS:
            return _gguf_source(path, meta)
    elif kind == "hf-folder" and _model_type(Path(where)) in HF_FOLDER_TYPES:
        from edgeinfer.export.sources.hf_folder import read_hf_folder

        return read_hf_folder(where)
    return _load_with_transformers(source, kind, where, gguf_file)


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def _gguf_source(path: Path, meta) -> SourceModel:
    from edgeinfer.export.sources.gguf_header import GGUFTensorTable
    from edgeinfer.export.sources.gguf_tensors import read_gguf_tensors

    cfg = meta.config.get("text_config", meta.config)
    heads = int(cfg["num_attention_heads"])
    tensors = read_gguf_tensors(path, meta.architecture, heads, int(cfg.get("num_key_value_heads") or heads),
                                reader=GGUFTensorTable(meta.header))
    return SourceModel(name=path.stem, kind="gguf", location=str(path), config=meta.config,
                       state_dict=tensors.floats, tokenizer_json=meta.tokenizer_json,
                       chat_template=meta.chat_template, special=meta.special, generation=meta.generation,
                       blocks=tensors.blocks, tensor_types=tensors.types, requantized=tensors.requantized)


def _load_with_transformers(source: str, kind: str, where, gguf_file: str | None) -> SourceModel:
    """Load SOURCE with transformers (the families and sources the torch-free readers do not cover)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ExportError("this source is read through transformers: "
                          "pip install 'edgeinfer[dev]' (torch, transformers).") from e
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ExportError(f"'{where}' looks like a hub id, but HF_HUB_OFFLINE=1: download it first "
                          "or give a local path.")
    try:
        config = AutoConfig.from_pretrained(str(where), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(where), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32, **kwargs)
        gen = getattr(model, "generation_config", None)
    except OSError as e:
        if kind == "hub":
            raise ExportError(f"could not fetch '{where}' from the hub ({_first_line(e)}): check the id and "
                              "the network, or give a local folder.") from e
        raise ExportError(f"could not read '{source}': {_first_line(e)}") from e
    state_dict = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    cfg = config.to_dict()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"'{source}' has no fast tokenizer (tokenizer.json); edgeinfer needs one.")
    gen_dict = gen.to_dict() if gen is not None else {}
    eos = gen_dict.get("eos_token_id", tokenizer.eos_token_id)
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(int(tokenizer.eos_token_id))
    special = {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_ids": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
    }
    generation = {k: gen_dict[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")
                  if gen_dict.get(k) is not None}
    name = Path(gguf_file).stem if gguf_file else str(where).rstrip("/").split("/")[-1]
    return SourceModel(name=name, kind=kind, location=str(Path(where) / gguf_file) if gguf_file else str(where),
                       config=json.loads(json.dumps(cfg, default=str)), state_dict=state_dict,
                       tokenizer_json=backend.to_str(), chat_template=getattr(tokenizer, "chat_template", None),
                       special=special, generation=generation)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
