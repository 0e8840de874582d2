"""Read a Hugging Face model folder without torch or transformers.

config.json, tokenizer.json (+ tokenizer_config.json / chat_template.jinja for the chat template
and special tokens), generation_config.json, and the weights of ``*.safetensors`` files (one file
or a sharded ``model.safetensors.index.json``), read into float32 numpy arrays. bf16, which numpy
lacks, is read as its raw 16 bits and widened (a bf16 value is the top half of a float32).

The safetensors layout is read here directly: an 8-byte little-endian header length, a JSON
header of ``{name: {dtype, shape, data_offsets}}``, then the raw bytes. Every extent is checked
against the file before it is touched (the folder is untrusted input).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np
from edgeinfer.export.sources.load import SourceModel

from edgeinfer.errors import ExportError
from edgeinfer.jsonfile import read_json_object

MAX_HEADER = 100 * 1024 * 1024
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "U16": np.uint16, "U32": np.uint32, "U64": np.uint64}
INDEX = "model.safetensors.index.json"


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bf16 bits (uint16) to float32: the 16 bits become the high half of each float."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one .safetensors file (NAMES only, if given): floats as float32, integers as stored."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 8:
                raise ExportError(f"'{path}' is not a safetensors file (only {size} bytes).")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                (n,) = struct.unpack_from("<Q", buf, 0)
                if n > min(MAX_HEADER, size - 8):
                    raise ExportError(f"'{path}' has a header of {n} bytes, past its end: the file is damaged.")
                try:
                    header = json.loads(bytes(buf[8:8 + n]))
                except (ValueError, UnicodeDecodeError):
                    raise ExportError(f"'{path}' has an unreadable header: the file is damaged.") from None
                if not isinstance(header, dict):
                    raise ExportError(f"'{path}' has an unreadable header: the file is damaged.")
                start = 8 + n
                for name, meta in header.items():
                    if name == "__metadata__" or (names is not None and name not in names):
                        continue
                    out[name] = _tensor(buf, path, name, meta, start, size)
    except OSError as e:
        raise ExportError(f"cannot read '{path}': {e.strerror or e}.") from None
    return out


def _tensor(buf, path: Path, name: str, meta, start: int, size: int) -> np.ndarray:
    try:
        dtype = _DTYPES[meta["dtype"]]
        shape = [int(d) for d in meta["shape"]]
        begin, end = (int(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"'{path}' describes tensor '{name}' in a way this reader does not know "
                          f"({str(meta)[:80]}).") from None
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * np.dtype(dtype).itemsize
    if begin < 0 or end - begin != nbytes or start + end > size or any(d < 0 for d in shape):
        raise ExportError(f"tensor '{name}' of '{path}' lies outside the file or has the wrong size: "
                          "the file is damaged.")
    raw = np.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).reshape(shape)
    if meta["dtype"] == "BF16":
        return bf16_to_float32(raw)
    if np.issubdtype(dtype, np.floating):
        return raw.astype(np.float32)  # a copy: the map closes when the file does
    return raw.copy()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding FOLDER's weights (the shards of an index, or every *.safetensors)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ExportError(f"'{index}' is not a valid safetensors index: the folder is damaged.") from None
        files = []
        for rel in dict.fromkeys(weight_map.values()):
            p = folder / str(rel)
            if Path(rel).is_absolute() or ".." in Path(rel).parts or not p.is_file():
                raise ExportError(f"'{index}' names the shard '{rel}', which is not a file in the folder: "
                                  "the download is incomplete.")
            files.append(p)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (it has PyTorch weights {', '.join(bins[:2])}: reading those needs torch; save the model with "
                "safe_serialization or install the dev extra)") if bins else ""
        raise ExportError(f"'{folder}' has no .safetensors weights{hint}.")
    return files


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of FOLDER's safetensors weights, by its Hugging Face name."""
    state: dict[str, np.ndarray] = {}
    for path in weight_files(Path(folder)):
        state.update(read_safetensors(path))
    return state


def _read_json(path: Path) -> dict:
    """A config file of the folder; {} where the folder has none."""
    if not path.is_file():
        return {}
    return read_json_object(path, error=ExportError, remedy="the folder is damaged, download it again")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    jinja = folder / "chat_template.jinja"  # transformers 5 saves it beside the tokenizer
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None


def _tokenizer(folder: Path, tok_cfg: dict):
    from tokenizers import Tokenizer, processors

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"'{folder}' has no tokenizer.json: edgeinfer needs a fast tokenizer (save it with "
                          "transformers' PreTrainedTokenizerFast, or export a GGUF of the model).")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ExportError(f"'{path}' cannot be read by the tokenizers library ({str(e)[:120]}).") from None
    # tokenizer_config's add_bos_token / add_eos_token, when set, override the file's post-processor
    # (transformers' TokenizersBackend.update_post_processor does the same)
    add_bos, add_eos = tok_cfg.get("add_bos_token"), tok_cfg.get("add_eos_token")
    if add_bos is not None or add_eos is not None:
        bos, eos = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))
        add_bos, add_eos = bool(add_bos) and bos is not None, bool(add_eos) and eos is not None
        single = " ".join([*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])])
        pair = " ".join([single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])])
        specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        if all(i is not None for _, i in specials):
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def read_hf_folder(folder: str | Path, weights: bool = True) -> SourceModel:
    """Config, float32 weights (unless WEIGHTS is False), tokenizer, chat template, special ids and
    generation defaults of a Hugging Face folder."""
    folder = Path(folder).expanduser()
    config = _read_json(folder / "config.json")
    if not config:
        raise ExportError(f"'{folder}' has no readable config.json: point at a Hugging Face model folder.")
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
    tok = _tokenizer(folder, tok_cfg)

    def token_id(text):
        return tok.token_to_id(text) if text is not None else None

    bos, eos, pad = (_token_text(tok_cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    eos_cfg = gen.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = {int(e) for e in (eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]) if e is not None}
    if token_id(eos) is not None:
        eos_ids.add(token_id(eos))
    special = {"bos_token_id": token_id(bos), "eos_token_ids": sorted(eos_ids), "pad_token_id": token_id(pad),
               "bos_token": bos, "eos_token": eos}
    generation = {k: gen[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty")
                  if gen.get(k) is not None}
    state = read_state_dict(folder) if weights else {}
    return SourceModel(name=folder.resolve().name, kind="hf-folder", location=str(folder), config=config,
                       state_dict=state, tokenizer_json=tok.to_str(), chat_template=_chat_template(folder, tok_cfg),
                       special=special, generation=generation)
