"""Sparse MoE: packages whose experts stay on disk, loaded on demand under a memory budget.

- ``decoder``: ``MoEDecoder``, the per-layer graphs with the routed experts in between;
- ``store``: ``ExpertStore``, the expert records of ``experts.bin`` (index checked at open);
- ``cache``: ``ExpertCache``, the loaded experts within the budget, and its ``CacheStats``;
- ``prefetch``: ``Prefetcher``, the background reader of the predicted next layer's experts;
- ``budget``: what a cached expert costs and the smallest budget the cache accepts.
"""
