"""Balanced k-means: an MLP's neurons cut into equal-size experts (MoEfication)."""

from __future__ import annotations

import numpy as np


def balanced_clusters(vectors: np.ndarray, k: int, iters: int = 15, seed: int = 0) -> np.ndarray:
    """Equal-size clusters of VECTORS' rows (k-means, then a greedy balanced assignment): cluster ids."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), k, replace=False)]
    size = len(x) // k
    for _ in range(iters):
        sim = x @ centroids.T
        order = np.argsort(-sim, axis=None)  # most similar (neuron, cluster) pairs first
        assign = np.full(len(x), -1)
        room = np.full(k, size)
        for flat in order:
            n, c = divmod(int(flat), k)
            if assign[n] < 0 and room[c] > 0:
                assign[n] = c
                room[c] -= 1
        centroids = np.stack([x[assign == c].mean(axis=0) for c in range(k)])
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return assign
