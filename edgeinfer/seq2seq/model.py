"""Encoder-decoder packages at run time: ``edgeinfer.load()`` returns a
:class:`Seq2SeqModel` for a package of ``kind: "encoder-decoder"``.

The encoder runs once per input, the cross_kv graph once after it (the cross
K/V of every decoder layer), and the decoder once per step with its growing
self-attention cache (edgeinfer.seq2seq.state). One sequence decodes through the
decoder-only strategies and the one decode loop (edgeinfer.seq2seq.decoder); beams
through edgeinfer.generation.beam. Speech (Whisper) is edgeinfer.seq2seq.whisper.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from edgeinfer.constraints import compile_constraint, constraint_params
from edgeinfer.errors import ContextLengthError, GenerationError, PackageError
from edgeinfer.generation import (
    Generation,
    GenerationConfig,
    LogitsProcessors,
    TimestampRules,
    beam_search,
    run_generation,
)
from edgeinfer.package import Package
from edgeinfer.runtimes import create_session, resolve_provider
from edgeinfer.strategies import make_strategy
from edgeinfer.tokenizer import TextTokenizer

from .decoder import Seq2SeqDecoder
from .state import DecoderStage, DecoderState, StagedDecoderState, check_chain
from .strategies import SEQ2SEQ_STRATEGY_OPTIONS, check_strategy

# the decoding parameters an encoder-decoder generation takes (GenerationConfig's fields that apply)
SEQ2SEQ_PARAMS = ("max_new_tokens", "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size",
                  "repetition_penalty", "temperature", "top_k", "top_p", "seed", "suppress_tokens",
                  "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id")


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


class Seq2SeqModel:
    """An encoder-decoder package: transcribe audio (Whisper) or generate ids from features."""

    def __init__(self, pkg: Package, provider: str = "auto", threads: int | None = None,
                 allow_fallback: bool = False):
        self.package = pkg
        self.target = resolve_provider(provider, threads, spec=pkg.spec, allow_fallback=allow_fallback)
        m = pkg.spec
        self.io = m.io
        try:
            graphs = {g.role: g for g in m.graphs}
            stage_entries = m.graphs_with_role("decoder_stage")
            roles = ("encoder", "cross_kv") + (() if stage_entries else ("decoder",))
            self.sessions = {role: create_session(pkg.path(graphs[role].path), self.target) for role in roles}
            self.layers = m.dimension("decoder_layers")
            self.vocab_size = m.vocab_size
            self.heads, self.head_dim = m.dimension("heads"), m.dimension("head_dim")
            # a staged decoder (export --exits/--stages): stage graphs, the exit head, exit layer -> stages to run
            self.stages = [DecoderStage(e, create_session(pkg.path(e.path), self.target), self.io)
                           for e in stage_entries]
            if self.stages:
                check_chain(self.stages, self.layers, pkg.root)
            self.exit_head = (create_session(pkg.path(graphs["exit_head"].path), self.target)
                              if "exit_head" in graphs else None)
            self.exits = m.exit_stages
            if self.exits and (self.exit_head is None or not self.stages
                               or any(self.stages[n - 1].last != layer for layer, n in self.exits.items())):
                raise PackageError(f"package '{pkg.root}' lists exits its decoder stages do not match: re-export it.")
            self.max_target_positions = m.dimension("max_target_positions")
            self.generation = m.generation
            self.audio = m.audio
            self.window_s = self.audio.window_s if self.audio else 0.0
            if self.generation.eos_token_id is None:
                raise PackageError(f"package '{pkg.root}' names no end-of-sequence token: re-export it.")
            self.eos = {self.generation.eos_token_id}
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
        return self.package.name

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

    def decoder_logits(self, ids: list[int], hidden: np.ndarray | None = None,
                       cross: list[np.ndarray] | None = None) -> np.ndarray:
        """Logits (T, V) of every position of IDS given encoder states HIDDEN or their cross K/V
        CROSS (teacher-forced: for checks and for scoring a search's tokens)."""
        state = self.new_state(cross if cross is not None else self.cross_kv(hidden), 1)
        return state.forward(np.asarray([ids], np.int64))[0]

    def new_state(self, cross: list[np.ndarray], batch: int) -> DecoderState | StagedDecoderState:
        """An empty decoder cache for BATCH sequences (beams) over the cross K/V CROSS."""
        return StagedDecoderState(self, cross, batch) if self.stages else DecoderState(self, cross, batch)

    # -- generation ---------------------------------------------------------------
    def config(self, timestamps: bool = False, **params) -> GenerationConfig:
        """The package's decoding defaults (manifest ``generation``) updated by PARAMS (those of
        SEQ2SEQ_PARAMS), validated; TIMESTAMPS switches Whisper's timestamp grammar on."""
        gen = self.generation
        base = dict(max_new_tokens=gen.max_new_tokens or 224, suppress_tokens=list(gen.suppress_tokens),
                    begin_suppress_tokens=list(gen.begin_suppress_tokens),
                    forced_bos_token_id=gen.forced_bos_token_id, forced_eos_token_id=gen.forced_eos_token_id)
        for key in ("num_beams", "length_penalty", "no_repeat_ngram_size"):
            if getattr(gen, key) is not None:
                base[key] = getattr(gen, key)
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
        limit = int((self.package.spec.text or {}).get("max_source_tokens", 0) or 0)
        if not ids:
            raise GenerationError("the input is empty: give at least one token of text.")
        if limit and len(ids) > limit:
            raise ContextLengthError(f"the input has {len(ids)} tokens but this model's encoder takes at most "
                                     f"{limit}: shorten it or split it into parts.")
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise GenerationError(f"token ids must be in 0..{self.vocab_size - 1}.")
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
            config.constraint = compile_constraint(self.tokenizer, self.vocab_size, **constraint,
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
        default = list((gen.decoder_start_ids_timestamps if timestamps else None) or gen.decoder_start_ids)
        if language is None and task is None:
            return default
        languages, tasks = gen.language_ids, gen.task_ids
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
        prompt = [gen.start_of_transcript_id, languages[language], tasks[task]]
        return prompt if timestamps else prompt + [gen.no_timestamps_token_id]

    def timestamp_rules(self) -> TimestampRules:
        gen = self.generation
        if gen.timestamp_begin is None or gen.no_timestamps_token_id is None:
            raise GenerationError(f"model '{self.name}' has no timestamp tokens.")
        return TimestampRules(gen.timestamp_begin, gen.no_timestamps_token_id, gen.eos_token_id)

    def transcribe(self, path: str | os.PathLike, **options):
        """Transcribe a WAV file (a speech package): see edgeinfer.seq2seq.whisper.transcribe."""
        from .whisper.transcribe import transcribe

        return transcribe(self, path, **options)
