"""CTranslate2 folders: a tiny Whisper written in CTranslate2's layout (fused qkv,
fused cross kv, aliased projection) exports to the same model as its transformers
original; hostile model.bin files give one clear error, never a crash."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from edgeinfer.export.sources.ct2_reader import read_ct2_folder, read_model_bin
from test_whisper_parity import SOURCE_POSITIONS, START, _tiny_whisper

import edgeinfer
from edgeinfer.errors import ExportError

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
              np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None, spec: str = "WhisperSpec",
              version: int = 6) -> bytes:
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, arr in variables.items():
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would make scalars 1-d)
        out += [_string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape),
                struct.pack("<B", _DTYPE_IDS[arr.dtype]), struct.pack("<I", arr.nbytes), arr.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for a, target in aliases.items():
        out += [_string(a), _string(target)]
    return b"".join(out)


def _hf_to_ct2(sd: dict[str, np.ndarray], enc_layers: int, dec_layers: int, heads: int) -> dict[str, np.ndarray]:
    """The variable names and fusions of CTranslate2's Whisper converter."""
    v: dict[str, np.ndarray] = {}

    def lin(dst, src, zero_bias=False):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        v[f"{dst}/bias"] = sd[f"{src}.bias"] if not zero_bias else np.zeros(sd[f"{src}.weight"].shape[0], np.float32)

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst, srcs):
        v[f"{dst}/weight"] = np.concatenate([sd[f"{s}.weight"] for s in srcs])
        v[f"{dst}/bias"] = np.concatenate([sd.get(f"{s}.bias", np.zeros(sd[f"{s}.weight"].shape[0], np.float32))
                                           for s in srcs])

    e, d = "model.encoder", "model.decoder"
    v["encoder/num_heads"] = np.asarray(heads, np.int16)
    lin("encoder/conv1", f"{e}.conv1")
    lin("encoder/conv2", f"{e}.conv2")
    v["encoder/position_encodings/encodings"] = sd[f"{e}.embed_positions.weight"]
    for i in range(enc_layers):
        s, t = f"{e}.layers.{i}", f"encoder/layer_{i}"
        ln(f"{t}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        fused(f"{t}/self_attention/linear_0", [f"{s}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{t}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        ln(f"{t}/ffn/layer_norm", f"{s}.final_layer_norm")
        lin(f"{t}/ffn/linear_0", f"{s}.fc1")
        lin(f"{t}/ffn/linear_1", f"{s}.fc2")
    ln("encoder/layer_norm", f"{e}.layer_norm")
    v["decoder/num_heads"] = np.asarray(heads, np.int16)
    v["decoder/pre_norm"] = np.asarray(1, np.int8)
    v["decoder/embeddings/weight"] = sd[f"{d}.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd[f"{d}.embed_positions.weight"]
    for i in range(dec_layers):
        s, t = f"{d}.layers.{i}", f"decoder/layer_{i}"
        ln(f"{t}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        fused(f"{t}/self_attention/linear_0", [f"{s}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{t}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        ln(f"{t}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
        lin(f"{t}/attention/linear_0", f"{s}.encoder_attn.q_proj")
        fused(f"{t}/attention/linear_1", [f"{s}.encoder_attn.k_proj", f"{s}.encoder_attn.v_proj"])
        lin(f"{t}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        ln(f"{t}/ffn/layer_norm", f"{s}.final_layer_norm")
        lin(f"{t}/ffn/linear_0", f"{s}.fc1")
        lin(f"{t}/ffn/linear_1", f"{s}.fc2")
    ln("decoder/layer_norm", f"{d}.layer_norm")
    return v


@pytest.fixture(scope="module")
def ct2_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct2")
    hf = _tiny_whisper(root / "hf", seed=5)
    sd = {k: t.detach().numpy() for k, t in hf.state_dict().items()}
    variables = _hf_to_ct2(sd, 2, 2, 4)
    folder = root / "ct2"
    folder.mkdir()
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    (folder / "model.bin").write_bytes(ct2_bytes(variables, aliases))
    vocab = [f"tok{i}" for i in range(320)]
    vocab[1], vocab[2], vocab[3] = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"
    (folder / "vocabulary.txt").write_text("\n".join(vocab) + "\n")
    (folder / "config.json").write_text(json.dumps({"suppress_ids": [7, 8], "suppress_ids_begin": [9]}))
    (folder / "tokenizer.json").write_text((root / "hf" / "tokenizer.json").read_text())
    return hf, folder, root


def test_ct2_folder_exports_the_same_model(ct2_folder):
    import torch
    from edgeinfer.export import export_model

    hf, folder, root = ct2_folder
    read = read_ct2_folder(folder)
    assert read.spec == "WhisperSpec" and read.revision == 3 and read.scalar("encoder/num_heads") == 4
    assert read.variables["decoder/projection/weight"] is read.variables["decoder/embeddings/weight"]
    export_model(str(folder), root / "pkg", "fp32", progress=False)
    model = edgeinfer.load(root / "pkg")
    gen = model.package.manifest["generation"]
    assert gen["decoder_start_ids"] == [1, 3] and gen["eos_token_id"] == 2
    assert gen["suppress_tokens"] == [7, 8] and gen["begin_suppress_tokens"] == [9]
    feats = np.random.default_rng(2).standard_normal((1, 80, 2 * SOURCE_POSITIONS)).astype(np.float32)
    ids = [START, 10, 20, 30]
    with torch.no_grad():
        ref = hf(input_features=torch.from_numpy(feats), decoder_input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(model.decoder_logits(ids, model.encode(feats)), ref, atol=2e-4, rtol=1e-4)


def _small() -> dict[str, np.ndarray]:
    return {"a/weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a/scale": np.asarray(3, np.int16),
            "b/half": np.ones(4, np.float16)}


def test_reader_roundtrip_of_dtypes(tmp_path):
    (tmp_path / "model.bin").write_bytes(ct2_bytes(_small(), {"c": "a/weight"}))
    spec, rev, v = read_model_bin(tmp_path / "model.bin")
    assert spec == "WhisperSpec" and rev == 3
    np.testing.assert_array_equal(v["a/weight"], _small()["a/weight"])
    assert v["b/half"].dtype == np.float16 and int(v["a/scale"]) == 3 and v["c"] is v["a/weight"]


def _corrupt_cases():
    good = ct2_bytes(_small())
    header_len = 4 + 2 + len("WhisperSpec") + 1 + 4
    first_name = 2 + len("a/weight") + 1
    rank_at = header_len + 4 + first_name
    dims_at = rank_at + 1
    dtype_at = dims_at + 8
    nbytes_at = dtype_at + 1
    huge_dims = bytearray(good)
    huge_dims[dims_at:dims_at + 8] = struct.pack("<2I", 0xFFFFFFFF, 0xFFFFFFFF)
    huge_count = bytearray(good)
    huge_count[header_len:header_len + 4] = struct.pack("<I", 0xFFFFFFFF)
    bad_rank = bytearray(good)
    bad_rank[rank_at] = 200
    bad_dtype = bytearray(good)
    bad_dtype[dtype_at] = 9
    bad_size = bytearray(good)
    bad_size[nbytes_at:nbytes_at + 4] = struct.pack("<I", 0x7FFFFFFF)
    return [
        (good[: len(good) // 2], "truncated"),
        (good[:20], "truncated"),
        (b"", "too short"),
        (b"\x00" * 64, "binary version 0"),
        (bytes(huge_dims), "should take"),
        (bytes(huge_count), "claims 4294967295 variables"),
        (bytes(bad_rank), "rank 200"),
        (bytes(bad_dtype), "unknown dtype 9"),
        (bytes(bad_size), "should take"),
        (good + b"junk", "unexpected bytes"),
        (ct2_bytes(_small(), {"x": "missing/var"}), "missing variable"),
    ]


@pytest.mark.parametrize("data,message", _corrupt_cases())
def test_hostile_model_bin_gets_one_clear_error(tmp_path, data, message):
    (tmp_path / "model.bin").write_bytes(data)
    with pytest.raises(ExportError, match=message):
        read_model_bin(tmp_path / "model.bin")


def test_non_whisper_ct2_folder_is_refused(tmp_path):
    from edgeinfer.export import export_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.bin").write_bytes(ct2_bytes(_small(), spec="TransformerSpec"))
    with pytest.raises(ExportError, match="only WhisperSpec"):
        export_model(str(tmp_path / "m"), tmp_path / "out", "fp32", progress=False)
    assert not (tmp_path / "out").exists()
