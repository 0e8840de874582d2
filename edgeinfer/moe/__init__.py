"""Sparse MoE: packages whose experts stay on disk, loaded under a memory budget.

- ``decoder``: ``MoEDecoder``, the per-layer graphs with the routed experts in between, and the
  guesses of the next layer's experts (routing ahead);
- ``store``: ``ExpertStore``, the expert records of ``experts.bin`` (index, format, checksums checked);
- ``formats``: what a record holds and what a cached expert holds (int4/int8-channel, sessions);
- ``experts``: making records runnable on the package's execution target (slots, shared graph; a
  helper thread for large records);
- ``cache``: ``ExpertCache``, the loaded experts within the budget, its eviction rules;
- ``stats``: ``CacheStats``, its counters;
- ``reads`` / ``aio``: reads started ahead and finished when needed, without threads (native AIO);
- ``reader``: ``ReaderPool``, the reader-thread option (demand reads first);
- ``prefetch``: ``ReadAhead``, which guesses to read ahead, on the tokens where that measures faster;
- ``residency``: the budget split across layers by miss cost, and optional resident experts;
- ``budget``: what a cached expert costs and the smallest budget the cache accepts.
"""
