"""The manifest schema: what ``edgeinfer.json`` says, as dataclasses.

export/ builds a :class:`Manifest` and writes ``to_dict()`` (export/package_writer.py adds
the format and the file table last); the runtime reads ``Package.spec``, the same classes
parsed by :meth:`Manifest.from_dict`, instead of indexing the raw JSON. The generation
defaults and special tokens (:class:`GenerationSpec`), a speech model's front end
(:class:`AudioSpec`), an npu package's fixed shapes (:class:`StaticSpec`) and a sparse-MoE
package's experts (:class:`ExpertsSpec`) are records too; the sizes in ``architecture`` are
read through :meth:`Manifest.dimension` (checked integers) and the weights' storage through
:attr:`Manifest.weights`. What stays a mapping is either a format of its own with its own
checked parser (the expert store's index: edgeinfer/moe/store.py; routing frequencies:
edgeinfer/moe/residency.py) or only reported (``quantization``'s scheme details, ``source``,
``exporter``). Unknown keys are kept (``extra``), so a newer
minor format version reads.

``from_dict`` raises one-sentence PackageErrors on a wrong type; what a section must hold
for a particular kind of package is checked by the code that loads that kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from edgeinfer.errors import PackageError


def _bad(what: str, value: Any) -> PackageError:
    return PackageError(f"package manifest has an invalid {what} ({str(value)[:60]!r}): re-export the package.")


def _int(value: Any, what: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(what, value)
    return value


def _str(value: Any, what: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(what, value)
    return value


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(what, value)
    return value


def _records(value: Any, what: str) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(what, value)
    return value


def _known(cls, d: dict) -> tuple[dict, dict]:
    """D split into the keys that are fields of CLS and the rest."""
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in d.items() if k in names}, {k: v for k, v in d.items() if k not in names}


def _plain(record, skip_none: tuple[str, ...] = ()) -> dict:
    """A record as JSON: its fields in order (those in SKIP_NONE left out when None), then its extra keys."""
    out = {}
    for f in fields(record):
        if f.name == "extra":
            continue
        value = getattr(record, f.name)
        if value is None and f.name in skip_none:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return {**out, **getattr(record, "extra", {})}


@dataclass
class GraphEntry:
    """One ONNX graph of the package: its role and, for stages, the layers it holds."""

    name: str
    role: str
    path: str
    layers: tuple[int, int] | None = None  # [first, last): stage / decoder_stage graphs
    embed: bool | None = None  # the first stage (takes token ids)
    head: bool | None = None  # the last stage (applies the LM head)
    layer: int | None = None  # exit adapters and MoE layers: which layer
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    weight_bytes: int | None = None  # weights one run reads, when graphs share a data file
    sparse: bool | None = None  # MoE layers: routed experts (else a dense FFN)
    io_quantization: dict | None = None  # npu graphs: the QDQ scales of their inputs and outputs
    extra: dict = field(default_factory=dict)  # other role-specific keys (chunk, ...)

    @classmethod
    def from_dict(cls, d: dict) -> GraphEntry:
        known, extra = _known(cls, d)
        layers = known.get("layers")
        if layers is not None:
            if not (isinstance(layers, list) and len(layers) == 2 and all(isinstance(v, int) for v in layers)):
                raise _bad("graph layer range", layers)
            layers = (layers[0], layers[1])
        return cls(name=_str(known.get("name", known.get("role")), "graph name"),
                   role=_str(known.get("role"), "graph role"),
                   path=_str(known.get("path"), "graph path"), layers=layers,
                   embed=None if known.get("embed") is None else bool(known["embed"]),
                   head=None if known.get("head") is None else bool(known["head"]),
                   layer=_int(known.get("layer"), "graph layer", optional=True),
                   inputs=list(known.get("inputs") or []), outputs=list(known.get("outputs") or []),
                   weight_bytes=_int(known.get("weight_bytes"), "graph weight_bytes", optional=True),
                   sparse=None if known.get("sparse") is None else bool(known["sparse"]),
                   io_quantization=(_mapping(known["io_quantization"], "graph io_quantization")
                                    if known.get("io_quantization") is not None else None), extra=extra)

    def to_dict(self) -> dict:
        out = _plain(self, skip_none=("layers", "embed", "head", "layer", "weight_bytes", "sparse",
                                      "io_quantization"))
        for key in ("inputs", "outputs"):  # npu graphs list none
            if not out[key]:
                del out[key]
        return out


@dataclass
class ExitEntry:
    """An early exit: after which stage, through which head (and adapter)."""

    layer: int
    after_stage: int
    head: str = "exit_head"
    adapter: str | None = None
    extra: dict = field(default_factory=dict)  # adapter_fit, ...

    @classmethod
    def from_dict(cls, d: dict) -> ExitEntry:
        known, extra = _known(cls, d)
        return cls(layer=_int(known.get("layer"), "exit layer"),
                   after_stage=_int(known.get("after_stage"), "exit stage"),
                   head=_str(known.get("head", "exit_head"), "exit head"),
                   adapter=_str(known.get("adapter"), "exit adapter", optional=True), extra=extra)

    @property
    def stages(self) -> int:
        """How many stages run before this exit's head."""
        return self.after_stage + 1

    def to_dict(self) -> dict:
        return _plain(self)


