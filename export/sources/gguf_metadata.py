"""What a GGUF file says about its model, from the metadata alone (no torch, no transformers).

A GGUF carries no config.json and no tokenizer.json: llama.cpp stores the architecture's
hyper-parameters and the tokenizer (vocabulary, merges or scores, token types, special ids,
chat template) as key/value metadata. This module reads that header and rebuilds what the
exporter needs: a Hugging Face style ``config`` dict for the family modules in ``models/``,
a ``tokenizers`` tokenizer that encodes exactly as transformers' GGUF loader does, the chat
template, the special ids and generation defaults.

The header itself is parsed by export/sources/gguf_header.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer.export.sources.gguf_header import GGUFHeader, read_gguf_header

from edgeinfer.errors import ExportError

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values
SENTENCEPIECE_SPACE = "\u2581"

# Families the exporter builds by hand; other architectures are read but refused by export.
ARCHITECTURES = ("llama", "qwen2", "gemma3")


@dataclass
class GGUFMetadata:
    """Everything but the weights, in the shapes ``export/sources/load.py``'s SourceModel takes."""

    architecture: str
    name: str
    config: dict
    tokenizer_json: str
    chat_template: str | None
    special: dict = field(default_factory=dict)
    generation: dict = field(default_factory=dict)
    add_bos_token: bool = False
    header: GGUFHeader | None = None


# -- the header -----------------------------------------------------------------------------------------------


def gguf_config(header: GGUFHeader) -> dict:
    """The Hugging Face config (transformers 5 field names) the family modules read, from the metadata."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ExportError(f"GGUF architecture '{arch}' is not supported for export (supported: "
                          f"{', '.join(ARCHITECTURES)}).")

    def get(key: str, default=None):
        return md.get(f"{arch}.{key}", default)

    def need(key: str):
        value = get(key)
        if value is None:
            raise ExportError(f"'{header.path.name}' lacks the metadata key '{arch}.{key}': the file is incomplete.")
        return value

    heads = _uniform(need("attention.head_count"), "attention.head_count", header)
    kv_heads = _uniform(get("attention.head_count_kv", heads), "attention.head_count_kv", header)
    hidden = int(need("embedding_length"))
    names = {t.name for t in header.tensors}
    tokens = md.get("tokenizer.ggml.tokens") or []
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": _uniform(need("feed_forward_length"), "feed_forward_length", header),
        "vocab_size": int(get("vocab_size") or len(tokens)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    theta = float(get("rope.freq_base", 10000.0))
    scaling = _rope_scaling(md, arch)
    if "rope_freqs.weight" in names:  # Llama 3.1+ stores its rotary correction as a tensor, not parameters
        raise ExportError(f"'{header.path.name}' scales its rotary frequencies with a rope_freqs tensor "
                          "(Llama 3.1 style), which the GGUF reader does not rebuild yet: export the Hugging Face "
                          "folder of this model instead.")
    if arch == "llama":
        cfg["head_dim"] = int(get("rope.dimension_count") or get("attention.key_length") or hidden // heads)
        cfg["hidden_act"] = "silu"
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
        if "mistral" in str(md.get("general.name", "")).lower():
            cfg["model_type"] = "mistral"  # transformers' reading of llama.cpp's shared architecture name
    elif arch == "qwen2":
        cfg["head_dim"] = int(get("attention.key_length") or hidden // heads)
        cfg["hidden_act"] = "silu"
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default", **(scaling or {})}
    elif arch == "gemma3":
        cfg.update(_gemma3_fields(md, arch, cfg, theta, scaling))
    return cfg


def _gemma3_fields(md: dict, arch: str, cfg: dict, theta: float, scaling: dict | None) -> dict:
    layers = cfg["num_hidden_layers"]
    head_dim = int(md.get(f"{arch}.attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"])
    # llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): every 6th layer is global unless the file says;
    # sliding layers rotate with base 10000; the 27B model (62 layers) scales queries by hidden/heads.
    pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern][:layers]
    else:
        sliding = [(i + 1) % int(pattern) != 0 for i in range(layers)] if int(pattern) > 0 else [False] * layers
    scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62 else head_dim
    return {
        "model_type": "gemma3_text",
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": int(md.get(f"{arch}.attention.sliding_window") or 4096),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": float(md.get(f"{arch}.rope.freq_base_swa", 10000.0))},
            "full_attention": {"rope_type": "default", "rope_theta": theta, **(scaling or {})},
        },
        "final_logit_softcapping": md.get(f"{arch}.final_logit_softcapping"),
        "attn_logit_softcapping": md.get(f"{arch}.attn_logit_softcapping"),
    }


def _rope_scaling(md: dict, arch: str) -> dict | None:
    kind = md.get(f"{arch}.rope.scaling.type")
    factor = md.get(f"{arch}.rope.scaling.factor")
    if not kind or kind == "none" or not factor or float(factor) == 1.0:
        return None
    out = {"rope_type": str(kind), "factor": float(factor)}
    original = md.get(f"{arch}.rope.scaling.original_context_length")
    if original:
        out["original_max_position_embeddings"] = int(original)
    return out


def _uniform(value, key: str, header: GGUFHeader) -> int:
    """A per-layer array must hold one value for the exporter's uniform layers."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ExportError(f"'{header.path.name}' has a different {key} per layer, which the exporter's "
                              "uniform layers cannot hold.")
        value = value[0]
    return int(value)


