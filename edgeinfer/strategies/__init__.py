"""Decoding strategies: each decides the next token(s) given the models and caches.

Big/little ones (``speculative`` lossless; ``ead`` and ``bild`` lossy) drive
two models — another package, or the package's own early exit as the little
one — through :class:`~edgeinfer.strategies.pair.Track`.

All share one interface (``prefill(ids) -> logits``, ``advance(token, sampler,
history) -> [(token, logprob, source)]``, ``stats``) and the decode loop in
``edgeinfer.generation``. Lossless ones (``lookup``, ``self-speculative``,
``adaptive``) verify drafts with :func:`accept_draft` and trim caches on rejection.
"""

from edgeinfer.errors import GenerationError

from .base import Strategy, accept_draft
from .bild import BiLD
from .ead import EntropyAdaptive
from .early_exit import EarlyExit
from .lookup import PromptLookup
from .pair import PairStrategy
from .pair_file import stored_settings
from .plain import Plain
from .self_speculative import AdaptiveSelfSpeculative, SelfSpeculative
from .speculative import Speculative

STRATEGIES = {"plain": Plain, "early-exit": EarlyExit, "self-speculative": SelfSpeculative,
              "adaptive": AdaptiveSelfSpeculative, "lookup": PromptLookup,
              "speculative": Speculative, "ead": EntropyAdaptive, "bild": BiLD}



def make_strategy(name: str, decoder, options: dict, little_decoder=None) -> Strategy:
    """Strategy NAME on DECODER with OPTIONS (None values: the strategy's defaults); big/little
    strategies also get the LITTLE_DECODER (None: the package's own early exit as the little one)."""
    import inspect

    cls = STRATEGIES.get(name)
    if cls is None:
        raise GenerationError(f"unknown strategy '{name}': choose one of {', '.join(STRATEGIES)}.")
    opts = {k: v for k, v in options.items() if v is not None}
    pair = opts.pop("pair", None)
    unknown = sorted(set(opts) - set(inspect.signature(cls).parameters))
    if unknown:
        raise GenerationError(f"strategy '{name}' does not take {', '.join(unknown)}.")
    if issubclass(cls, PairStrategy) and little_decoder is not None:
        # A calibration of this pair (edgeinfer calibrate) gives the defaults; explicit options win.
        packages = decoder.package, little_decoder.package
        stored = stored_settings(*packages, pair) if None not in packages else None
        defaults = stored.defaults(name) if stored else {}
        strategy = cls(decoder, little_decoder, **{**defaults, **opts})
        if stored:
            strategy.stats["calibration"] = {"file": str(stored.path), "used": sorted(set(defaults) - set(opts))}
        return strategy
    if pair is not None:
        raise GenerationError("a pair file holds the settings of a big/little pair: it applies to strategies "
                              "speculative, ead and bild with a little model.")
    return cls(decoder, **opts)


__all__ = ["STRATEGIES", "make_strategy", "Strategy", "accept_draft", "Plain", "EarlyExit", "SelfSpeculative",
           "AdaptiveSelfSpeculative", "PromptLookup", "PairStrategy", "Speculative", "EntropyAdaptive", "BiLD"]