@dataclass
class KVCacheSpec:
    """The decoder's self-attention cache: layout, dtype and size."""

    layout: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    shared_buffer: bool
    sliding_windows: list | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> KVCacheSpec:
        known, extra = _known(cls, d)
        return cls(layout=_str(known.get("layout", "BNSH"), "kv_cache layout"),
                   dtype=_str(known.get("dtype", "float32"), "kv_cache dtype"),
                   num_layers=_int(known.get("num_layers"), "kv_cache num_layers"),
                   num_kv_heads=_int(known.get("num_kv_heads"), "kv_cache num_kv_heads"),
                   head_dim=_int(known.get("head_dim"), "kv_cache head_dim"),
                   max_context=_int(known.get("max_context"), "kv_cache max_context"),
                   shared_buffer=bool(known.get("shared_buffer", False)),
                   sliding_windows=known.get("sliding_windows"), extra=extra)

    def to_dict(self) -> dict:
        return _plain(self, skip_none=("sliding_windows",))


@dataclass
class TokenizerSpec:
    """The tokenizer file and the special tokens the runtime needs."""

    file: str
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerSpec:
        known, extra = _known(cls, d)
        eos = known.get("eos_token_ids") or []
        if not isinstance(eos, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise _bad("tokenizer eos_token_ids", eos)
        return cls(file=_str(known.get("file", "tokenizer.json"), "tokenizer file"),
                   chat_template=_str(known.get("chat_template"), "chat template", optional=True),
                   bos_token_id=_int(known.get("bos_token_id"), "bos_token_id", optional=True), eos_token_ids=list(eos),
                   pad_token_id=_int(known.get("pad_token_id"), "pad_token_id", optional=True),
                   bos_token=_str(known.get("bos_token"), "bos_token", optional=True),
                   eos_token=_str(known.get("eos_token"), "eos_token", optional=True), extra=extra)

    def to_dict(self, every_token: bool = False) -> dict:
        """EVERY_TOKEN: write the special tokens and the chat template even when None (decoder
        packages list them all; encoder-decoder ones only their EOS)."""
        skip = () if every_token else tuple(f.name for f in fields(self)
                                            if f.name not in ("file", "eos_token_ids", "extra"))
        return _plain(self, skip_none=skip)


def _ints(value: Any, what: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _bad(what, value)
    return list(value)


def _number(value: Any, what: str) -> float | int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _bad(what, value)
    return value


def _token_table(value: Any, what: str) -> dict[str, int]:
    table = _mapping(value, what)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in table.values()):
        raise _bad(what, table)
    return table


@dataclass
class GenerationSpec:
    """The model's decoding defaults and the special tokens decoding needs (manifest ``generation``).
    Decoder packages carry the source's sampling defaults; encoder-decoder packages their start,
    end and suppressed tokens, and Whisper's timestamp and language tokens. Unset fields are not
    written."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_ids: list[int] = field(default_factory=list)
    decoder_start_ids_timestamps: list[int] = field(default_factory=list)
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    suppress_tokens: list[int] = field(default_factory=list)
    begin_suppress_tokens: list[int] = field(default_factory=list)
    no_timestamps_token_id: int | None = None  # Whisper
    timestamp_begin: int | None = None
    english_only: bool | None = None
    start_of_transcript_id: int | None = None
    start_of_prev_id: int | None = None
    no_speech_token_id: int | None = None
    language_ids: dict[str, int] = field(default_factory=dict)
    task_ids: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationSpec:
        known, extra = _known(cls, _mapping(d, "generation"))
        ints = ("max_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size", "eos_token_id", "pad_token_id",
                "forced_bos_token_id", "forced_eos_token_id", "no_timestamps_token_id", "timestamp_begin",
                "start_of_transcript_id", "start_of_prev_id", "no_speech_token_id")
        lists = ("decoder_start_ids", "decoder_start_ids_timestamps", "suppress_tokens", "begin_suppress_tokens")
        values = {k: _int(known.get(k), f"generation {k}", optional=True) for k in ints}
        values.update({k: _number(known.get(k), f"generation {k}")
                       for k in ("temperature", "top_p", "repetition_penalty", "length_penalty")})
        values.update({k: _ints(known.get(k), f"generation {k}") for k in lists})
        values.update({k: _token_table(known.get(k), f"generation {k}") for k in ("language_ids", "task_ids")})
        english = known.get("english_only")
        return cls(**values, english_only=None if english is None else bool(english), extra=extra)

    def to_dict(self) -> dict:
        return {k: v for k, v in _plain(self).items() if v is not None and v != [] and v != {}}


@dataclass
class AudioSpec:
    """A speech model's log-mel front end (manifest ``audio``)."""

    sampling_rate: int
    n_fft: int
    hop_length: int
    num_mel_bins: int
    frames: int  # mel frames in one encoder window
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> AudioSpec:
        known, extra = _known(cls, _mapping(d, "audio"))
        return cls(**{f.name: _int(known.get(f.name), f"audio {f.name}") for f in fields(cls) if f.name != "extra"},
                   extra=extra)

    @property
    def window_s(self) -> float:
        """Seconds of audio in one encoder window (30 for Whisper)."""
        return self.frames * self.hop_length / self.sampling_rate

    def to_dict(self) -> dict:
        return _plain(self)


@dataclass
class ExpertsSpec:
    """A sparse-MoE package's experts (manifest ``moe``). ``expert_store`` is the store's own index
    (edgeinfer/moe/store.py parses and checks it) and ``routing`` the routing frequencies measured
    at export (edgeinfer/moe/residency.py checks them against the layers and experts)."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    norm_topk_prob: bool
    expert_store: dict
    dense_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate: int | None = None
    router: dict = field(default_factory=dict)  # weights, norms: files of the package; eps
    routing: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> ExpertsSpec:
        known, extra = _known(cls, _mapping(d, "moe"))
        router = _mapping(known.get("router"), "moe router")
        if router and not (isinstance(router.get("weights"), str) and isinstance(router.get("norms"), str)
                           and _number(router.get("eps"), "moe router eps") is not None):
            raise _bad("moe router", router)
        return cls(num_experts=_int(known.get("num_experts"), "moe num_experts"),
                   top_k=_int(known.get("top_k"), "moe top_k"),
                   expert_intermediate=_int(known.get("expert_intermediate"), "moe expert_intermediate"),
                   norm_topk_prob=bool(known.get("norm_topk_prob", False)),
                   expert_store=_mapping(known.get("expert_store"), "moe expert_store"),
                   dense_layers=_ints(known.get("dense_layers"), "moe dense_layers"),
                   shared_expert_intermediate=_int(known.get("shared_expert_intermediate"),
                                                   "moe shared_expert_intermediate", optional=True),
                   router=router,
                   routing=_mapping(known["routing"], "moe routing") if known.get("routing") is not None else None,
                   extra=extra)

    def to_dict(self) -> dict:
        return _plain(self, skip_none=("routing",))


@dataclass
class StaticSpec:
    """The fixed shapes an npu package's graphs were built with (manifest ``static``)."""

    chunk: int  # prompt tokens per prefill run
    max_context: int
    kv_heads: int
    head_dim: int
    heads: int
    num_layers: int
    sliding_windows: list[int] = field(default_factory=list)  # per layer, 0 for global attention
    mask_value: float | None = None  # the additive mask of a hidden position
    kv_update: str = "host"  # who writes the new K/V into the cache
    kv_dtype: str | None = None  # the quantized cache's element type
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> StaticSpec:
        known, extra = _known(cls, _mapping(d, "static"))
        sizes = ("chunk", "max_context", "kv_heads", "head_dim", "heads", "num_layers")
        return cls(**{k: _int(known.get(k), f"static {k}") for k in sizes},
                   sliding_windows=_ints(known.get("sliding_windows"), "static sliding_windows"),
                   mask_value=_number(known.get("mask_value"), "static mask_value"),
                   kv_update=_str(known.get("kv_update", "host"), "static kv_update"),
                   kv_dtype=_str(known.get("kv_dtype"), "static kv_dtype", optional=True), extra=extra)

    def to_dict(self) -> dict:
        return _plain(self, skip_none=("mask_value", "kv_dtype"))


@dataclass
class Manifest:
    """``edgeinfer.json`` without its format header and file table (Package checks those)."""

    kind: str
    family: str
    name: str
    graphs: list[GraphEntry]
    io: dict[str, str]
    kv_cache: KVCacheSpec
    tokenizer: TokenizerSpec
    source: dict = field(default_factory=dict)
    exporter: dict = field(default_factory=dict)
    target: str = "cpu"
    architecture: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    exits: list[ExitEntry] = field(default_factory=list)
    moe: ExpertsSpec | None = None  # sparse MoE: experts, routers, the expert store's index
    static: StaticSpec | None = None  # npu packages: prefill chunk, fixed context, ...
    requires: dict | None = None
    audio: AudioSpec | None = None  # speech encoder-decoder packages: the log-mel front end
    text: dict | None = None  # text encoder-decoder packages: max_source_tokens
    extra: dict = field(default_factory=dict)

    # -- reading -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        """The typed view of a manifest dict (its format header and file table are ignored here)."""
        d = {k: v for k, v in d.items() if k not in ("format", "format_version", "files")}
        known, extra = _known(cls, d)
        io = _mapping(known.get("io"), "io table")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in io.items()):
            raise _bad("io table", io)
        optional = {k: _mapping(known[k], k) if known.get(k) is not None else None
                    for k in ("requires", "text")}
        optional["moe"] = ExpertsSpec.from_dict(known["moe"]) if known.get("moe") is not None else None
        optional["static"] = StaticSpec.from_dict(known["static"]) if known.get("static") is not None else None
        optional["audio"] = AudioSpec.from_dict(known["audio"]) if known.get("audio") is not None else None
        return cls(kind=_str(known.get("kind", "decoder"), "kind"), family=_str(known.get("family", "?"), "family"),
                   name=_str(known.get("name", ""), "name"),
                   graphs=[GraphEntry.from_dict(g) for g in _records(known.get("graphs"), "graph list")],
                   io=io, kv_cache=KVCacheSpec.from_dict(_mapping(known.get("kv_cache"), "kv_cache")),
                   tokenizer=TokenizerSpec.from_dict(_mapping(known.get("tokenizer"), "tokenizer")),
                   source=_mapping(known.get("source"), "source"), exporter=_mapping(known.get("exporter"), "exporter"),
                   target=_str(known.get("target") or "cpu", "target"),
                   architecture=_mapping(known.get("architecture"), "architecture"),
                   quantization=_mapping(known.get("quantization"), "quantization"),
                   generation=GenerationSpec.from_dict(known.get("generation")),
                   exits=[ExitEntry.from_dict(e) for e in _records(known.get("exits"), "exit list")],
                   **optional, extra=extra)

    def graphs_with_role(self, role: str) -> list[GraphEntry]:
        return [g for g in self.graphs if g.role == role]

    def graph(self, role: str) -> GraphEntry | None:
        """The (first) graph of ROLE, or None."""
        return next((g for g in self.graphs if g.role == role), None)

    def graph_named(self, name: str) -> GraphEntry | None:
        return next((g for g in self.graphs if g.name == name), None)

    @property
    def stages(self) -> list[GraphEntry]:
        """The decoder stage graphs of a decoder package, in order."""
        return self.graphs_with_role("stage")

    def dimension(self, key: str) -> int:
        """A size the model's ``architecture`` section must give (hidden_size, heads, decoder_layers, ...)."""
        return _int(self.architecture.get(key), f"architecture {key}")

    @property
    def vocab_size(self) -> int:
        return self.dimension("vocab_size")

    @property
    def weights(self) -> str:
        """How the weights are stored: source (the GGUF's own blocks), int4, int8, fp16 or fp32."""
        return str(self.quantization.get("weights", "?"))

    @property
    def exit_stages(self) -> dict[int, int]:
        """Exit layer -> stages run before its head."""
        return {e.layer: e.stages for e in self.exits}

    # -- writing -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The manifest as export/package_writer.py writes it (before the file table)."""
        out = _plain(self, skip_none=("moe", "static", "requires"))
        out["graphs"] = [g.to_dict() for g in self.graphs]
        out["kv_cache"] = self.kv_cache.to_dict()
        out["tokenizer"] = self.tokenizer.to_dict(every_token=self.kind == "decoder")
        out["exits"] = [e.to_dict() for e in self.exits]
        out["generation"] = self.generation.to_dict()
        if self.audio is not None:
            out["audio"] = self.audio.to_dict()
        if self.static is not None:
            out["static"] = self.static.to_dict()
        if self.moe is not None:
            out["moe"] = self.moe.to_dict()
        if self.kind == "decoder":  # audio/text belong to encoder-decoder packages
            out.pop("audio")
            out.pop("text")
        return out
