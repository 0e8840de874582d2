"""The public runtime object: ``edgeinfer.load(path) -> Model``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading

from edgeinfer.runtimes import resolve_provider

from .constraints import compile_constraint, constraint_params
from .decoders import StagedDecoder
from .errors import ContextLengthError, GenerationError, PackageError
from .generation import Generation, GenerationConfig, GenerationResult, run_generation
from .memory import check_dense_budget
from .package import Package, open_package
from .tokenizer import TextTokenizer

Messages = list[dict]
STRATEGY_OPTIONS = ("threshold", "draft_len", "exit_layer", "confidence", "tau", "window", "min_hold",
                    "fallback_threshold", "rollback_threshold")


def make_strategy(name: str, decoder: StagedDecoder, options: dict, little: Model | None = None):
    """Build strategy NAME for DECODER; big/little strategies also get the LITTLE model's decoder."""
    import inspect

    from .strategies import STRATEGIES, PairStrategy

    cls = STRATEGIES.get(name)
    if cls is None:
        raise GenerationError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}.")
    opts = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(opts) - set(inspect.signature(cls).parameters))
    if unknown:
        raise GenerationError(f"strategy '{name}' does not take {', '.join(unknown)}.")
    if issubclass(cls, PairStrategy) and little is not None:
        return cls(decoder, little.decoder, **opts)
    return cls(decoder, **opts)


def load(path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
         max_context: int | None = None, verify: bool | None = None,
         little: str | os.PathLike | Model | None = None, memory_budget: int | str | None = None,
         allow_fallback: bool = False, kv_dtype: str | None = None) -> Model:
    """Load a model package.

    provider: ``auto`` (the best available for the package's target) or an execution provider's short
    name (``cpu``, ``cuda``, ``qnn``, ``openvino``, ...: see edgeinfer.runtimes).
    allow_fallback: run on the CPU (logged) when the provider is unavailable, unsuitable for the
    package, or cannot load a graph, instead of raising ProviderError.
    threads: intra-op threads (default: the cores this process may use).
    max_context: KV capacity to reserve (default: the package's maximum).
    verify: True = sha256 every file, False = sizes only, None = hash files
    not verified before (cached by size and mtime).
    little: a second, smaller decoder package (or loaded Model) with the same
    tokenizer, for the big/little strategies (speculative, ead, bild).
    memory_budget: bytes (or "512MB") the expert cache of a sparse-MoE package
    may hold (default: all experts); for a dense package, what its weights and
    reserved KV cache may take (checked before anything is allocated).
    path (and little) may also name an alias (``smollm2-135m``), a ``.gguf`` file or a Hugging Face
    folder: it is exported once into the package cache (edgeinfer/package_cache.py) and reused.
    kv_dtype: ``fp32``, ``fp16`` or ``int8`` KV cache (docs/kv-cache.md). It is fixed in a package's
    graphs at export: a package of another KV dtype is refused; an alias, .gguf file or HF folder is
    exported into the cache with that KV dtype. None: the package's own.
    """
    from .decoders.kv_cache import check_package_kv_dtype, checked_kv_dtype
    from .package_cache import resolve_model

    path = resolve_model(path, kv_dtype=checked_kv_dtype(kv_dtype))
    pkg = open_package(path, verify=verify)
    check_package_kv_dtype(pkg.manifest, kv_dtype, str(path))
    if pkg.kind == "encoder-decoder":  # Whisper and other encoder-decoder families
        from .seq2seq import Seq2SeqModel

        return Seq2SeqModel(pkg, provider=provider, threads=threads)
    if pkg.kind != "decoder":
        raise PackageError(f"package '{path}' is a {pkg.kind} package; this runtime loads decoder packages.")
    model = Model(pkg, provider=provider, threads=threads, max_context=max_context, memory_budget=memory_budget,
                  allow_fallback=allow_fallback)
    if little is not None:
        if not isinstance(little, Model):
            little = resolve_model(little)
            little_pkg = open_package(little, verify=verify)
            if little_pkg.kind != "decoder":
                raise PackageError(f"the little package '{little}' is a {little_pkg.kind} package: "
                                   "big/little decoding needs a decoder package of the same tokenizer.")
            little = Model(little_pkg, provider=provider, threads=threads, max_context=max_context)
        model.attach_little(little)
    return model


