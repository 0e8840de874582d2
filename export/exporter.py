"""``edgeinfer export``: SOURCE → model package (decoder-only families)."""

from __future__ import annotations

import sys
from pathlib import Path

from edgeinfer.export.decoder import graph as dg
from edgeinfer.export.decoder.kv_precision import KVPrecision
from edgeinfer.export.decoder.vocab_trim import add_trimmed_exit_head, check_exit_vocab
from edgeinfer.export.graph.blocks import DEFAULT_MAX_CONTEXT, PRECISIONS, Precision, checked_context_and_precision
from edgeinfer.export.sources.aliases import is_alias
from edgeinfer.export.sources.load import SourceModel, load_source
from edgeinfer.models import FAMILIES, kind_for, spec_for_config

from edgeinfer.errors import ExportError
from edgeinfer.package import ExitEntry, GenerationSpec, GraphEntry, KVCacheSpec, Manifest, TokenizerSpec

from .base import ExportResult, PackageBuild, refuse_existing
from .options import DEFAULTS, refuse_unused
from .package_writer import write_manifest
from .progress import progress_bar

TARGETS = ("cpu", "gpu", "npu")


def export_model(source: str | SourceModel, out: str | Path, precision: str | None = None, *,
                 max_context: int | None = None, stages: list[int] | None = None, exits: list[int] | None = None,
                 force: bool = False,
                 lm_head_bits: int | None = None, block_size: int = 32, accuracy_level: int = 4,
                 symmetric: bool | None = None, progress: bool = True, target: str = "cpu",
                 prefill_chunk: int | None = None, calibration: str | Path | None = None,
                 activation_bits: int = 16, exit_adapters: bool = False,
                 adapter_rank: int | None = None, expert_bits: int | None = None,
                 quant_method: str | None = None, kv_dtype: str | None = None,
                 exit_vocab: int | None = None, exact_blocks: bool = False) -> ExportResult:
    """Export SOURCE (alias, .gguf, HF folder, hub id, or a loaded SourceModel) to a package at OUT.

    PRECISION: ``source`` keeps a GGUF file's own quantized weights exactly (the default for GGUF sources
    of the hand-built families on the cpu target); ``int4``/``int8`` re-quantize (the default elsewhere is
    int4 for cpu, fp16 for gpu, int8 for npu); ``fp16``/``fp32`` store floats.
    TARGET: ``cpu`` (fused contrib ops, dynamic KV), ``gpu`` (the same graphs, fp16 weights unless int4 is
    asked: MatMulNBits runs on CUDA), ``npu`` (static shapes, static QDQ int8: see npu_export.py).
    EXPERT_BITS (sparse MoE only): 8 stores the routed experts as per-channel int8 fed to one shared
    graph (no session per loaded expert: docs/moe.md); None keeps them at PRECISION.
    QUANT_METHOD, SYMMETRIC: how int4/int8 blocks are fitted (export/quant/methods.py; None = the default).
    KV_DTYPE: ``fp32`` (default), ``fp16`` or ``int8`` KV buffers, fixed in the graphs (cpu target, hand-built
    dense families; int8 scales are calibrated on CALIBRATION text: export/decoder/kv_precision.py).
    EXACT_BLOCKS: with ``source`` at accuracy level 4, keep the file's Q5_0/Q6_K blocks exactly instead of
    re-blocking them into 8-bit blocks of 64 (slower; docs/gguf.md).
    """
    given = {k: v for k, v in locals().items() if k in DEFAULTS}  # the caller's options, for refuse_unused
    from edgeinfer.export.decoder.kv_precision import checked_kv_dtype

    kv_dtype = checked_kv_dtype(kv_dtype)
    if target not in TARGETS:
        raise ExportError(f"unknown target '{target}': choose one of {', '.join(TARGETS)}.")
    if precision is not None and precision not in PRECISIONS:
        raise ExportError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    _check_exact_blocks(exact_blocks, precision)  # again below, once a default precision is chosen
    if lm_head_bits not in (None, 4, 8) or (lm_head_bits and precision not in (None, "source", "int4", "int8")):
        raise ExportError("--lm-head-bits takes 4 or 8 and applies to source/int4/int8 packages only.")
    out = refuse_existing(out, force)
    if isinstance(source, str):
        from edgeinfer.export.seq2seq.export import export_seq2seq, seq2seq_source_path

        seq2seq_folder = seq2seq_source_path(source)
        if seq2seq_folder is not None:  # encoder-decoder: its own graphs and manifest
            if kv_dtype != "fp32":
                raise ExportError(f"--kv-dtype {kv_dtype} is built for decoder-only cpu packages; encoder-decoder "
                                  "packages keep an fp32 KV cache: drop --kv-dtype.")
            if exit_adapters:
                raise ExportError("--exit-adapters is fitted for decoder-only packages; encoder-decoder exits "
                                  "use the plain exit head: drop --exit-adapters.")
            if target != "cpu":
                raise ExportError(f"encoder-decoder packages are built for the cpu target only, not '{target}'.")
            if precision == "source":
                raise ExportError("--precision source keeps a GGUF file's own quantization; encoder-decoder "
                                  "sources are re-quantized: choose int4, int8, fp16 or fp32.")
            refuse_unused("encoder-decoder", given)
            return export_seq2seq(seq2seq_folder, out, precision or "int4", force=force, block_size=block_size,
                                  accuracy_level=accuracy_level, stages=stages, exits=exits,
                                  name=source if is_alias(source) else None, quant_method=quant_method)
    src = source if isinstance(source, SourceModel) else load_source(source)
    model_type = src.config.get("model_type", "")
    precision = _checked_precision(src, precision, target, model_type)
    if lm_head_bits and precision not in ("source", "int4", "int8"):
        raise ExportError(f"--lm-head-bits applies to source/int4/int8 packages, not {precision}.")
    _check_exact_blocks(exact_blocks, precision)
    if quant_method is not None and precision not in ("int4", "int8"):
        raise ExportError(f"--quant-method fits int4/int8 blocks; the {precision} precision has none: "
                          "drop --quant-method or choose --precision int4.")
    if src.blocks and quant_method is None and symmetric is None:
        # Re-quantizing a GGUF's blocks: no method repairs re-rounding them (hqq measured worse than rtn on
        # SmolLM2's Q4_1, docs/quality.md) and hqq costs minutes on a 262k-row table: symmetric rtn, as before.
        quant_method, symmetric = "rtn", True
    if kv_dtype != "fp32" and (target != "cpu" or kind_for(model_type) == "moe" or model_type not in FAMILIES):
        what = (f"the {target} target" if target != "cpu" else "sparse-MoE packages" if kind_for(model_type) == "moe"
                else f"the '{model_type}' family (no hand-built graph)")
        raise ExportError(f"--kv-dtype {kv_dtype} is built for the cpu target's hand-built dense decoders, not "
                          f"{what}: drop --kv-dtype.")
    if kv_dtype == "fp16":
        print("note: onnxruntime's CPU attention converts an fp16 KV cache to fp32 at every step: it decodes slower "
              "than fp32 KV (docs/kv-cache.md); --kv-dtype int8 is the fast one.", file=sys.stderr)
    if target != "npu":  # GroupQueryAttention's head-size limits: refuse what could not run
        from edgeinfer.export.graph.shape_checks import check_config_attention

        check_config_attention(src.config, target)
    if target == "npu":
        refuse_unused("npu", given)
        return _export_npu(src, out, max_context, force, prefill_chunk, calibration, activation_bits, precision)
    if kind_for(model_type) == "moe":  # sparse MoE: per-layer graphs + expert store (export/moe/graph.py)
        from edgeinfer.export.moe.graph import export_moe_source

        refuse_unused("moe", given)
        return export_moe_source(src, out, precision, max_context=max_context, stages=stages, exits=exits,
                                 force=force, lm_head_bits=lm_head_bits, block_size=block_size,
                                 accuracy_level=accuracy_level, symmetric=symmetric, progress=progress,
                                 expert_bits=expert_bits)
    if expert_bits is not None:
        raise ExportError(f"--expert-bits applies to sparse-MoE models only, not {model_type or 'this model'}.")
    if model_type not in FAMILIES:
        if stages or exits:
            raise ExportError(f"model family '{model_type}' has no hand-built graph: stages and exits need one "
                              f"(hand-built: {', '.join(sorted(FAMILIES))}).")
        refuse_unused("monolithic", given)
        return _export_monolithic(src, out, precision, max_context, force, block_size)
    refuse_unused("decoder", given)
    try:
        spec = spec_for_config(src.config)
    except (ValueError, KeyError) as e:
        raise ExportError(f"cannot export this {model_type} model: {e}.") from None
    ctx, prec = checked_context_and_precision(spec.max_position, spec.hidden, max_context, precision,
                                              block_size=block_size, lm_head_bits=lm_head_bits,
                                              accuracy_level=accuracy_level, symmetric=symmetric,
                                              quant_method=quant_method, exact_blocks=exact_blocks)
    exits = sorted(set(int(e) for e in exits or []))
    if exit_adapters and not exits:
        raise ExportError("--exit-adapters fits one adapter per exit: give the exits with --exits (e.g. 15,24).")
    if adapter_rank is not None and not 1 <= adapter_rank <= spec.hidden:
        raise ExportError(f"--adapter-rank must be between 1 and the hidden size {spec.hidden}.")
    try:
        cuts = dg.stage_cuts(spec.layers, [*(stages or []), *exits])
    except ValueError as e:
        raise ExportError(f"{e} (exits and stage cuts are layer counts between 1 and {spec.layers}).") from None
    check_exit_vocab(exit_vocab, exits, spec.vocab)

    bar = progress_bar(spec.layers, f"building {precision} graphs", progress)
    with PackageBuild(out, force) as build:
        tmp = build.folder
        weights = {**src.state_dict, **_source_blocks(src, prec)} if precision == "source" else src.state_dict
        # int8 KV: fp32-KV graphs first, run over calibration text to fix the int8 scales, then rebuilt
        first_kv = KVPrecision("fp32" if kv_dtype == "int8" else kv_dtype)
        for stage in dg.build_stages(spec, weights, prec, ctx, cuts[1:-1], progress=bar.update, kv=first_kv):
            build.save_graph(stage.builder, stage.manifest_entry(f"graphs/{stage.name}.onnx"))
        bar.close()
        kv = first_kv
        if kv_dtype == "int8":
            kv = _int8_kv(tmp, src, spec, prec, ctx, build.graphs, calibration, progress)
            for old in (tmp / "graphs").iterdir():  # onnx appends to an existing external-data file
                old.unlink()
            build.graphs.clear()
            for stage in dg.build_stages(spec, weights, prec, ctx, cuts[1:-1], kv=kv):
                build.save_graph(stage.builder, stage.manifest_entry(f"graphs/{stage.name}.onnx"))
        exit_entries = []
        if exits:
            build.save_graph(dg.build_exit_head(spec, weights, prec),
                             {"name": "exit_head", "role": "exit_head",
                              "inputs": [dg.HIDDEN_IN, dg.LOGITS_TO_KEEP], "outputs": [dg.LOGITS]})
            exit_entries = [{"layer": e, "after_stage": cuts.index(e) - 1, "head": "exit_head", "adapter": None}
                            for e in exits]
        if len(build.graphs) > 1:
            _share_stage_weights(tmp, build.graphs)
        build.write_tokenizer(src.tokenizer_json)
        build.write_manifest(_manifest(src, spec, prec, ctx, build.graphs, exit_entries, target, kv))
        if exit_adapters:  # fitted on the complete package in the staging folder, then listed in it
            _add_exit_adapters(tmp, src, build.graphs, exit_entries, adapter_rank, calibration, progress)
            build.write_manifest(_manifest(src, spec, prec, ctx, build.graphs, exit_entries, target, kv))
        if exit_vocab:  # VocabTrim: the exit head keeps the tokens the model uses (export/decoder/vocab_trim.py)
            add_trimmed_exit_head(tmp, spec, weights, prec, build.graphs, exit_vocab, calibration, progress)
            build.write_manifest(_manifest(src, spec, prec, ctx, build.graphs, exit_entries, target, kv))
    return build.result()


