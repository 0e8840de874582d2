"""Encoder-decoder packages at run time: ``edgeinfer.load()`` returns a
:class:`Seq2SeqModel` for a package of ``kind: "encoder-decoder"``.

The encoder runs once per input, the cross_kv graph once after it (the cross
K/V of every decoder layer), and the decoder once per step with its growing
self-attention cache. For speech (Whisper) the audio goes through
``edgeinfer.audio``: read in 30 s windows, log-mel features in numpy.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from edgeinfer.runtimes import create_session, resolve_provider

from .audio import Resampler, log_mel_spectrogram, read_wav_info, read_window, resampled_length
from .constraints import compile_constraint, constraint_params
from .decoders.base import Decoder
from .errors import ContextLengthError, GenerationError, PackageError
from .generation import Generation, GenerationConfig, LogitsProcessors, TimestampRules, beam_search, run_generation
from .package import Package
from .seq2seq_stages import DecoderStage, StagedDecoderState, check_chain
from .seq2seq_strategies import SEQ2SEQ_STRATEGY_OPTIONS, check_strategy, merge_stats
from .strategies import make_strategy
from .tokenizer import TextTokenizer
from .whisper_longform import (
    RESET_TEMPERATURE,
    LongFormOptions,
    decode_window,
    kept_tokens,
    previous_text_prompt,
    special_token,
)

# the decoding parameters an encoder-decoder generation takes (GenerationConfig's fields that apply)
SEQ2SEQ_PARAMS = ("max_new_tokens", "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size",
                  "repetition_penalty", "temperature", "top_k", "top_p", "seed", "suppress_tokens",
                  "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id")
SILENCE_PEAK = 10 ** (-60 / 20)  # a window whose loudest sample is below -60 dBFS holds no speech
TIMESTAMP_STEP_S = 0.02
RESUME_MARGIN_S = 1.0  # a window whose last segment ends earlier than this before its end is resumed there


@dataclass
class TranscriptionResult:
    text: str
    segments: list[dict] = field(default_factory=list)
    windows: int = 0
    silent_windows: int = 0
    audio_s: float = 0.0
    elapsed_s: float = 0.0
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    new_tokens: int = 0
    tokens: list[list[int]] = field(default_factory=list)
    strategy: dict | None = None  # early-exit / self-speculative statistics over all windows
    window_stats: list[dict] = field(default_factory=list)  # per decoded window: temperature, checks

    @property
    def inverse_rtf(self) -> float:
        """Seconds of audio transcribed per second of compute."""
        return self.audio_s / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict:
        return {"text": self.text, "segments": self.segments, "windows": self.windows,
                "silent_windows": self.silent_windows, "audio_s": round(self.audio_s, 3),
                "elapsed_s": round(self.elapsed_s, 4), "encoder_s": round(self.encoder_s, 4),
                "decoder_s": round(self.decoder_s, 4), "new_tokens": self.new_tokens,
                "inverse_rtf": round(self.inverse_rtf, 2), "tokens": self.tokens,
                "window_stats": self.window_stats,
                **({"stats": self.strategy} if self.strategy else {})}


@dataclass
class Seq2SeqResult:
    """A text-to-text generation: the text, its tokens and where the time went."""

    text: str
    tokens: list[int]
    input_tokens: int
    encoder_s: float
    ttft_s: float  # input to first new token: encoder + cross K/V + first decoder step
    elapsed_s: float
    decode_tok_s: float  # tokens per second after the first
    finish_reason: str
    strategy: dict | None = None  # early-exit / self-speculative statistics

    def as_dict(self) -> dict:
        return {"text": self.text, "input_tokens": self.input_tokens, "new_tokens": len(self.tokens),
                "encoder_s": round(self.encoder_s, 5), "ttft_s": round(self.ttft_s, 5),
                "elapsed_s": round(self.elapsed_s, 5), "decode_tok_s": round(self.decode_tok_s, 2),
                "finish_reason": self.finish_reason, "tokens": self.tokens,
                **({"stats": self.strategy} if self.strategy else {})}


class DecoderState:
    """Self-attention cache and cross K/V of one generation, batch = beams."""

    def __init__(self, model: Seq2SeqModel, cross: list[np.ndarray], batch: int):
        self.model = model
        self.cross = [np.ascontiguousarray(np.repeat(c, batch, axis=0)) if batch > 1 else c for c in cross]
        heads, head_dim = model.arch["heads"], model.arch["head_dim"]
        empty = np.zeros((batch, heads, 0, head_dim), np.float32)
        self.past = [empty] * (2 * model.layers)

    @property
    def length(self) -> int:
        return self.past[0].shape[2]

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Feed IDS (B, n); the logits (B, n, V) of every fed position."""
        if self.length + ids.shape[1] > self.model.max_target_positions:
            raise GenerationError(f"the decoder holds {self.model.max_target_positions} positions: "
                                  "ask for fewer new tokens.")
        outs = self.model.run_decoder(ids, self.past, self.cross)
        self.past = outs[1:]
        return outs[0]

    def step(self, ids: np.ndarray) -> np.ndarray:
        return self.forward(ids)[:, -1, :]

    def truncate(self, n: int) -> None:
        """Keep positions [0, n)."""
        if self.length > n:
            self.past = [p[:, :, :n] for p in self.past]

    def reorder(self, index: np.ndarray) -> None:
        if not np.array_equal(index, np.arange(len(index))):
            self.past = [p[index] for p in self.past]


