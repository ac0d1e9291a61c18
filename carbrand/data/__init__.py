"""Reading prepared datasets: the manifest, sharding across ranks, preprocessing, and the DALI, torchvision and in-memory loaders."""
