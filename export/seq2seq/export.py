"""``edgeinfer export`` for encoder-decoder sources: Whisper from a CTranslate2
folder (the ``whisper-tiny.en`` alias) or a Hugging Face folder; T5/Flan-T5/mT5,
BART/mBART and Marian from Hugging Face folders.

Writes three graphs (encoder, cross_kv, decoder; see ``seq2seq_graph``), the
tokenizer, and a manifest of ``kind: "encoder-decoder"`` that tells the runtime
the IO names, the special tokens and the audio front-end's settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgeinfer.export.base import ExportResult, PackageBuild, refuse_existing
from edgeinfer.export.graph.blocks import PRECISIONS, Precision
from edgeinfer.export.seq2seq import graph as sg
from edgeinfer.export.sources.ct2_reader import is_ct2_folder, read_ct2_folder
from edgeinfer.models import bart, kind_for, t5, whisper
from edgeinfer.models.seq2seq_base import Seq2SeqSpec

from edgeinfer.errors import ExportError
from edgeinfer.package import AudioSpec, ExitEntry, GenerationSpec, GraphEntry, KVCacheSpec, Manifest, TokenizerSpec

# Whisper's audio front-end (fixed by the model: 30 s windows of 16 kHz audio, 10 ms hops)
AUDIO = {"sampling_rate": 16000, "n_fft": 400, "hop_length": 160}


@dataclass
class Seq2SeqSource:
    name: str
    kind: str  # "ct2" | "hf-folder"
    location: str
    spec: Seq2SeqSpec
    weights: dict[str, np.ndarray]
    tokenizer_json: str
    generation: dict = field(default_factory=dict)


def seq2seq_source_path(source: str) -> Path | None:
    """The folder of SOURCE if it is an encoder-decoder source this exporter reads, else None."""
    from edgeinfer.export.sources.aliases import resolve_alias

    if not isinstance(source, str):
        return None
    if source.lower().replace("_", "-") in ("whisper-tiny.en", "whisper-tiny-en"):
        return resolve_alias("whisper-tiny.en").parent
    path = Path(source).expanduser()
    if is_ct2_folder(path):
        return path
    cfg = path / "config.json"
    if path.is_dir() and cfg.is_file():
        try:
            model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, UnicodeDecodeError, AttributeError):
            return None
        if kind_for(model_type) == "encoder-decoder":
            return path
    return None


def load_seq2seq_source(folder: Path, name: str | None = None) -> Seq2SeqSource:
    if is_ct2_folder(folder):
        return _load_ct2(folder, name)
    return _load_hf(folder)


def _load_ct2(folder: Path, name: str | None) -> Seq2SeqSource:
    ct2 = read_ct2_folder(folder)
    if ct2.spec != "WhisperSpec":
        raise ExportError(f"'{folder}' holds a CTranslate2 {ct2.spec}; only WhisperSpec models are read.")
    if not ct2.tokenizer_json:
        raise ExportError(f"'{folder}' has no tokenizer.json: edgeinfer needs one to decode Whisper's tokens.")
    try:
        spec = whisper.spec_from_ct2(ct2.variables)
        weights = whisper.weights_from_ct2(ct2.variables, spec)
    except (KeyError, ValueError, IndexError) as e:
        raise ExportError(f"'{folder}/model.bin' is not a Whisper model this exporter understands ({e}).") from None
    ids = _special_ids(ct2.tokenizer_json, ct2.vocabulary)
    gen = _whisper_generation(spec, ids, ct2.config.get("suppress_ids", []),
                              ct2.config.get("suppress_ids_begin", []))
    return Seq2SeqSource(name or folder.name, "ct2", str(folder), spec, weights, ct2.tokenizer_json, gen)


def _load_hf(folder: Path) -> Seq2SeqSource:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, WhisperForConditionalGeneration
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ExportError("exporting needs the export extra: pip install 'edgeinfer[export]'.") from e
    try:
        config = AutoConfig.from_pretrained(str(folder))
        cls = WhisperForConditionalGeneration if config.model_type == "whisper" else AutoModelForSeq2SeqLM
        model = cls.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except OSError as e:
        raise ExportError(f"could not read '{folder}': {str(e).strip().splitlines()[0]}") from None
    cfg = config.to_dict()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    family = cfg["model_type"]
    try:
        if family == "whisper":
            spec = whisper.spec_from_hf(cfg)
            weights = whisper.weights_from_hf(sd, spec)
        elif family in t5.FAMILIES:
            spec = t5.spec_from_hf(cfg)
            weights = t5.weights_from_hf(sd, spec, cfg)
        else:
            spec = bart.spec_from_hf(cfg)
            weights = bart.weights_from_hf(sd, spec)
    except (KeyError, ValueError) as e:
        raise ExportError(f"cannot export this {family} model: {e}.") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"'{folder}' has no fast tokenizer (tokenizer.json); edgeinfer needs one.")
    gen_cfg = model.generation_config.to_dict() if model.generation_config is not None else {}

    def pick(key):
        value = gen_cfg.get(key, cfg.get(key))
        return int(value[0] if isinstance(value, list) else value) if value is not None else None

    start, eos = pick("decoder_start_token_id"), pick("eos_token_id")
    if start is None or eos is None:
        raise ExportError(f"'{folder}' names no decoder_start_token_id or eos_token_id in its config.")
    gen = {"decoder_start_ids": [start], "eos_token_id": eos,
           "suppress_tokens": [int(t) for t in gen_cfg.get("suppress_tokens") or []],
           "begin_suppress_tokens": [int(t) for t in gen_cfg.get("begin_suppress_tokens") or []],
           "max_new_tokens": min(spec.max_target_positions // 2, 256)}
    for key in ("forced_bos_token_id", "forced_eos_token_id", "pad_token_id"):
        if pick(key) is not None:
            gen[key] = pick(key)
    for key in ("num_beams", "length_penalty", "no_repeat_ngram_size"):
        if gen_cfg.get(key) not in (None, 1, 1.0, 0):
            gen[key] = gen_cfg[key]
    no_ts = gen_cfg.get("no_timestamps_token_id")
    if no_ts is not None:
        gen.update(decoder_start_ids=[start, int(no_ts)], no_timestamps_token_id=int(no_ts),
                   timestamp_begin=int(no_ts) + 1, decoder_start_ids_timestamps=[start])
    return Seq2SeqSource(folder.name, "hf-folder", str(folder.resolve()), spec, weights, backend.to_str(), gen)


def _special_ids(tokenizer_json: str, vocabulary: list[str]) -> dict[str, int]:
    ids = {}
    for t in json.loads(tokenizer_json).get("added_tokens", []):
        ids[t["content"]] = int(t["id"])
    for i, tok in enumerate(vocabulary):
        if tok.startswith("<|") and tok not in ids:
            ids[tok] = i
    return ids


def _whisper_generation(spec: Seq2SeqSpec, ids: dict[str, int], suppress: list[int], begin: list[int]) -> dict:
    try:
        sot, eot, no_ts = ids["<|startoftranscript|>"], ids["<|endoftext|>"], ids["<|notimestamps|>"]
    except KeyError as e:
        raise ExportError(f"the Whisper tokenizer lacks the special token {e}: the source is incomplete.") from None
    english_only = spec.vocab_size < 51865  # the multilingual vocabulary has one more token
    prefix = [sot] if english_only else [sot, ids["<|en|>"], ids["<|transcribe|>"]]
    gen = {"decoder_start_ids": prefix + [no_ts], "decoder_start_ids_timestamps": prefix,
           "eos_token_id": eot, "no_timestamps_token_id": no_ts, "timestamp_begin": no_ts + 1,
           "suppress_tokens": sorted({int(t) for t in suppress}),
           "begin_suppress_tokens": sorted({int(t) for t in begin}),
           "max_new_tokens": spec.max_target_positions // 2, "english_only": english_only}
    if not english_only:  # language and task tokens, for transcribe(language=..., task=...)
        gen["start_of_transcript_id"] = sot
        gen["language_ids"] = {tok[2:-2]: i for tok, i in ids.items()
                               if tok.startswith("<|") and tok.endswith("|>") and 2 <= len(tok) - 4 <= 3
                               and tok[2:-2].isalpha() and tok[2:-2].islower()}
        gen["task_ids"] = {t: ids[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in ids}
    return gen


def export_seq2seq(folder: Path, out: str | Path, precision: str = "int8", *, force: bool = False,
                   block_size: int = 32, accuracy_level: int = 4, name: str | None = None,
                   stages: list[int] | None = None, exits: list[int] | None = None,
                   quant_method: str | None = None) -> ExportResult:
    """Export the encoder-decoder model in FOLDER to a package at OUT.

    QUANT_METHOD: how int4/int8 blocks are fitted (export/quant/methods.py; None = the default).

    STAGES and EXITS cut the decoder after those layers (see :func:`decoder_cuts`): one
    ``decoder_stage{i}`` graph per part instead of one ``decoder`` graph, and with exits an
    ``exit_head`` graph (final norm + LM head) that reads any stage's output."""

    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}.")
    out = refuse_existing(out, force)
    src = load_seq2seq_source(Path(folder), name)
    spec = src.spec
    if precision in ("int4", "int8") and (spec.d_model % block_size or spec.ffn % block_size
                                          or spec.inner_dim % block_size):
        raise ExportError(f"--block-size {block_size} does not divide the model's widths ({spec.d_model}, "
                          f"{spec.ffn}): choose a smaller power of two.")
    prec = Precision(precision, block_size=block_size, accuracy_level=accuracy_level, quant_method=quant_method)
    exits = [int(e) for e in exits or []]
    cuts = decoder_cuts(spec.decoder_layers, stages or [], exits)
    with PackageBuild(out, force) as build:
        save, graphs = build.save_graph, build.graphs
        for role, build_graph in (("encoder", sg.build_encoder), ("cross_kv", sg.build_cross_kv)):
            save(build_graph(spec, src.weights, prec), {"name": role, "role": role})
        if len(cuts) == 2:
            save(sg.build_decoder(spec, src.weights, prec), {"name": "decoder", "role": "decoder"})
        for s, (first, last) in enumerate(zip(cuts, cuts[1:])) if len(cuts) > 2 else ():
            stage = f"decoder_stage{s}"
            save(sg.build_decoder_stage(spec, src.weights, prec, first, last, stage),
                 {"name": stage, "role": "decoder_stage", "layers": [first, last],
                  "embed": first == 0, "head": last == spec.decoder_layers})
        if exits:
            save(sg.build_exit_head(spec, src.weights, prec), {"name": "exit_head", "role": "exit_head"})
        if len(cuts) > 2:  # the tied table and other shared tensors: stored once
            from edgeinfer.export.graph.shared_weights import share_weights

            share_weights([build.folder / g["path"] for g in graphs if g["role"] in ("decoder_stage", "exit_head")],
                          "decoder_weights.data")
        build.write_tokenizer(src.tokenizer_json)
        exit_entries = [{"layer": e, "after_stage": cuts.index(e) - 1, "head": "exit_head", "adapter": None}
                        for e in exits]
        build.write_manifest(_manifest(src, prec, graphs, exit_entries))
    return build.result()