class Seq2SeqDecoder(Decoder):
    """One sequence of an encoder-decoder package's decoder over fixed cross K/V, behind the
    decoder protocol (edgeinfer.decoders.base), so that the strategies and the one decode loop
    (edgeinfer.generation.loop) run on it. A staged package (``export --exits/--stages``) is a
    staged decoder: its exits serve early exit and self-speculative decoding.
    LOGITS_LOG: a list that receives the logits row of every full-depth position the decoder
    returns (plain decoding: one per token), to score the tokens without another pass."""

    def __init__(self, model: Seq2SeqModel, cross: list[np.ndarray], logits_log: list[np.ndarray] | None = None):
        super().__init__()
        self.model, self.cross, self.logits_log = model, cross, logits_log
        self.state = model.new_state(cross, 1)
        self.capacity = model.max_target_positions
        self.vocab_size = int(model.arch["vocab_size"])
        self.stages = model.stages
        self.staged = bool(self.stages)
        self.exits = dict(model.exits)

    @property
    def length(self) -> int:
        return self.state.length

    def forward(self, ids, logits_to_keep: int = 1, stages: int | None = None) -> np.ndarray:
        """Feed IDS (1-D) through the first STAGES stages (all by default): the logits
        (logits_to_keep, V) of the last positions, from the exit head below full depth."""
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        if self.length + ids.shape[1] > self.capacity:
            raise ContextLengthError(f"the decoder holds {self.capacity} positions: ask for fewer new tokens.")
        if stages is not None and stages < len(self.stages):
            return self.exit_logits(self.state.forward(ids, stages)[0, -logits_to_keep:], stages)
        return self._logged(self.state.forward(ids)[0, -logits_to_keep:])

    def step(self, token: int) -> np.ndarray:
        return self.forward([token])[0]

    def step_partial(self, token: int, stages: int) -> np.ndarray:
        """One token through the first STAGES stages: that stage's output (D,), left pending."""
        return self.state.forward(np.asarray([[token]], np.int64), stages)[0, -1]

    def catch_up(self, stages: int | None = None, logits_to_keep: int = 1) -> np.ndarray | None:
        """Run the pending rows of stages [1, STAGES): full-depth logits of the last
        LOGITS_TO_KEEP rows, else the rows stage STAGES - 1 produced; None if nothing was pending."""
        out = self.state.catch_up(stages)
        if out is None:
            return None
        if stages is None or stages == len(self.stages):
            return out[0, -logits_to_keep:]
        return out[0]

    def exit_logits(self, hidden: np.ndarray, stages: int | None = None) -> np.ndarray:
        """The exit head on hidden states (P, D) → (P, V)."""
        return self.state.exit_logits(hidden[None])[0]

    def truncate(self, n: int) -> None:
        self.state.truncate(n)

    def trim(self, n: int) -> None:
        self.truncate(self.length - n)

    def reset(self) -> None:
        self.state = self.model.new_state(self.cross, 1)

    def _logged(self, logits: np.ndarray) -> np.ndarray:
        if self.logits_log is not None:
            self.logits_log.append(np.array(logits[-1], np.float32))
        return logits