def _checked_precision(src: SourceModel, precision: str | None, target: str, model_type: str) -> str:
    """The precision to export at: the GGUF file's own blocks by default where they can be carried over,
    else int4 (cpu) / fp16 (gpu) / int8 (npu). Says which tensors a re-quantization changes."""
    exact_ok = bool(src.blocks) and target == "cpu" and kind_for(model_type) == "decoder"
    if precision is None:
        precision = "source" if exact_ok else {"cpu": "int4", "gpu": "fp16", "npu": "int8"}[target]
    if precision == "source" and not exact_ok:
        where = ("a GGUF file of a hand-built family (llama, qwen2, qwen3, gemma3)" if not src.blocks
                 else "the cpu target of a dense model")
        raise ExportError(f"--precision source keeps a GGUF file's own quantization, which needs {where}: "
                          "choose int4, int8, fp16 or fp32.")
    if precision == "source":
        for type_name, names in src.requantized.items():
            print(f"warning: {len(names)} tensor(s) of GGUF type {type_name} ({_name_list(names)}) have no exact "
                  "MatMulNBits form: re-quantized to int8 blocks of 32.", file=sys.stderr)
    elif src.tensor_types:
        groups: dict[str, list[str]] = {}
        for name, type_name in src.tensor_types.items():
            if name in src.blocks:
                groups.setdefault(type_name, []).append(name)
        verb = "re-quantizing" if precision in ("int4", "int8") else "dequantizing"
        for type_name, names in sorted(groups.items()):
            print(f"note: {verb} {len(names)} {type_name} tensor(s) of the GGUF file to {precision} "
                  f"({_name_list(names)}); the default (--precision source) keeps them as they are.",
                  file=sys.stderr)
    return precision


