"""Preparing a dataset (`carbrand prepare`, entry point in `command`): find a source's images
(an image-folder tree or the Stanford Cars devkit), decode each once and reject what training
cannot use, group exact and near duplicates, assign train/val/test without leakage, and write
the manifest directory. `formats` holds the names and types every step shares. This package
may import carbrand.data.manifest (the format it writes); carbrand.data never imports it."""
