"""The decoder protocol: what the decode loop, the strategies and ``Model`` may ask of any
back-end (the staged chain, the monolithic optimum graph, the static NPU graphs, the MoE
decoder), with the optional capabilities declared here instead of probed for.

Every decoder has ``length`` (tokens in its cache), ``capacity`` (the most it holds),
``vocab_size``, ``forward(ids, logits_to_keep)``, ``step(token)``, ``truncate(n)``,
``trim(n)`` and ``reset()``. Staged decoders (``staged``) also have per-stage caches with
pending rows (the one stage chain, edgeinfer.decoders.chain): ``pending``, ``stage_length``,
``step_partial``, ``catch_up``, ``exit_logits`` and their ``exits``.
"""

from __future__ import annotations

# A reused prompt prefix (the previous turn's cache, a restored prompt-cache entry) leaves at least
# this many prompt tokens to prefill: a one-token pass runs other kernels (int8 activations at
# accuracy level 4) whose logits differ from a batched prefill's, so keeping all but the last token
# can flip a near-tie; with two or more left, the output is the cold prompt's, bit for bit (SmolLM2).
PREFILL_TAIL = 2


class Decoder:
    """The base every back-end derives from; its defaults are those of a decoder without the capability."""

    staged = False  # per-stage caches with pending rows (edgeinfer.decoders.staged)
    slots = False  # its graphs decode several sequences together (edgeinfer.batching)
    context_remedy = "load with a larger max_context"  # how to get a longer context, for the error message
    package = None  # the Package it runs (set by back-ends loaded from one)

    def __init__(self) -> None:
        self.exits: dict[int, int] = {}  # exit layer -> stages run before the exit head (staged decoders)

    def kv_caches(self) -> list | None:
        """The decoder's KV caches (edgeinfer.decoders.kv_cache.KVCache, host memory) in a fixed order, for
        saving and restoring a prompt's KV (edgeinfer/prompt_cache/); None where the KV cannot be
        saved (fixed-shape NPU graphs, the monolithic graph's growing tensors, KV on an accelerator)."""
        return None

    def set_exit_context(self, tokens) -> None:
        """The context's tokens (a prompt), which a vocabulary-trimmed exit head (export --exit-vocab)
        scores besides its own list; a no-op for every other decoder."""

    def expert_stats(self, since=None):
        """Expert-cache counters of a sparse-MoE decoder (since an earlier snapshot); None for dense ones."""
        return None