class Seq2SeqModel:
    """An encoder-decoder package: transcribe audio (Whisper) or generate ids from features."""

    def __init__(self, pkg: Package, provider: str = "auto", threads: int | None = None):
        self.package = pkg
        self.target = resolve_provider(provider, threads)
        m = pkg.manifest
        self.arch = m.get("architecture", {})
        self.io = m.get("io", {})
        try:
            graphs = {g["role"]: g for g in m["graphs"]}
            stage_entries = [g for g in m["graphs"] if g.get("role") == "decoder_stage"]
            roles = ("encoder", "cross_kv") + (() if stage_entries else ("decoder",))
            self.sessions = {role: create_session(pkg.path(graphs[role]["path"]), self.target) for role in roles}
            self.layers = int(self.arch["decoder_layers"])
            # a staged decoder (export --exits/--stages): stage graphs, the exit head, exit layer -> stages to run
            self.stages = [DecoderStage(e, create_session(pkg.path(e["path"]), self.target), self.io)
                           for e in stage_entries]
            if self.stages:
                check_chain(self.stages, self.layers, pkg.root)
            self.exit_head = (create_session(pkg.path(graphs["exit_head"]["path"]), self.target)
                              if "exit_head" in graphs else None)
            self.exits = {int(e["layer"]): int(e["after_stage"]) + 1 for e in m.get("exits") or []}
            if self.exits and (self.exit_head is None or not self.stages
                               or any(self.stages[n - 1].last != layer for layer, n in self.exits.items())):
                raise PackageError(f"package '{pkg.root}' lists exits its decoder stages do not match: re-export it.")
            self.max_target_positions = int(self.arch["max_target_positions"])
            self.generation = m.get("generation", {})
            self.audio = m.get("audio")
            self._window_s = (int(self.audio["frames"]) * int(self.audio["hop_length"])
                              / int(self.audio["sampling_rate"]) if self.audio else 0.0)
            self.eos = {int(self.generation["eos_token_id"])}
            self._cross_names = [n.format(layer=i) for i in range(self.layers)
                                 for n in (self.io["cross_key"], self.io["cross_value"])]
            self._past_names = [n.format(layer=i) for i in range(self.layers)
                                for n in (self.io["past_key"], self.io["past_value"])]
        except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as e:
            raise PackageError(f"package '{pkg.root}' is an encoder-decoder package without a valid {e}: "
                               "re-export it.") from None
        self.tokenizer = TextTokenizer(pkg)
        self.strategy_stats: dict | None = None  # of the last search with an early-exit/self-speculative strategy

    @property
    def name(self) -> str:
        return self.package.manifest.get("name", self.package.root.name)

    @property
    def kind(self) -> str:
        return "encoder-decoder"

    def complete(self, *args, **kwargs):
        """Decoder-only entry points (chat, bench, serve) do not apply: say so in one sentence."""
        raise GenerationError(f"'{self.name}' is an encoder-decoder package: use `edgeinfer run PKG "
                              f"{'audio.wav' if self.audio else 'TEXT'}` or the Python API "
                              f"({'transcribe' if self.audio else 'generate'}); chat, bench and serve take "
                              "decoder packages.")

    chat = complete

    # -- graph calls -------------------------------------------------------------
    def encode(self, inputs: np.ndarray) -> np.ndarray:
        """Encoder hidden states (B, S, D) for log-mel features (B, n_mels, frames) of a speech
        model or token ids (B, S) of a text model."""
        if not isinstance(inputs, np.ndarray):
            self.complete()
        if np.issubdtype(inputs.dtype, np.integer):
            return self.sessions["encoder"].run(None, {self.io["encoder_input_ids"]: inputs.astype(np.int64)})[0]
        return self.sessions["encoder"].run(None, {self.io["input_features"]: inputs.astype(np.float32)})[0]

    def cross_kv(self, hidden: np.ndarray) -> list[np.ndarray]:
        """[key_0, value_0, key_1, ...] of the cross attention, computed once per input."""
        return self.sessions["cross_kv"].run(self._cross_names, {self.io["encoder_hidden_states"]: hidden})

    def run_decoder(self, ids: np.ndarray, past: list[np.ndarray], cross: list[np.ndarray]) -> list[np.ndarray]:
        feed = {self.io["input_ids"]: ids}
        feed.update(zip(self._past_names, past))
        feed.update(zip(self._cross_names, cross))
        return self.sessions["decoder"].run(None, feed)

    def decoder_logits(self, ids: list[int], hidden: np.ndarray) -> np.ndarray:
        """Logits (T, V) of every position of IDS given encoder states (for checks)."""
        state = self.new_state(self.cross_kv(hidden), 1)
        if self.stages:
            return state.forward(np.asarray([ids], np.int64))[0]
        return self.run_decoder(np.asarray([ids], np.int64), state.past, state.cross)[0][0]

    def new_state(self, cross: list[np.ndarray], batch: int) -> DecoderState | StagedDecoderState:
        """An empty decoder cache for BATCH sequences (beams) over the cross K/V CROSS."""
        return StagedDecoderState(self, cross, batch) if self.stages else DecoderState(self, cross, batch)

    # -- generation ---------------------------------------------------------------
    def config(self, timestamps: bool = False, **params) -> GenerationConfig:
        """The package's decoding defaults (manifest ``generation``) updated by PARAMS (those of
        SEQ2SEQ_PARAMS), validated; TIMESTAMPS switches Whisper's timestamp grammar on."""
        gen = self.generation
        base = dict(max_new_tokens=int(gen.get("max_new_tokens", 224)),
                    suppress_tokens=list(gen.get("suppress_tokens", [])),
                    begin_suppress_tokens=list(gen.get("begin_suppress_tokens", [])),
                    forced_bos_token_id=gen.get("forced_bos_token_id"),
                    forced_eos_token_id=gen.get("forced_eos_token_id"))
        for key in ("num_beams", "length_penalty", "no_repeat_ngram_size"):
            if key in gen:
                base[key] = gen[key]
        unknown = sorted(set(params) - set(SEQ2SEQ_PARAMS))
        if unknown:
            raise GenerationError(f"unknown generation parameter(s) for an encoder-decoder package: "
                                  f"{', '.join(unknown)}.")
        base.update({k: v for k, v in params.items() if v is not None})
        if timestamps:
            base["timestamp_rules"] = self.timestamp_rules()
        return GenerationConfig(**base).validate()

    def generate_ids(self, inputs: np.ndarray, prompt: list[int] | None = None, *, timestamps: bool = False,
                     on_token=None, **params) -> list[int]:
        """New token ids for one input (features (1, n_mels, frames) or token ids (1, S)) after
        PROMPT (default: the package's decoder start, e.g. Whisper's start-of-transcript +
        no-timestamps)."""
        return self.search(self.encode(inputs), prompt, timestamps, on_token, params)

    def generate(self, text: str | list[int], *, on_text=None, **params) -> Seq2SeqResult:
        """Text to text (T5, BART, Marian): encode TEXT once, then decode; ``on_text(str)``
        receives the output as it streams (greedy and sampling; beam search at the end)."""
        if self.audio:
            raise GenerationError(f"'{self.name}' is a speech model: use transcribe(path.wav).")
        if isinstance(text, str):
            ids = self.tokenizer.encode(text)
        elif isinstance(text, (list, tuple)) and all(isinstance(t, int) for t in text):
            ids = list(text)
        else:
            raise GenerationError("the input must be text (a str) or a list of token ids.")
        limit = int((self.package.manifest.get("text") or {}).get("max_source_tokens", 0) or 0)
        if not ids:
            raise GenerationError("the input is empty: give at least one token of text.")
        if limit and len(ids) > limit:
            raise ContextLengthError(f"the input has {len(ids)} tokens but this model's encoder takes at most "
                                     f"{limit}: shorten it or split it into parts.")
        if any(t < 0 or t >= int(self.arch["vocab_size"]) for t in ids):
            raise GenerationError(f"token ids must be in 0..{int(self.arch['vocab_size']) - 1}.")
        stream = self.tokenizer.stream()
        first: list[float] = []
        t0 = time.perf_counter()

        def on_token(token: int) -> None:
            if not first:
                first.append(time.perf_counter() - t0)
            if on_text is not None and token not in self.eos:
                piece = stream.add(token)
                if piece:
                    on_text(piece)

        hidden = self.encode(np.asarray([ids], np.int64))
        encoder_s = time.perf_counter() - t0
        tokens = self.search(hidden, None, False, on_token, params)
        elapsed = time.perf_counter() - t0
        if on_text is not None and (tail := stream.flush()):
            on_text(tail)
        out = [t for t in tokens if t not in self.eos]
        first_s = first[0] if first else elapsed
        decode_s = elapsed - first_s
        return Seq2SeqResult(text=self.tokenizer.decode(out), tokens=tokens, input_tokens=len(ids),
                             encoder_s=encoder_s, ttft_s=first_s, elapsed_s=elapsed,
                             decode_tok_s=(len(tokens) - 1) / decode_s if len(tokens) > 1 and decode_s > 0 else 0.0,
                             finish_reason="stop" if tokens and tokens[-1] in self.eos else "length",
                             strategy=self.strategy_stats)

    def search(self, hidden: np.ndarray, prompt: list[int] | None, timestamps: bool, on_token,
                params: dict, cross: list[np.ndarray] | None = None,
                step_logits: list[np.ndarray] | None = None) -> list[int]:
        """The new tokens of one search. CROSS: the cross K/V when the caller has them already;
        STEP_LOGITS: a list that receives the raw logits of each step of a plain one-sequence
        search (greedy or sampled), for scoring without another decoder pass."""
        params = dict(params)
        language, task = params.pop("language", None), params.pop("task", None)
        strategy = params.pop("strategy", None) or "plain"
        options = {k: params.pop(k, None) for k in SEQ2SEQ_STRATEGY_OPTIONS}
        constraint = constraint_params(params)
        config = self.config(**params)
        check_strategy(strategy, config, timestamps)
        if timestamps:
            config.timestamp_rules = self.timestamp_rules()
        if constraint:  # a token mask on greedy / sampled decoding (edgeinfer/constraints.py)
            if config.num_beams > 1 or timestamps:
                raise GenerationError("constraints (json_schema, regex, grammar, choices) apply to greedy or "
                                      "sampled decoding here: use num_beams 1 and no timestamps.")
            config.constraint = compile_constraint(self.tokenizer, int(self.arch["vocab_size"]), **constraint,
                                                   eos_token_ids=sorted(self.eos))
        if prompt is None:
            prompt = self.decoder_prompt(timestamps, language, task)
        if len(prompt) >= self.max_target_positions:
            raise GenerationError(f"the decoder prompt has {len(prompt)} tokens; the decoder holds "
                                  f"{self.max_target_positions}.")
        config.max_new_tokens = min(config.max_new_tokens, self.max_target_positions - len(prompt))
        cross = cross if cross is not None else self.cross_kv(hidden)
        if config.num_beams > 1:
            self.strategy_stats = None
            return beam_search(self.new_state(cross, config.num_beams), prompt, config, self.eos,
                               LogitsProcessors(config, len(prompt)))
        decoder = Seq2SeqDecoder(self, cross, step_logits if strategy == "plain" else None)
        runner = make_strategy(strategy, decoder, options)
        generation = Generation(lambda gen: run_generation(gen, runner, self.tokenizer, prompt, config, 0, self.eos))
        tokens = []
        for event in generation:
            if event.source != "flush":
                tokens.append(event.token_id)
                if on_token is not None:
                    on_token(event.token_id)
        self.strategy_stats = generation.result.stats if strategy != "plain" else None
        return tokens

    def decoder_prompt(self, timestamps: bool = False, language: str | None = None,
                       task: str | None = None) -> list[int]:
        """The forced decoder start: Whisper's start-of-transcript, then (multilingual models)
        the language and task tokens, then no-timestamps unless timestamps are kept."""
        gen = self.generation
        key = "decoder_start_ids_timestamps" if timestamps else "decoder_start_ids"
        default = list(gen.get(key) or gen["decoder_start_ids"])
        if language is None and task is None:
            return default
        languages, tasks = gen.get("language_ids") or {}, gen.get("task_ids") or {}
        if not languages:
            if language in (None, "en") and task in (None, "transcribe"):
                return default
            raise GenerationError(f"'{self.name}' is English-only: it transcribes English and takes no other "
                                  "language or task.")
        language, task = language or "en", task or "transcribe"
        if language not in languages:
            raise GenerationError(f"unknown language '{language}': use a code such as "
                                  f"{', '.join(sorted(languages)[:8])}.")
        if task not in tasks:
            raise GenerationError(f"unknown task '{task}': choose {' or '.join(sorted(tasks))}.")
        prompt = [int(gen["start_of_transcript_id"]), int(languages[language]), int(tasks[task])]
        return prompt if timestamps else prompt + [int(gen["no_timestamps_token_id"])]

    def timestamp_rules(self) -> TimestampRules:
        gen = self.generation
        if "timestamp_begin" not in gen:
            raise GenerationError(f"model '{self.name}' has no timestamp tokens.")
        return TimestampRules(int(gen["timestamp_begin"]), int(gen["no_timestamps_token_id"]),
                              int(gen["eos_token_id"]))

    def transcribe(self, path: str | os.PathLike, *, timestamps: bool = False, on_text=None,
                   temperature_fallback: bool = True, condition_on_previous_text: bool = True,
                   temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold: float | None = 2.4,
                   logprob_threshold: float | None = -1.0, no_speech_threshold: float | None = 0.6,
                   **params) -> TranscriptionResult:
        """Transcribe a WAV file (any rate, mono or not) in 30 s windows, streaming the file.

        ``timestamps`` keeps Whisper's timestamp tokens and returns segments; ``language``
        (a code such as "fr") and ``task`` ("transcribe" or "translate") choose the forced
        tokens of multilingual checkpoints; other parameters are those of
        SEQ2SEQ_PARAMS (num_beams, length_penalty, ...).
        ``on_text(str)`` is called with each window's text as it is ready.

        Long-form robustness (``edgeinfer.whisper_longform``): each window is decoded at the
        first of ``temperatures`` and, when its text compresses more than
        ``compression_ratio_threshold`` or its tokens' average log-probability is below
        ``logprob_threshold``, again by seeded sampling at the next ones
        (``temperature_fallback=False``, or an explicit ``temperature`` > 0, decodes once); a
        window whose no-speech probability exceeds ``no_speech_threshold`` with unsure tokens
        is silence. ``condition_on_previous_text`` puts the previous windows' tokens after
        ``<|startofprev|>`` (packages without that token decode each window alone).
        Per-window statistics are in ``result.window_stats``.
        """
        if not self.audio:
            raise GenerationError(f"model '{self.name}' takes text, not audio.")
        self.decoder_prompt(timestamps, params.get("language"), params.get("task"))  # refuse bad ones first
        self.config(**{k: v for k, v in params.items() if k not in ("language", "task", "strategy", "exit_layer",
                                                                     "threshold", "draft_len")})
        if params.get("temperature"):  # the caller chose one temperature: no schedule
            temperatures = (float(params["temperature"]),)
        elif not temperature_fallback:
            temperatures = (0.0,)
        options = LongFormOptions(temperatures, compression_ratio_threshold, logprob_threshold,
                                  no_speech_threshold, bool(condition_on_previous_text)).validate()
        sot_sequence = self.decoder_prompt(timestamps, params.get("language"), params.get("task"))
        start_of_prev = special_token(self, "start_of_prev_id", ("<|startofprev|>",))
        begin = int(self.generation.get("timestamp_begin", 1 << 62))
        base_seed = int(params.get("seed") or 0)
        history: list[int] = []
        info = read_wav_info(path)
        rate, n_mels = int(self.audio["sampling_rate"]), int(self.audio["num_mel_bins"])
        hop, n_fft = int(self.audio["hop_length"]), int(self.audio["n_fft"])
        n_samples = int(self.audio["frames"]) * hop  # the encoder's window: 30 s for Whisper
        n_total = resampled_length(info, rate)
        resampler = Resampler(info.sample_rate, rate) if info.sample_rate != rate else None
        res = TranscriptionResult(text="", audio_s=info.duration_s)
        texts = []
        t0 = time.perf_counter()
        seek = 0  # in samples at RATE
        while seek < n_total:
            n = min(n_samples, n_total - seek)
            window = read_window(info, seek, n, rate, resampler)
            res.windows += 1
            if window.size == 0 or float(np.abs(window).max()) < SILENCE_PEAK:
                res.silent_windows += 1
                seek += n
                continue
            feats = log_mel_spectrogram(window, n_mels=n_mels, n_samples=n_samples, n_fft=n_fft, hop=hop,
                                        sample_rate=rate)[None]
            te = time.perf_counter()
            hidden = self.encode(feats)
            res.encoder_s += time.perf_counter() - te
            td = time.perf_counter()
            conditioned = options.condition_on_previous_text and start_of_prev is not None
            prompt = (previous_text_prompt(start_of_prev, history, sot_sequence, self.max_target_positions)
                      if conditioned else sot_sequence)
            sot_index = len(prompt) - len(sot_sequence)
            decoded = decode_window(self, hidden, prompt, sot_index, timestamps, params, options,
                                    base_seed + 1009 * res.windows)
            tokens = decoded.tokens
            res.decoder_s += time.perf_counter() - td
            res.window_stats.append({"start_s": round(seek / rate, 2), "prompt_tokens": len(prompt),
                                     **decoded.stats()})
            if decoded.silent:
                res.silent_windows += 1
                res.tokens.append(tokens)
                res.new_tokens += len(tokens)
                seek += n
                continue
            if self.strategy_stats is not None:
                res.strategy = merge_stats(res.strategy, self.strategy_stats)
            res.tokens.append(tokens)
            res.new_tokens += len(tokens)
            full_window_follows = n == n_samples and seek + n < n_total
            text, segments, resume_s = self.window_text(tokens, seek / rate, timestamps, full_window_follows)
            if text:
                texts.append(text)
                res.segments.extend(segments)
                if on_text is not None:
                    on_text(text)
            if decoded.temperature >= RESET_TEMPERATURE:  # an unsure window does not prompt the next
                history = []
            else:
                history += kept_tokens(tokens, self.eos, begin, resume_s is not None)
            # with timestamps, a segment cut by the window's end is decoded again from its start
            seek += int(resume_s * rate) if resume_s is not None else n
        res.text = " ".join(texts)
        res.elapsed_s = time.perf_counter() - t0
        return res

    def window_text(self, tokens: list[int], offset_s: float, timestamps: bool,
                     more_follows: bool = False) -> tuple[str, list[dict], float | None]:
        """Text of a window's tokens and, with timestamps, its segments (times in the file),
        and where to resume (seconds into the window) when the last segment was cut off by the
        window's end and more audio follows — None: go on after the whole window."""
        begin = int(self.generation.get("timestamp_begin", 1 << 62))
        tokens = [t for t in tokens if t not in self.eos]
        if not timestamps:
            return self.tokenizer.decode([t for t in tokens if t < begin]).strip(), [], None
        segments, current, start = [], [], None
        for t in tokens:
            if t >= begin:
                stamp = (t - begin) * TIMESTAMP_STEP_S
                if start is None:
                    start = stamp
                else:
                    text = self.tokenizer.decode(current).strip()
                    if text:
                        segments.append({"start": round(offset_s + start, 2), "end": round(offset_s + stamp, 2),
                                         "text": text})
                    current, start = [], None
            else:
                current.append(t)
        resume = None
        text = self.tokenizer.decode(current).strip() if current else ""
        if text:  # an open segment: the window ended inside it
            open_start = start if start is not None else 0.0
            if more_follows and open_start >= 1.0:
                resume = open_start  # decode it again from its start, in the next window
            else:
                segments.append({"start": round(offset_s + open_start, 2), "end": None, "text": text})
        elif more_follows and segments:
            # the model stopped well before the window's end, often skipping a sentence the end cut
            # in two: go on from the end of the last segment rather than from the window's end
            last_end = segments[-1]["end"] - offset_s
            if 1.0 <= last_end <= self._window_s - RESUME_MARGIN_S:
                resume = last_end
        return " ".join(s["text"] for s in segments), segments, resume
