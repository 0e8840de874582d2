"""Hugging Face folders read without torch: the same weights, tokenizer and special ids as the
transformers-based reader (export/sources/load.py's load_source) on the tiny random models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from edgeinfer.export.sources.hf_folder import bf16_to_float32, read_hf_folder, read_safetensors

from edgeinfer.errors import ExportError

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_matches_transformers(tiny_models, family):
    pytest.importorskip("torch")
    from edgeinfer.export.sources.load import load_source
    from edgeinfer.models import spec_for_config

    folder = tiny_models(family)
    ref = load_source(str(folder))
    mine = read_hf_folder(folder)
    spec = spec_for_config(mine.config)
    assert spec == spec_for_config(ref.config)
    used = set(ref.state_dict)
    if spec.tie_embeddings:  # transformers lists the tied head under its own name too; the file stores it once
        used.discard("lm_head.weight")
    assert used <= set(mine.state_dict)
    assert set(mine.state_dict) <= set(ref.state_dict)
    for name in used:
        assert mine.state_dict[name].dtype == np.float32, name
        np.testing.assert_array_equal(mine.state_dict[name], ref.state_dict[name], err_msg=name)
    assert json.loads(mine.tokenizer_json) == json.loads((folder / "tokenizer.json").read_text())
    if family != "qwen2":  # transformers rebuilds a qwen2 tokenizer by class (NFC, an extra <|endoftext|>
        # past this tiny vocabulary); the folder's own tokenizer.json is what the model was trained with
        assert json.loads(mine.tokenizer_json) == json.loads(ref.tokenizer_json)
    assert mine.chat_template == ref.chat_template
    assert mine.special == ref.special
    assert mine.generation == ref.generation


def test_bf16_and_sharded_folder(tiny_models, tmp_path):
    """A sharded bf16 checkpoint: bf16 widened exactly as torch does, every shard read."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    src = tiny_models("llama")
    folder = tmp_path / "sharded"
    shutil.copytree(src, folder)
    (folder / "model.safetensors").unlink()
    weights = read_safetensors(src / "model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", names[:half]),
                        ("model-00002-of-00002.safetensors", names[half:])):
        save_file({n: torch.from_numpy(weights[n]).to(torch.bfloat16) for n in part}, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = read_hf_folder(folder).state_dict
    assert sorted(got) == names
    for n in names:
        expect = torch.from_numpy(weights[n]).to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(got[n], expect, err_msg=n)


def test_bf16_widening_is_exact():
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 1e-40], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16 (1e-40: subnormal)
    assert np.array_equal(bf16_to_float32(bits).view(np.uint32), bits.astype(np.uint32) << 16)
    assert bf16_to_float32(bits)[:6].tolist() == values[:6].tolist()


def test_damaged_folders_are_clear_errors(tiny_models, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_models("llama"), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ExportError, match="outside the file"):
        read_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="no .safetensors weights.*needs torch"):
        read_hf_folder(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(ExportError, match="not a file in the folder"):
        read_hf_folder(folder)
