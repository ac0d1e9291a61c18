"""Datasets: preparing sources into manifests, the demo generator, and the loaders that read them."""