def _name_list(names: list[str], limit: int = 3) -> str:
    roles = list(dict.fromkeys(n.split(".layers.")[-1].split(".", 1)[-1] if ".layers." in n else n for n in names))
    return ", ".join(roles[:limit]) + (f", +{len(roles) - limit} more" if len(roles) > limit else "")


def _share_stage_weights(tmp: Path, graphs: list[dict]) -> None:
    """Store the weights the stage graphs and the exit head have in common once (the tied
    embedding / LM head table sits in the first stage, the last one and the exit head):
    one ``graphs/weights.data``. Each entry keeps the bytes of weights its graph reads."""
    from edgeinfer.export.graph.shared_weights import share_weights

    for g in graphs:
        path = tmp / g["path"]
        data = path.with_name(path.name + ".data")
        g["weight_bytes"] = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    share_weights([tmp / g["path"] for g in graphs])


def _add_exit_adapters(tmp: Path, src: SourceModel, graphs: list[dict], exit_entries: list[dict],
                       rank: int | None, calibration, progress: bool) -> None:
    from edgeinfer.export.calibration_text import read_paragraphs
    from edgeinfer.export.decoder.exit_adapters import fit_exit_adapters

    texts = read_paragraphs(calibration) if calibration is not None else None
    if progress:
        print("fitting exit adapters on calibration text...", file=sys.stderr)
    fitted = {f["layer"]: f for f in fit_exit_adapters(tmp, src, rank=rank, texts=texts)}
    for e in exit_entries:
        f = fitted[e["layer"]]
        name = f"exit_adapter_{e['layer']}"
        graphs.append({"name": name, "role": "exit_adapter", "path": f["path"], "layer": e["layer"],
                       "inputs": [dg.HIDDEN_IN], "outputs": [dg.HIDDEN_OUT]})
        e["adapter"] = name
        e["adapter_fit"] = {k: f[k] for k in ("rank", "train_tokens", "heldout_tokens", "agreement_raw",
                                               "agreement_adapted")}
        if progress:
            print(f"  exit {e['layer']}: held-out top-1 agreement with the final layer "
                  f"{f['agreement_raw']:.3f} raw -> {f['agreement_adapted']:.3f} adapted", file=sys.stderr)


