"""The parts of the sparse-MoE benchmark (apps/bench/moe.py, the entry script: arguments and the order
of the runs):

- ``models``: the benchmark's models (random Qwen3-MoE, MoEfied SmolLM2; int4 and int8-channel
  experts) and where their packages and results live;
- ``weights``: their weights (generated on access, or SmolLM2's MLPs cut into experts) and export;
- ``kmeans``: the balanced k-means that cuts an MLP into equal experts;
- ``disk``: dropping the page cache, O_DIRECT read bandwidth;
- ``decode``: one configuration (experts mode, budget, threads) decoded in this process;
- ``micro``: the expert-FFN options (sessions, shared graphs, QMoE, numpy), timed;
- ``markdown``: the tables and findings of docs/moe.md.
"""
