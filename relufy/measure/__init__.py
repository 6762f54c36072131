"""Measurement: perplexity, activation sparsity, the top-k curve, statistics files, plots."""