def decoder_cuts(num_layers: int, stages: list[int], exits: list[int]) -> list[int]:
    """Stage boundaries ``[0, c1, ..., num_layers]`` of the decoder: every exit and every
    stage cut, each a layer count between 1 and num_layers - 1; exits strictly increasing."""
    for flag, layers in (("--exits", exits), ("--stages", stages)):
        bad = [c for c in layers if not 0 < c < num_layers]
        if bad:
            raise ExportError(f"{flag} {bad[0]} is outside 1..{num_layers - 1}: cuts and exits are layer counts "
                              f"inside this model's {num_layers}-layer decoder.")
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise ExportError(f"--exits must be strictly increasing layer counts, got {','.join(map(str, exits))}.")
    return [0, *sorted(set(stages) | set(exits)), num_layers]


def _manifest(src: Seq2SeqSource, prec: Precision, graphs: list[dict], exits: list[dict]) -> Manifest:
    precision = prec.name
    from edgeinfer import __version__

    spec = src.spec
    return Manifest(
        kind="encoder-decoder", family=spec.family, name=src.name, target="cpu",
        source={"kind": src.kind, "location": src.location, "model_type": spec.family},
        exporter={"edgeinfer": __version__},
        architecture=spec.as_manifest(),
        graphs=[GraphEntry.from_dict(g) for g in graphs],
        io={"input_features": sg.INPUT_FEATURES, "encoder_input_ids": sg.ENCODER_INPUT_IDS,
            "encoder_hidden_states": sg.ENCODER_HIDDEN,
            "input_ids": sg.DECODER_INPUT_IDS, "logits": sg.LOGITS,
            "past_key": sg.PAST_KEY, "past_value": sg.PAST_VALUE,
            "present_key": sg.PRESENT_KEY, "present_value": sg.PRESENT_VALUE,
            "cross_key": sg.CROSS_KEY, "cross_value": sg.CROSS_VALUE,
            "hidden_in": sg.HIDDEN_IN, "hidden_out": sg.HIDDEN_OUT},
        kv_cache=KVCacheSpec(layout="BNSH", dtype="float32", num_layers=spec.decoder_layers,
                             num_kv_heads=spec.heads, head_dim=spec.head_dim,
                             max_context=spec.max_target_positions, shared_buffer=False),
        quantization={**prec.describe(),
                      **({"encoder_and_cross_kv": "int8 per output channel, activations quantized on the fly "
                          "(DynamicQuantizeMatMul)"} if precision == "int8" and spec.frontend == "audio" else {})},
        tokenizer=TokenizerSpec(file="tokenizer.json", eos_token_ids=[src.generation["eos_token_id"]]),
        generation=GenerationSpec.from_dict(src.generation),
        audio=AudioSpec(**AUDIO, num_mel_bins=spec.num_mel_bins,
                        frames=2 * spec.max_source_positions) if spec.frontend == "audio" else None,
        text={"max_source_tokens": spec.max_source_positions} if spec.frontend == "tokens" else None,
        exits=[ExitEntry.from_dict(e) for e in exits])
