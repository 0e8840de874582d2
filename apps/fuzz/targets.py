"""Fuzz targets: every parser of untrusted input, fed arbitrary bytes.

Each target takes bytes and must either succeed or raise the project's own
error for that input (a one-sentence message); anything else — another
exception, a hang, a crash of the process — is a finding. Seeds are small
valid inputs built here, so the fuzzer starts from the real formats.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import wave
from pathlib import Path

import numpy as np

from edgeinfer.errors import EdgeInferError

_TMP = Path(tempfile.mkdtemp(prefix="edgeinfer-fuzz-"))


def _write(name: str, data: bytes) -> Path:
    path = _TMP / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- package manifest -----------------------------------------------------------
def manifest_seed() -> bytes:
    return json.dumps({
        "format": "edgeinfer-package", "format_version": [1, 0], "kind": "decoder",
        "graphs": [{"name": "stage0", "role": "stage", "path": "graphs/stage0.onnx", "layers": [0, 2]}],
        "files": {"graphs/stage0.onnx": {"size": 4, "sha256": "0" * 64}, "tokenizer.json": {"size": 2}},
        "tokenizer": {"file": "tokenizer.json", "bos_token_id": 1}, "kv_cache": {"max_context": 64},
    }).encode()


def manifest_target(data: bytes) -> None:
    from edgeinfer.package import open_package

    root = _TMP / "pkg"
    (root / "graphs").mkdir(parents=True, exist_ok=True)
    (root / "graphs" / "stage0.onnx").write_bytes(b"onnx")
    (root / "tokenizer.json").write_bytes(b"{}")
    (root / "edgeinfer.json").write_bytes(data)
    open_package(root, verify=False)


# -- GGUF header --------------------------------------------------------------------
def gguf_seed() -> bytes:
    import gguf

    path = _TMP / "seed.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 2)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def gguf_target(data: bytes) -> None:
    from edgeinfer.export.sources.gguf_check import check_gguf

    check_gguf(_write("fuzz.gguf", data))


# -- CTranslate2 model.bin ---------------------------------------------------------
def ct2_seed() -> bytes:
    def string(s: str) -> bytes:
        raw = s.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    return b"".join([struct.pack("<I", 6), string("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", 1),
                     string("encoder/conv1/weight"), struct.pack("<B", 2), struct.pack("<2I", 2, 3),
                     struct.pack("<B", 4), struct.pack("<I", arr.nbytes), arr.tobytes(),
                     struct.pack("<I", 1), string("alias"), string("encoder/conv1/weight")])


def ct2_target(data: bytes) -> None:
    from edgeinfer.export.sources.ct2_reader import read_model_bin

    read_model_bin(_write("ct2/model.bin", data))


# -- WAV ------------------------------------------------------------------------------
def wav_seed() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes((np.sin(np.arange(400) / 5) * 8000).astype("<i2").repeat(2).tobytes())
    return buf.getvalue()


def wav_target(data: bytes) -> None:
    from edgeinfer.seq2seq.whisper.audio import read_frames, read_wav_info

    info = read_wav_info(_write("fuzz.wav", data))
    read_frames(info, 0, min(info.frames, 4096))


# -- tokenizer.json -------------------------------------------------------------------
def tokenizer_seed() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str().encode()


def tokenizer_target(data: bytes) -> None:
    from edgeinfer.package import Package
    from edgeinfer.tokenizer import TextTokenizer

    root = _TMP / "tok"
    root.mkdir(exist_ok=True)
    (root / "tokenizer.json").write_bytes(data)
    tok = TextTokenizer(Package(root, {"tokenizer": {"file": "tokenizer.json"}}))
    tok.decode(tok.encode("ab a b"))


# -- chat template ------------------------------------------------------------------------
def template_seed() -> bytes:
    return (b"{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n{% endfor %}"
            b"{% if add_generation_prompt %}<|assistant|>{% endif %}")


def template_target(data: bytes) -> None:
    from edgeinfer.tokenizer import render_chat_template

    render_chat_template(data.decode("utf-8", "replace"), [{"role": "user", "content": "hi"}], True, "<s>", "</s>")


# -- constraints (JSON Schema, regex, Lark / GBNF grammar) and tool-calling requests -------------------
_CONSTRAINT_TOKENIZER = None


def _constraint_tokenizer():
    """A small byte-level BPE tokenizer with an EOS and a chat template, built once (llguidance's view of
    it is cached on it)."""
    global _CONSTRAINT_TOKENIZER
    if _CONSTRAINT_TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from edgeinfer.package import Package
        from edgeinfer.tokenizer import TextTokenizer

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(['{"name": "Ada", "age": 36, "tags": ["x", "y"]} true false null 0.5 -12'] * 4,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        root = _TMP / "constraint-tok"
        root.mkdir(exist_ok=True)
        (root / "tokenizer.json").write_text(tok.to_str())
        _CONSTRAINT_TOKENIZER = TextTokenizer(Package(root, {"tokenizer": {
            "file": "tokenizer.json", "bos_token_id": 0, "eos_token_ids": [1],
            "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}}))
    return _CONSTRAINT_TOKENIZER


def _constrain(**kind) -> None:
    """Compile the constraint, then walk a few steps taking the first allowed token (the runtime side)."""
    from edgeinfer.constraints import compile_constraint

    tok = _constraint_tokenizer()
    c = compile_constraint(tok, tok.vocab_size, **kind)
    mask, seq = c.start(0), []
    for _ in range(8):
        allowed = mask.allowed(seq).nonzero()[0]
        if not len(allowed) or int(allowed[0]) in c.eos_token_ids:
            break
        seq.append(int(allowed[0]))
    mask.report(seq)


def json_schema_seed() -> bytes:
    return json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                        "age": {"type": "integer", "minimum": 0},
                                                        "tags": {"type": "array", "items": {"enum": ["x", "y"]}}},
                       "required": ["name"], "additionalProperties": False}).encode()


def json_schema_target(data: bytes) -> None:
    _constrain(json_schema=data.decode("utf-8", "replace"))


def regex_seed() -> bytes:
    return rb"(ab|c[0-9]{2,4})+\.?[^x]*"


def regex_target(data: bytes) -> None:
    _constrain(regex=data.decode("utf-8", "replace"))


def grammar_seed() -> bytes:
    return b'start: item ("," item)*\nitem: NAME | "[" start "]"\nNAME: /[a-z]+/'


def grammar_target(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    _constrain(grammar=text)
    if "::=" not in text:  # the same bytes as GBNF too
        _constrain(grammar="root ::= " + text)


def tool_request_seed() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "weather?"},
                                    {"role": "assistant", "content": None, "tool_calls": [
                                        {"id": "c1", "type": "function",
                                         "function": {"name": "w", "arguments": "{\"city\": \"Rome\"}"}}]},
                                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
                       "tools": [{"type": "function", "function": {"name": "w", "parameters": {
                           "type": "object", "properties": {"city": {"type": "string"}}}}}],
                       "tool_choice": "required",
                       "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
                       }).encode()


def tool_request_target(data: bytes) -> None:
    from edgeinfer.tool_calls import openai_request, parse_tool_calls

    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return  # the server answers 400 before this point
    parse_tool_calls(data.decode("utf-8", "replace"))
    if isinstance(body, dict):
        ids, constraint, _ = openai_request(body, _constraint_tokenizer(), chat=True)
        if constraint:
            _constrain(**constraint)


TARGETS = {
    "manifest": (manifest_target, manifest_seed),
    "gguf": (gguf_target, gguf_seed),
    "ct2": (ct2_target, ct2_seed),
    "wav": (wav_target, wav_seed),
    "tokenizer": (tokenizer_target, tokenizer_seed),
    "chat_template": (template_target, template_seed),
    "json_schema": (json_schema_target, json_schema_seed),
    "regex": (regex_target, regex_seed),
    "grammar": (grammar_target, grammar_seed),
    "tool_request": (tool_request_target, tool_request_seed),
}


def run_one(name: str, data: bytes) -> None:
    """Run target NAME on DATA; the project's own errors are the expected outcome for bad input."""
    try:
        TARGETS[name][0](data)
    except EdgeInferError:
        pass