# -- tokenizer ------------------------------------------------------------------------------------------------

# The pre-tokenizer split of each `tokenizer.ggml.pre` (llama.cpp's names) whose regex differs from GPT-2's.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Tokenizer models the builders below handle, and which do not: gguf's `tokenizer.ggml.model` names.
TOKENIZER_MODELS = ("gpt2", "llama")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (bytes already printable keep their own character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(header: GGUFHeader):
    """A ``tokenizers.Tokenizer`` for the vocabulary the file describes, plus (add_bos, add_eos)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    md = header.metadata
    kind = md.get("tokenizer.ggml.model")
    tokens = list(md.get("tokenizer.ggml.tokens") or [])
    as_stored = tokens  # user-defined tokens are matched as the file spells them (see below)
    if not tokens:
        raise ExportError(f"'{header.path.name}' has no tokenizer.ggml.tokens: it carries no tokenizer.")
    types = list(md.get("tokenizer.ggml.token_type") or [])
    arch = md.get("general.architecture", "")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))

    if kind == "gpt2":  # byte-level BPE (SmolLM2, Qwen2, Llama 3): tokens spelled in the byte alphabet
        spelling = byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
                 for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges") or []]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(md.get("tokenizer.ggml.pre"))
        if split:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        control_ok = alphabet  # a "control" token spelled outside the byte alphabet is a llama.cpp mislabel
    elif kind == "llama":  # SentencePiece BPE with byte fallback (Gemma, Llama 2, Mistral)
        gemma = arch.startswith("gemma")
        if gemma:  # Gemma files store runs of spaces as spaces; its merges and lookups use "▁"
            tokens = [SENTENCEPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        if gemma:  # Gemma's scores do not follow its merge order; the order of the vocabulary does
            rank = {t: -i for i, t in enumerate(tokens)}
        else:
            rank = dict(zip(tokens, md.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
        merges = md.get("tokenizer.ggml.merges")
        merges = [tuple(m.split(" ", 1)) for m in merges] if merges else merges_from_vocab(vocab, rank)
        unk_id = md.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else "<unk>"
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None,
                                   byte_fallback=True))
        steps = [decoders.Replace(SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if gemma:
            tok.normalizer = normalizers.Replace(" ", SENTENCEPIECE_SPACE)
            tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        else:
            prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SENTENCEPIECE_SPACE,
                                                         prepend_scheme="first" if prefix else "never", split=False)
            if prefix:
                steps.append(decoders.Strip(content=" ", left=1))
        tok.decoder = decoders.Sequence(steps)
        control_ok = None
    else:
        raise ExportError(f"'{header.path.name}' has a '{kind}' tokenizer; edgeinfer reads GGUF tokenizers of "
                          f"type {', '.join(TOKENIZER_MODELS)}.")

    # Control tokens (<|im_end|>, <end_of_turn>) must match whole and be skipped on decode; user-defined
    # ones (<think>, code markers) match whole but are ordinary text.
    special_ids = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")} - {None}
    control = [AddedToken(t, normalized=False, special=True) for i, t in enumerate(tokens)
               if i < len(types) and types[i] == TOKEN_CONTROL and (control_ok is None or set(t) <= control_ok)]
    extra = [AddedToken(tokens[i], normalized=False, special=True) for i in sorted(special_ids)
             if 0 <= i < len(tokens) and (i >= len(types) or types[i] != TOKEN_CONTROL)]
    tok.add_special_tokens(extra + control)
    vocab_now = tok.get_vocab()
    # transformers looks them up as stored: Gemma's space runs ("  ", respelled "▁▁") stay ordinary merges
    user = [AddedToken(t, normalized=False, special=False) for i, t in enumerate(as_stored)
            if i < len(types) and types[i] == TOKEN_USER_DEFINED and t in vocab_now]
    if user:
        tok.add_tokens(user)
    tok.post_processor = _post_processor(tokens, md, add_bos, add_eos)
    return tok, add_bos, add_eos


def _post_processor(tokens: list[str], md: dict, add_bos: bool, add_eos: bool):
    from tokenizers import processors

    def token(key):
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return (tokens[i], i) if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos") if add_bos else None, token("eos") if add_eos else None
    single = " ".join([*([f"{bos[0]}:0"] if bos else []), "$A:0", *([f"{eos[0]}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos[0]}:1"] if bos else []), "$B:1", *([f"{eos[0]}:1"] if eos else [])])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=[t for t in (bos, eos) if t])


def merges_from_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary that lists none: every split of a token into two
    tokens of the vocabulary, best-ranked token first, and within one token the longest left part first
    (the order SentencePiece's own BPE applies them in, and transformers' converters produce)."""
    found = []
    for piece, score in rank.items():
        for cut in range(len(piece) - 1, 0, -1):  # longest left part first
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((score, cut, len(right), left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(m[3], m[4]) for m in found]


# -- everything -----------------------------------------------------------------------------------------------

_SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "penalty_repeat": "repetition_penalty"}


def read_gguf_metadata(path: str | Path) -> GGUFMetadata:
    """Config, tokenizer.json, chat template, special ids and generation defaults of the GGUF at PATH."""
    header = read_gguf_header(path)
    md = header.metadata
    config = gguf_config(header)
    tok, add_bos, _ = gguf_tokenizer(header)
    tokens = md["tokenizer.ggml.tokens"]

    def token(i):
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos = md.get("tokenizer.ggml.eos_token_id")
    # llama.cpp also ends a turn at the end-of-turn / end-of-message tokens when the file names them
    stops = [i for i in (eos, md.get("tokenizer.ggml.eot_token_id"), md.get("tokenizer.ggml.eom_token_id"))
             if isinstance(i, int) and 0 <= i < len(tokens)]
    bos = md.get("tokenizer.ggml.bos_token_id")
    special = {
        "bos_token_id": bos, "eos_token_ids": sorted(set(stops)),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
        "bos_token": token(bos), "eos_token": token(eos),
    }
    generation = {}
    for key, name in _SAMPLING_KEYS.items():
        value = md.get(f"general.sampling.{key}")
        if value is not None:
            generation[name] = value
    name = str(md.get("general.name") or Path(path).stem)
    return GGUFMetadata(architecture=md["general.architecture"], name=name, config=config,
                        tokenizer_json=tok.to_str(), chat_template=md.get("tokenizer.chat_template"),
                        special=special, generation=generation, add_bos_token=add_bos, header=header)


def config_json(meta: GGUFMetadata) -> str:
    """The config as config.json text (for writing an HF-style folder next to a package, or debugging)."""
    return json.dumps(meta.config, indent=1)
