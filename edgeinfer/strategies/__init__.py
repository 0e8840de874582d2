"""Decoding strategies: each decides the next token(s) given the models and caches.

All share one interface (``prefill(ids) -> logits``, ``advance(token, sampler,
history) -> [(token, logprob, source)]``, ``stats``) and the decode loop in
``edgeinfer.generation``. Lossless ones (``lookup``, ``self-speculative``,
``adaptive``) verify drafts with :func:`accept_draft` and trim caches on rejection.
"""

from .base import Strategy, accept_draft
from .early_exit import EarlyExit
from .lookup import PromptLookup
from .plain import Plain
from .self_speculative import AdaptiveSelfSpeculative, SelfSpeculative

STRATEGIES = {"plain": Plain, "early-exit": EarlyExit, "self-speculative": SelfSpeculative,
              "adaptive": AdaptiveSelfSpeculative, "lookup": PromptLookup}

__all__ = ["STRATEGIES", "Strategy", "accept_draft", "Plain", "EarlyExit", "SelfSpeculative",
           "AdaptiveSelfSpeculative", "PromptLookup"]
