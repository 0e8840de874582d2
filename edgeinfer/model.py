"""The public runtime object: ``edgeinfer.load(path) -> Model``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

from edgeinfer.runtimes import resolve_provider

from .constraints import compile_constraint, constraint_params
from .decoders import StagedDecoder
from .decoders.base import PREFILL_TAIL
from .errors import ContextLengthError, GenerationError, PackageError
from .generation import Generation, GenerationConfig, GenerationResult, run_generation
from .memory import check_dense_budget
from .package import Package, open_package
from .strategies import make_strategy
from .tokenizer import TextTokenizer

Messages = list[dict]
STRATEGY_OPTIONS = ("threshold", "draft_len", "exit_layer", "confidence", "tau", "window", "min_hold", "entropy_of",
                    "fallback_threshold", "rollback_threshold", "pair")


def load(path: str | os.PathLike, provider: str = "auto", threads: int | None = None,
         max_context: int | None = None, verify: bool | None = None,
         little: str | os.PathLike | Model | None = None, memory_budget: int | str | None = None,
         allow_fallback: bool = False, parallel: int = 1, prompt_cache=None, kv_dtype: str | None = None) -> Model:
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
    parallel: sequences decoded together (continuous batching, edgeinfer/batching/): with N > 1,
    up to N generations of this model run at once, from any threads, each with its own KV cache
    slot (plain decoding); more wait for a free slot. 1 (the default): one generation at a time.
    path (and little) may also name an alias (``smollm2-135m``), a ``.gguf`` file or a Hugging Face
    folder: it is exported once into the package cache (edgeinfer/package_cache.py) and reused.
    prompt_cache: save long prompts' KV to disk and restore it after a restart (docs/prompt-cache.md):
    None/False = off, True = the default folder (``~/.cache/edgeinfer/prompts``), a folder, or an
    ``edgeinfer.prompt_cache.PromptCache``.
    kv_dtype: ``fp32``, ``fp16`` or ``int8`` KV cache (docs/kv-cache.md). It is fixed in a package's
    graphs at export: a package of another KV dtype is refused; an alias, .gguf file or HF folder is
    exported into the cache with that KV dtype. None: the package's own.
    """
    from .decoders.kv_cache import check_package_kv_dtype, checked_kv_dtype
    from .package_cache import resolve_model

    path = resolve_model(path, kv_dtype=checked_kv_dtype(kv_dtype))
    pkg = open_package(path, verify=verify)
    check_package_kv_dtype(pkg.spec, kv_dtype, str(path))
    if pkg.kind == "encoder-decoder":  # Whisper and other encoder-decoder families
        from .seq2seq import Seq2SeqModel

        refused = [name for name, value in (("little", little), ("memory_budget", memory_budget),
                                            ("max_context", max_context),
                                            ("parallel", None if parallel == 1 else parallel)) if value is not None]
        if refused:
            raise PackageError(f"'{path}' is an encoder-decoder package: {', '.join(refused)} apply to decoder "
                               "packages (its decoder holds the positions its manifest gives).")
        model = Seq2SeqModel(pkg, provider=provider, threads=threads, allow_fallback=allow_fallback)
        if prompt_cache:
            from .prompt_cache import skip_unsupported

            skip_unsupported(model.name, "an encoder-decoder package")
        return model
    if pkg.kind != "decoder":
        raise PackageError(f"package '{path}' is a {pkg.kind} package; this runtime loads decoder packages.")
    if little is not None and parallel != 1:
        raise GenerationError("big/little decoding runs one sequence at a time: load with parallel=1 to use a "
                              "little model.")
    model = Model(pkg, provider=provider, threads=threads, max_context=max_context, memory_budget=memory_budget,
                  allow_fallback=allow_fallback, parallel=parallel)
    if little is not None:
        if not isinstance(little, Model):
            little = resolve_model(little)
            little_pkg = open_package(little, verify=verify)
            if little_pkg.kind != "decoder":
                raise PackageError(f"the little package '{little}' is a {little_pkg.kind} package: "
                                   "big/little decoding needs a decoder package of the same tokenizer.")
            little = Model(little_pkg, provider=provider, threads=threads, max_context=max_context)
        model.attach_little(little)
    if prompt_cache:
        model.use_prompt_cache(prompt_cache)
    return model