def _export_npu(src: SourceModel, out: Path, max_context: int | None, force: bool, prefill_chunk: int | None,
                calibration, activation_bits: int, precision: str) -> ExportResult:
    from edgeinfer.export.npu.export import export_npu

    if src.config.get("model_type", "") not in FAMILIES:
        raise ExportError(f"the npu target needs a hand-built family (one of {', '.join(sorted(FAMILIES))}).")
    if precision not in ("int8", "int4"):
        raise ExportError(f"the npu target stores int8 (or int4) weights, not {precision}: pass --precision int8.")
    weight_bits = 4 if precision == "int4" else 8
    return export_npu(
        src, out, max_context=max_context, force=force, prefill_chunk=prefill_chunk, calibration=calibration,
        activation_bits=activation_bits, weight_bits=weight_bits,
        manifest_base=lambda spec: _manifest(src, spec, Precision("fp32"), 0, [], []))


def _export_monolithic(src: SourceModel, out: Path, precision: str, max_context: int | None, force: bool,
                       block_size: int) -> ExportResult:
    from edgeinfer.export.optimum import export_monolithic

    cfg = src.config
    print(f"note: no hand-built graph for family '{cfg.get('model_type')}': exporting through optimum as one "
          "monolithic graph (plain and lookup decoding only; no stages or exits).", file=sys.stderr)
    limit = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or DEFAULT_MAX_CONTEXT)
    ctx = int(max_context or min(limit, DEFAULT_MAX_CONTEXT))
    with PackageBuild(out, force) as build:
        entry, io, kv = export_monolithic(src, build.folder / "graphs", precision, block_size)
        build.write_tokenizer(src.tokenizer_json)
        from edgeinfer import __version__

        build.write_manifest(Manifest(
            kind="decoder", family=cfg.get("model_type"), name=src.name,
            source={"kind": src.kind, "location": src.location, "model_type": cfg.get("model_type")},
            exporter={"edgeinfer": __version__, "via": "optimum"},
            architecture={"vocab_size": int(cfg.get("vocab_size")),
                          "hidden_size": int(cfg.get("hidden_size") or cfg.get("n_embd") or 0),
                          "num_layers": kv["num_layers"], "num_kv_heads": kv["num_kv_heads"],
                          "head_dim": kv["head_dim"], "tie_embeddings": bool(cfg.get("tie_word_embeddings"))},
            graphs=[GraphEntry.from_dict(entry)], io=io,
            kv_cache=KVCacheSpec(layout="BNSH", dtype="float32", num_layers=kv["num_layers"],
                                 num_kv_heads=kv["num_kv_heads"], head_dim=kv["head_dim"], max_context=ctx,
                                 shared_buffer=False),
            quantization={"weights": precision, **({"block_size": block_size, "accuracy_level": 4,
                                                    "scheme": "symmetric-rtn (onnxruntime MatMulNBitsQuantizer)"}
                                                   if precision in ("int4", "int8") else {})},
            tokenizer=TokenizerSpec.from_dict({"file": "tokenizer.json", "chat_template": src.chat_template,
                                               **src.special}),
            generation=GenerationSpec.from_dict({"max_new_tokens": 256, **src.generation})))
    return build.result()


