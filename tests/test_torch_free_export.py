"""The shipped GGUF models export with no torch or transformers importable, and the weights the
torch-free reader (gguf package) produces are exactly transformers' dequantization of the same file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgeinfer

pytestmark = pytest.mark.slow

BLOCKED = "import sys\nfor m in ('torch', 'transformers', 'optimum', 'accelerate'):\n    sys.modules[m] = None\n"


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_every_tensor_equals_transformers_dequantization(alias):
    torch = pytest.importorskip("torch")
    from edgeinfer.export.sources.aliases import resolve_alias
    from edgeinfer.export.sources.load import load_source
    from transformers import AutoModelForCausalLM

    path = resolve_alias(alias)
    src = load_source(alias)
    assert src.blocks, "the GGUF's quantized matrices are carried as blocks"
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        ref.pop("lm_head.weight", None)  # the same table as the embedding
    assert set(ref) == set(src.state_dict)
    for name, want in ref.items():
        np.testing.assert_allclose(src.state_dict[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
        if name in src.blocks:  # the blocks stand for exactly those weights
            np.testing.assert_allclose(src.blocks[name].dequantize(), want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_export_and_run_without_torch(tmp_path):
    out = tmp_path / "smollm2"
    script = BLOCKED + textwrap.dedent(f"""
        from edgeinfer.export import export_model
        res = export_model("smollm2-135m", {str(out)!r}, max_context=256, progress=False)
        assert res.manifest["quantization"]["weights"] == "source", res.manifest["quantization"]
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        import edgeinfer
        print(edgeinfer.load({str(out)!r}).chat([{{"role": "user", "content": "What is the capital of France?"}}],
                                              max_new_tokens=16).text())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert edgeinfer.load(out).package.manifest["quantization"]["source_types"] == {"F32": 61, "Q4_1": 210,
                                                                                    "Q8_0": 1}


def test_lm_head_bits_requantizes_only_the_head(tmp_path):
    """--lm-head-bits 4 on a GGUF package: the head becomes int4 blocks, the embedding gather keeps the
    file's Q8_0 blocks, every layer keeps its own; the manifest and `info` say so."""
    import onnx
    from edgeinfer.export import export_model

    out = tmp_path / "h4"
    res = export_model("smollm2-135m", out, lm_head_bits=4, max_context=256, progress=False)
    q = res.manifest["quantization"]
    assert q["weights"] == "source" and q["lm_head_bits"] == 4 and "re-quantized" in q["lm_head_scheme"]
    info = subprocess.run([sys.executable, "-m", "edgeinfer.cli", "info", str(out)], capture_output=True, text=True)
    assert "LM head re-quantized to 4-bit" in info.stdout, info.stdout + info.stderr
    graph = onnx.load(str(out / "graphs" / "stage0.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
    assert bits["lm_head"] == 4 and bits["model.embed_tokens"] == 8
    assert all(b == 4 for name, b in bits.items() if ".layers." in name)  # Q4_1 layers as they are
    model = edgeinfer.load(out)
    assert "Paris" in model.complete("The capital of France is", max_new_tokens=8).text