class Model:
    def __init__(self, pkg: Package, provider: str = "auto", threads: int | None = None,
                 max_context: int | None = None, memory_budget: int | str | None = None,
                 allow_fallback: bool = False, parallel: int = 1):
        self.package = pkg
        spec = pkg.spec
        if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
            raise GenerationError(f"parallel must be an integer >= 1 (sequences decoded together), got {parallel!r}.")
        if spec.moe is None:  # MoE budgets bound the expert cache (edgeinfer/moe/)
            check_dense_budget(pkg, memory_budget, max_context, parallel)
        self.target = resolve_provider(provider, threads, spec=pkg.spec, allow_fallback=allow_fallback)
        self.tokenizer = TextTokenizer(pkg)
        if spec.graph("monolithic") is not None:
            from .decoders.monolithic import MonolithicDecoder

            self.decoder = MonolithicDecoder(pkg, self.target, max_context=max_context)
        elif spec.moe is not None:  # sparse MoE: experts streamed from the expert store
            from .memory import parse_memory_budget
            from .moe.decoder import MoEDecoder

            self.decoder = MoEDecoder(pkg, self.target, max_context=max_context,
                                      memory_budget=parse_memory_budget(memory_budget))
        elif spec.target == "npu":  # static shapes, QDQ: two fixed-chunk graphs
            from .decoders.static import StaticDecoder

            self.decoder = StaticDecoder(pkg, self.target, max_context=max_context)
        else:
            self.decoder = StagedDecoder(pkg, self.target, max_context=max_context)
        self.defaults = spec.generation
        self.engine = None  # continuous batching (edgeinfer/batching/) when loaded with parallel > 1
        if parallel > 1:
            if not self.decoder.slots:
                raise GenerationError(f"'{self.name}' cannot decode several sequences together (its decoder is "
                                      "not the staged one: sparse-MoE, npu and optimum packages): load it with "
                                      "parallel=1.")
            from .batching import BatchEngine

            self.engine = BatchEngine(self.decoder, parallel)
        self.little: Model | None = None  # the draft / little model of the big/little strategies
        self._learned: dict = {}  # what strategies measured in earlier generations (Strategy.resume)
        self.cached_tokens: list[int] = []  # what the KV cache holds, for prefix reuse
        self.prompt_cache = None  # prompt prefixes on disk (edgeinfer/prompt_cache/): use_prompt_cache
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread running a generation
        self._open: Generation | None = None

    @property
    def name(self) -> str:
        return self.package.name

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

    def use_prompt_cache(self, cache) -> None:
        """Save long prompts' KV to disk and restore the longest saved prefix of a new prompt (CACHE: True,
        a folder or a PromptCache; None/False turns it off). A decoder whose KV cannot be saved keeps it
        off, with a warning."""
        from .prompt_cache import as_prompt_cache

        cache = as_prompt_cache(cache)
        with self._lock:
            self.prompt_cache = cache.bind(self) if cache is not None else None
            if self.engine is not None:  # a batched model: the engine restores and saves its slots' prompts
                self.engine.prompt_cache = self.prompt_cache

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
        (lossless), ead (``tau``, ``window``, ``min_hold``, ``entropy_of``) and bild
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
        if self.engine is not None:
            if strategy != "plain" or any(v is not None for v in strat_opts.values()):
                raise GenerationError(f"strategy '{strategy}' decodes one sequence at a time; this model decodes "
                                      f"{self.engine.slots} together (loaded with parallel): use strategy plain, "
                                      "or load with parallel=1.")
            return Generation(lambda gen: self._slot_run(gen, ids, config))
        runner = make_strategy(strategy, self.decoder, strat_opts,
                               self.little.decoder if self.little else None)  # validates first
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
        if self.engine is not None:
            self.engine.forget()

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
        if config.num_beams != 1 or config.length_penalty != 1.0 or config.early_stopping is not False:
            raise GenerationError("beam search (num_beams, length_penalty, early_stopping) is for encoder-decoder "
                                  "packages: a decoder package decodes one sequence, use num_beams 1.")
        if config.timestamp_rules is not None:
            raise GenerationError("timestamp_rules are Whisper's: a decoder package takes none.")
        return config

    def _reusable_prefix(self, ids: list[int]) -> int:
        """Keep the cache's common prefix with IDS, less the last PREFILL_TAIL tokens of IDS (which keeps
        the output that of a cold prompt)."""
        cached = self.cached_tokens
        n = 0
        limit = min(len(cached), len(ids) - PREFILL_TAIL, self.decoder.length)
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
            strategy.resume(self._learned)
            try:
                reuse = self._reusable_prefix(ids)
                t_restore = time.perf_counter()
                if self.prompt_cache is not None:  # a longer prefix saved on disk (edgeinfer/prompt_cache/)
                    reuse = self.prompt_cache.restore(ids, reuse)
                t_restore = time.perf_counter() - t_restore
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
                if self.prompt_cache is not None:
                    self.prompt_cache.save(ids)
                    if gen.result is not None:  # the restore is part of the time to the first token
                        gen.result.ttft_s += t_restore
                        gen.result.total_s += t_restore
                        gen.result.stats["prompt_cache"] = self.prompt_cache.report()
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

    def _slot_run(self, gen: Generation, ids: list[int], config: GenerationConfig):
        """One generation of a batched model (loaded with parallel > 1): a KV slot of the engine for
        as long as it runs (waiting for one while all are busy), then the one decode loop."""
        from .batching import SlotStrategy

        slot = self.engine.acquire(lambda: gen.cancelled)
        if slot is None:  # cancelled while waiting
            gen.result = GenerationResult(text="", tokens=[], prompt_tokens=len(ids), new_tokens=0,
                                          finish_reason="cancelled", ttft_s=0.0, decode_tok_s=0.0, total_s=0.0)
            return
        strategy = SlotStrategy(self.engine, slot, self.tokenizer.eos_token_ids)
        try:
            yield from run_generation(gen, strategy, self.tokenizer, ids, config, 0)
            if gen.result is not None:  # the prompt tokens a slot's cache held (not prefilled)
                gen.result.reused_prompt_tokens = strategy.reused
        finally:
            self.engine.release(slot)

    def _end_open_generation(self) -> None:
        if self._owner == threading.get_ident() and self._open is not None:
            self._open.close()