def _manifest(src: SourceModel, spec, prec: Precision, ctx: int, graphs: list[dict], exits: list[dict],
              target: str = "cpu", kv: KVPrecision | None = None) -> Manifest:
    """The manifest of a dense decoder package (the npu exporter replaces what differs)."""
    from edgeinfer import __version__

    kv = kv or KVPrecision()
    return Manifest(
        kind="decoder", family=spec.family, name=src.name,
        source={"kind": src.kind, "location": src.location, "model_type": src.config.get("model_type")},
        exporter={"edgeinfer": __version__}, target=target,
        architecture=spec.as_manifest(),
        graphs=[GraphEntry.from_dict(g) for g in graphs],
        io=dg.decoder_io(),
        kv_cache=KVCacheSpec.from_dict({"layout": "BNSH", "num_layers": spec.layers, "num_kv_heads": spec.kv_heads,
                                        "head_dim": spec.head_dim, "max_context": ctx, "shared_buffer": True,
                                        "sliding_windows": spec.windows, **kv.describe()}),
        quantization={**prec.describe(), **_source_types(src, prec)},
        tokenizer=TokenizerSpec.from_dict({"file": "tokenizer.json", "chat_template": src.chat_template,
                                           **src.special}),
        generation=GenerationSpec.from_dict({"max_new_tokens": 256, **src.generation}),
        exits=[ExitEntry.from_dict(e) for e in exits])


