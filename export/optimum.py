"""Breadth fallback: families without a hand-built graph are exported by optimum as
one monolithic decoder graph (KV cache as past/present tensors), then optionally
quantized with onnxruntime's MatMulNBits quantizer. Plain decoding (and lookup)
only: no stages, no exits, no shared KV buffer.

optimum-onnx pins transformers < 4.58 while edgeinfer's exporter needs 5.x (its
GGUF reader gets Gemma-3 right), so optimum runs in a virtual environment of its
own: ``$EDGEINFER_OPTIMUM_PYTHON``, or ``.venv-optimum`` beside the source tree
(``make setup`` creates it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeinfer.export.sources.load import SourceModel

from edgeinfer.errors import ExportError


def optimum_python() -> Path:
    env = os.environ.get("EDGEINFER_OPTIMUM_PYTHON")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1] / ".venv-optimum" / "bin" / "python",
                   Path.cwd() / ".venv-optimum" / "bin" / "python"]
    for c in candidates:
        if c.is_file():
            return c
    raise ExportError("this model family has no hand-built graph and the optimum fallback is not installed: "
                      "run 'make setup' (creates .venv-optimum) or set EDGEINFER_OPTIMUM_PYTHON.")


def export_monolithic(src: SourceModel, graphs_dir: Path, precision: str, block_size: int) -> tuple[dict, dict, dict]:
    """Export SRC into GRAPHS_DIR/model.onnx(.data); returns (graph entry, io names, kv shape facts)."""
    if src.kind == "gguf":
        raise ExportError(f"GGUF models of family '{src.config.get('model_type')}' have no hand-built graph; "
                          "convert it to a Hugging Face folder first.")
    if precision == "fp16":
        raise ExportError("the optimum fallback exports fp32, int8 or int4 (fp16 needs a hand-built graph).")
    work = Path(tempfile.mkdtemp(prefix="edgeinfer-optimum-"))
    try:
        cmd = [str(optimum_python()), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
               src.location, "--task", "text-generation-with-past", str(work)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not (work / "model.onnx").is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"optimum could not export this model ({tail[0][:200]}).")
        import onnx

        model = onnx.load(str(work / "model.onnx"))
        if precision in ("int4", "int8"):
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     bits=4 if precision == "int4" else 8)
            q.process()
            model = q.model.model
        path = graphs_dir / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not past or "logits" not in outputs:
        raise ExportError("optimum's graph has no KV-cache inputs or no logits: this model cannot be decoded.")
    dims = past[0].type.tensor_type.shape.dim
    kv = {"num_layers": len(past), "num_kv_heads": int(dims[1].dim_value), "head_dim": int(dims[3].dim_value)}
    io = {"input_ids": "input_ids", "attention_mask": "attention_mask" if "attention_mask" in inputs else None,
          "position_ids": "position_ids" if "position_ids" in inputs else None, "logits": "logits",
          "past_key": "past_key_values.{layer}.key", "past_value": "past_key_values.{layer}.value",
          "present_key": "present.{layer}.key", "present_value": "present.{layer}.value"}
    entry = {"name": "decoder", "role": "monolithic", "path": "graphs/model.onnx", "inputs": inputs,
             "outputs": outputs}
    return entry, io, kv
