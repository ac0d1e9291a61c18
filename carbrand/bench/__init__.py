"""`carbrand bench data|train`: measured throughput of the loaders and of the training loop."""