def _int8_kv(tmp: Path, src: SourceModel, spec, prec: Precision, ctx: int, graphs: list[dict],
             calibration, progress: bool) -> KVPrecision:
    """int8 KV with scales measured by running the fp32-KV graphs just written to TMP over calibration
    text (export/decoder/kv_precision.py)."""
    from edgeinfer.export.decoder import kv_precision
    from edgeinfer.export.quant.calibrate import calibration_samples
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.decoders.staged import StagedDecoder
    from edgeinfer.package import open_package

    if progress:
        print("calibrating int8 KV scales on calibration text...", file=sys.stderr)
    write_manifest(tmp, _manifest(src, spec, prec, ctx, graphs, []))
    pkg = open_package(tmp, verify=False)
    decoder = StagedDecoder(pkg, resolve_provider("cpu", None, spec=pkg.spec), max_context=ctx)
    samples = calibration_samples(src.tokenizer_json, calibration, min(ctx, 512))
    keys, values = kv_precision.measure_kv_ranges(decoder, samples)
    del decoder
    quant = kv_precision.QUANT_TYPE
    return KVPrecision("int8", kv_precision.scales_from_ranges(keys, values, quant), quant)


def _check_exact_blocks(exact_blocks: bool, precision: str | None) -> None:
    if exact_blocks and precision not in (None, "source"):
        raise ExportError(f"--exact-blocks keeps a GGUF file's own blocks, which only --precision source carries, "
                          f"not {precision}: drop --exact-blocks or export with --precision source.")


def _source_blocks(src: SourceModel, prec: Precision) -> dict:
    """The GGUF file's block weights as the graphs carry them: exactly, but for 5- and 6-bit ones re-blocked
    for int8 activations (Precision.reblocks_narrow_types)."""
    if not prec.reblocks_narrow_types:
        return src.blocks
    from edgeinfer.export.sources.gguf_tensors import reblocked_8bit

    return {name: reblocked_8bit(w, src.state_dict.get(name)) for name, w in src.blocks.items()}


def _source_types(src: SourceModel, prec: Precision) -> dict:
    """The GGUF file's tensor types (by count), and which were re-quantized for a source package."""
    if not src.tensor_types:
        return {}
    counts: dict[str, int] = {}
    for t in src.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    out = {"source_types": dict(sorted(counts.items()))}
    if prec.name == "source" and src.requantized:
        out["requantized"] = {t: len(names) for t, names in src.requantized.items()}
    return out