class Model:
    def __init__(self, pkg: Package, provider: str = "auto", threads: int | None = None,
                 max_context: int | None = None, memory_budget: int | str | None = None,
                 allow_fallback: bool = False):
        self.package = pkg
        if "moe" not in pkg.manifest:  # MoE budgets bound the expert cache (edgeinfer/moe/)
            check_dense_budget(pkg, memory_budget, max_context)
        self.target = resolve_provider(provider, threads, manifest=pkg.manifest, allow_fallback=allow_fallback)
        self.tokenizer = TextTokenizer(pkg)
        if any(g.get("role") == "monolithic" for g in pkg.manifest["graphs"]):
            from .decoders.monolithic import MonolithicDecoder

            self.decoder = MonolithicDecoder(pkg, self.target, max_context=max_context)
        elif "moe" in pkg.manifest:  # sparse MoE: experts streamed from the expert store
            from .memory import parse_memory_budget
            from .moe.decoder import MoEDecoder

            self.decoder = MoEDecoder(pkg, self.target, max_context=max_context,
                                      memory_budget=parse_memory_budget(memory_budget))
        elif pkg.manifest.get("target") == "npu":  # static shapes, QDQ: two fixed-chunk graphs
            from .decoders.static import StaticDecoder

            self.decoder = StaticDecoder(pkg, self.target, max_context=max_context)
        else:
            self.decoder = StagedDecoder(pkg, self.target, max_context=max_context)
        self.defaults = pkg.manifest.get("generation", {})
        self.little: Model | None = None  # the draft / little model of the big/little strategies
        self.cached_tokens: list[int] = []  # what the KV cache holds, for prefix reuse
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread running a generation
        self._open: Generation | None = None

    @property
    def name(self) -> str:
        return self.package.manifest.get("name", self.package.root.name)

    @property
    def max_context(self) -> int:
        return self.decoder.capacity

    def attach_little(self, little: Model) -> None:
        """Use LITTLE as the little model of the big/little strategies; it must share our tokenizer."""
        mine, theirs = self.tokenizer, little.tokenizer
        if mine.tokenizer.get_vocab() != theirs.tokenizer.get_vocab():
            raise PackageError(f"'{little.name}' and '{self.name}' have different vocabularies: big/little "
                               "decoding needs two models with the same tokenizer.")
        if (mine.bos_token_id, mine.eos_token_ids) != (theirs.bos_token_id, theirs.eos_token_ids):
            raise PackageError(f"'{little.name}' and '{self.name}' have different special tokens (bos/eos): "
                               "big/little decoding needs two models with the same tokenizer.")
        if little.decoder.vocab_size != self.decoder.vocab_size:
            raise PackageError(f"'{little.name}' has {little.decoder.vocab_size} logits and '{self.name}' "
                               f"{self.decoder.vocab_size}: big/little decoding needs the same output vocabulary.")
        self.little = little

    def encode(self, prompt: str | Messages) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return self.tokenizer.encode_chat(list(prompt))
        raise GenerationError("prompt must be a string or a list of chat messages.")

    def count_tokens(self, prompt: str | Messages) -> int:
        return len(self.encode(prompt))

    def generate(self, prompt: str | Messages | list[int], config: GenerationConfig | None = None,
                 strategy: str = "plain", **params) -> Generation:
        """Stream :class:`TokenEvent` s for PROMPT (text, chat messages, or token ids).

        Parameters are those of :class:`GenerationConfig` (max_new_tokens,
        temperature, top_k, top_p, repetition_penalty, stop, seed, ...) and
        the strategy's: ``strategy`` is one of plain, early-exit,
        self-speculative, adaptive, lookup; their options are ``threshold``,
        ``draft_len``, ``exit_layer``, ``confidence`` (see edgeinfer.strategies).
        With a little model attached (``load(..., little=...)``): speculative
        (lossless), ead (``tau``, ``window``, ``min_hold``) and bild
        (``fallback_threshold``, ``rollback_threshold``, ``draft_len``).
        Constraints (one at most; docs/structured-output.md): ``json_schema`` (dict or JSON text),
        ``json_object=True``, ``regex``, ``grammar`` (Lark or GBNF), ``choices`` (list of strings).
        """
        strat_opts = {k: params.pop(k) for k in list(params) if k in STRATEGY_OPTIONS}
        constraint = constraint_params(params)
        config = self._config(config, params)
        if constraint:  # json_schema, json_object, regex, grammar or choices: a token mask (constraints.py)
            config = dataclasses.replace(config, constraint=compile_constraint(
                self.tokenizer, self.decoder.vocab_size, **constraint))
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.decoder.vocab_size for t in ids):
                raise GenerationError(f"token ids must be in 0..{self.decoder.vocab_size - 1}.")
        else:
            ids = self.encode(prompt)
        if not ids:
            raise GenerationError("the prompt is empty: give at least one token of text.")
        config.validate()
        if len(ids) >= self.max_context:
            remedy = self.decoder.context_remedy
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds {self.max_context}: "
                                     f"shorten the prompt or {remedy}.")
        runner = make_strategy(strategy, self.decoder, strat_opts, self.little)  # validates first
        return Generation(lambda gen: self._locked_run(gen, runner, ids, config))

    def chat(self, messages: Messages, config: GenerationConfig | None = None, **params) -> Generation:
        """Generate the assistant's reply to MESSAGES with the package's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.generate(list(messages), config, **params)

    def complete(self, prompt: str | Messages | list[int], **params) -> GenerationResult:
        """Generate to the end and return the result (text, tokens, timings)."""
        gen = self.generate(prompt, **params)
        gen.text()
        return gen.result

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is computed from scratch)."""
        self._end_open_generation()
        with self._lock:
            self.decoder.reset()
            self.cached_tokens = []

    # -- internals -------------------------------------------------------------
    def _config(self, config: GenerationConfig | None, params: dict) -> GenerationConfig:
        if config is None:
            allowed = GenerationConfig.__dataclass_fields__
            unknown = sorted(set(params) - set(allowed))
            if unknown:
                raise GenerationError(f"unknown generation parameter(s): {', '.join(unknown)}.")
            config = GenerationConfig(**params)
        elif params:
            raise GenerationError("pass either a GenerationConfig or keyword parameters, not both.")
        return config

    def _reusable_prefix(self, ids: list[int]) -> int:
        """Keep the cache's common prefix with IDS (at least one token is always recomputed)."""
        cached = self.cached_tokens
        n = 0
        limit = min(len(cached), len(ids) - 1, self.decoder.length)
        while n < limit and cached[n] == ids[n]:
            n += 1
        self.decoder.truncate(n)
        self.cached_tokens = cached[:n]
        return n

    def _locked_run(self, gen: Generation, strategy, ids: list[int], config: GenerationConfig):
        """One generation at a time per model: the KV cache is the model's. Other threads
        wait their turn; in the thread that holds the model, a new generation ends the
        open one (abandoned by a ``break``, say). Records which tokens the cache holds."""
        self._end_open_generation()
        little = self.little if strategy.little is not None and strategy.little.decoder is not self.decoder else None
        with self._lock, (little._lock if little else contextlib.nullcontext()):
            self._owner, self._open = threading.get_ident(), gen
            try:
                reuse = self._reusable_prefix(ids)
                self.cached_tokens = []  # unknown while running; set when the loop ends cleanly
                # big/little strategies: the whole prompt, the little's cache
                strategy.begin(ids, little.cached_tokens if little else None)
                out = []
                experts_before = self.decoder.expert_stats()  # None unless sparse MoE
                for ev in run_generation(gen, strategy, self.tokenizer, ids, config, reuse):
                    if ev.source != "flush":
                        out.append(ev.token_id)
                    yield ev
                fed = ids + out[:-1]  # the last sampled token was never fed to the model
                self.cached_tokens = fed[: self.decoder.length]
                if experts_before is not None and gen.result is not None:  # MoE: expert cache counters
                    gen.result.stats["experts"] = self.decoder.expert_stats(experts_before).as_dict()
            except BaseException:
                self.decoder.reset()  # an error or an abandoned generation: start clean next time
                if little:
                    little.decoder.reset()
                    little.cached_tokens = []
                raise
            finally:
                self._owner, self._open = None, None

    def _end_open_generation(self) -> None:
        if self._owner == threading.get_ident() and self._open is not None:
            self._open.close()
