"""``relufy export``: sparsity statistics, neuron reordering, predictors and engine layouts."""
