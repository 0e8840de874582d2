"""Generation for every kind of package: the decoding parameters (config), the one chain of
logits processors, the sampler, the decode loop, and beam search (encoder-decoder packages)."""

from .beam import beam_search
from .config import GenerationConfig
from .loop import Generation, GenerationResult, StopMatcher, TokenEvent, run_generation
from .processors import LogitsProcessors, TimestampRules, no_repeat_ngram_bans
from .sampler import Sampler, softmax

__all__ = ["GenerationConfig", "Generation", "GenerationResult", "LogitsProcessors", "Sampler", "StopMatcher",
           "TimestampRules", "TokenEvent", "beam_search", "no_repeat_ngram_bans", "run_generation", "softmax"]
