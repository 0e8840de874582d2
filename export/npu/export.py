"""``edgeinfer export --target npu``: a static-shape, QDQ-quantized package.

Two graphs of one model are written — ``graphs/prefill.onnx`` (a chunk of
``prefill_chunk`` tokens) and ``graphs/decode.onnx`` (one token) — both with
the KV cache as fixed-size inputs (see ``npu_graph.py``). The float graphs are
built first, run on the CPU over the calibration text to measure activation
ranges, and quantized to static QDQ (``qdq.py``); only the quantized graphs go
into the package. ``edgeinfer/decoders/static.py`` runs them.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
from edgeinfer.export.base import ExportResult, PackageBuild
from edgeinfer.export.graph.shared_weights import share_weights
from edgeinfer.export.npu import graph as ng
from edgeinfer.export.quant.calibrate import FeedReader, calibration_samples, decode_feeds, kv_ranges, prefill_feeds
from edgeinfer.export.quant.qdq import quantize_qdq
from edgeinfer.export.quant.quantized_io import quantize_graph_io
from edgeinfer.export.sources.load import SourceModel
from edgeinfer.models import spec_for_config
from edgeinfer.runtimes.cpu import compatible_session_options

from edgeinfer.decoders.static import StaticDecoder
from edgeinfer.errors import ExportError
from edgeinfer.package import GraphEntry, KVCacheSpec, StaticSpec

DEFAULT_NPU_CONTEXT = 512
DEFAULT_PREFILL_CHUNK = 32
CALIBRATION_PREFILL_RUNS = 16
CALIBRATION_DECODE_RUNS = 64

IO = {"input_ids": ng.INPUT_IDS, "position_ids": ng.POSITION_IDS, "attention_mask": ng.ATTENTION_MASK,
      "attention_mask_local": ng.LOCAL_ATTENTION_MASK, "logits": ng.LOGITS,
      "past_key": "past_key.{layer}", "past_value": "past_value.{layer}",
      "new_key": "new_key.{layer}", "new_value": "new_value.{layer}"}


def export_npu(src: SourceModel, out: Path, *, max_context: int | None, force: bool, prefill_chunk: int | None = None,
               calibration: str | Path | None = None, activation_bits: int = 16, weight_bits: int = 8,
               manifest_base) -> ExportResult:
    """Build the npu package of SRC at OUT.

    MANIFEST_BASE(spec) gives the fields shared with the other targets (name, source, tokenizer, ...).
    """
    try:
        spec = spec_for_config(src.config)
        ng.check_supported(spec)
    except (ValueError, KeyError) as e:
        raise ExportError(f"cannot export this {src.config.get('model_type')} model for the npu target: {e}.") from None
    ctx = int(max_context or min(spec.max_position, DEFAULT_NPU_CONTEXT))
    chunk = int(prefill_chunk or DEFAULT_PREFILL_CHUNK)
    if not 16 <= ctx <= spec.max_position:
        raise ExportError(f"--max-context {ctx} is outside 16..{spec.max_position} (the model's limit).")
    if not 2 <= chunk <= ctx:
        raise ExportError(f"the prefill chunk {chunk} must be between 2 and the context ({ctx}).")
    samples = calibration_samples(src.tokenizer_json, calibration, max_tokens=ctx)
    static = StaticSpec(chunk=chunk, max_context=ctx, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                        heads=spec.heads, num_layers=spec.layers, sliding_windows=list(spec.windows),
                        mask_value=ng.MASK_VALUE, kv_update="host")
    with tempfile.TemporaryDirectory(prefix="edgeinfer-npu-") as float_dir, PackageBuild(out, force) as build:
        float_paths = {}
        for name, c in (("prefill", chunk), ("decode", 1)):
            float_paths[name] = Path(float_dir) / f"{name}.onnx"
            _save_with_shapes(ng.build_static_decoder(spec, src.state_dict, c, ctx, name), float_paths[name])
        decoder = _float_decoder(float_paths, static, spec.vocab)
        tmp = build.folder
        readers = {"prefill": FeedReader(prefill_feeds(decoder, samples, CALIBRATION_PREFILL_RUNS)),
                   "decode": FeedReader(decode_feeds(decoder, samples, CALIBRATION_DECODE_RUNS))}
        kv = kv_ranges(decoder, samples)  # before the readers run: they leave the decoder mid-sample
        edges_in = [IO["attention_mask"], *([IO["attention_mask_local"]] if any(w > 0 for w in spec.windows) else []),
                    *[IO[f"past_{kind}"].format(layer=i) for i in range(spec.layers) for kind in ("key", "value")]]
        edges_out = [IO["logits"], *[IO[f"new_{kind}"].format(layer=i) for i in range(spec.layers)
                                     for kind in ("key", "value")]]
        graphs = build.graphs  # quantize_qdq writes each graph itself
        for name, role in (("prefill", "static_prefill"), ("decode", "static_decode")):
            rel = f"graphs/{name}.onnx"
            quantize_qdq(float_paths[name], tmp / rel, readers[name], activation_bits, weight_bits, fixed_ranges=kv)
            io_q = quantize_graph_io(tmp / rel, edges_in, edges_out)
            graphs.append({"name": name, "role": role, "path": rel, "chunk": chunk if name == "prefill" else 1,
                           "io_quantization": io_q})
        static.kv_dtype = graphs[0]["io_quantization"][IO["past_key"].format(layer=0)]["dtype"]
        share_weights([tmp / g["path"] for g in graphs])
        build.write_tokenizer(src.tokenizer_json)
        build.write_manifest(dataclasses.replace(
            manifest_base(spec), target="npu", graphs=[GraphEntry.from_dict(g) for g in graphs], io=dict(IO),
            static=static, exits=[],
            kv_cache=KVCacheSpec(layout="BNSH", dtype=static.kv_dtype, num_layers=spec.layers,
                                 num_kv_heads=spec.kv_heads, head_dim=spec.head_dim, max_context=ctx,
                                 shared_buffer=False, sliding_windows=spec.windows),
            quantization={"weights": f"int{weight_bits}", "scheme": "static-qdq",
                          "weight_granularity": "per-channel symmetric",
                          "activations": f"uint{activation_bits} calibrated (MinMax)",
                          "calibration": {"text": Path(calibration).name if calibration else "built-in",
                                          "samples": len(samples)}},
            requires={"static_shapes": True, "qdq": True}))
    return build.result()


def _float_decoder(paths: dict[str, Path], static: StaticSpec, vocab: int) -> StaticDecoder:
    so = compatible_session_options()
    sessions = {k: ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])
                for k, p in paths.items()}
    return StaticDecoder.from_sessions(sessions["prefill"], sessions["decode"], static, IO, vocab)


def _save_with_shapes(builder, path: Path) -> None:
    """Save with every intermediate tensor's shape recorded: the calibrator only measures tensors whose
    type it knows, and onnx's own shape inference stops at contrib ops (SimplifiedLayerNormalization)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = SymbolicShapeInference.infer_shapes(builder.to_model(), auto_merge=False)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
