"""Sparse-MoE packages: per-layer graphs and the expert store."""
