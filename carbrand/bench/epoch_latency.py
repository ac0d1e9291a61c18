"""`carbrand bench data --epochs N`: per-batch latency over whole epochs, epoch boundaries included.

Throughput over a few batches hides what an epoch boundary costs (a DALI pipeline rebuilt, a
DataLoader's workers restarted). Here every batch of N epochs is timed from the moment the
consumer asks for it until it is on the device, exactly as the training loop waits for it, and
the report gives the percentiles, the slowest batch, the slowest first batch of an epoch, and how
many pipelines (DALI) or worker pools (torchvision DataLoader) the loader built to serve them.
"""

from __future__ import annotations

import numpy as np
import torch

from carbrand.bench.timing import now

MIN_EPOCHS = 3  # at least two boundaries between epochs after the first one
LATENCY_KEYS = ("epochs", "batches", "latency_ms_p50", "latency_ms_p99", "latency_ms_max", "epoch_first_batch_ms_max",
                "pipelines_built")


def time_epochs(loader, epochs: int, device: torch.device) -> dict:
    """Latency of each train batch of `epochs` epochs, in milliseconds, and the loader's pipeline count."""
    latencies, first_batches, images = [], [], 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = iter(loader)
        for index in range(loader.batches_per_epoch):
            start = now(device)  # waits for the GPU: the clock covers only this batch's wait
            images_batch = next(batches)[0]
            latency = (now(device) - start) * 1000  # after the device has the batch (a copy in flight included)
            latencies.append(latency)
            if index == 0:
                first_batches.append(latency)
            images += images_batch.shape[0]
        assert next(batches, None) is None, "the loader yielded more batches than batches_per_epoch"
    return latency_summary(np.array(latencies), first_batches, epochs, images, pipelines_built(loader))


def latency_summary(latencies_ms: np.ndarray, boundaries_ms: list[float], epochs: int, images: int,
                    pipelines: int | None) -> dict:
    return {
        "epochs": epochs,
        "batches": int(latencies_ms.size),
        "images": images,
        "latency_ms_p50": round(float(np.percentile(latencies_ms, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(latencies_ms, 99)), 2),
        "latency_ms_max": round(float(latencies_ms.max()), 2),
        # the first batch of each epoch (the first of the run included): where a rebuilt pipeline shows
        "epoch_first_batch_ms_max": round(max(boundaries_ms), 2),
        "seconds": round(float(latencies_ms.sum()) / 1000, 3),
        "images_per_second": round(images / (float(latencies_ms.sum()) / 1000), 1),
        "pipelines_built": pipelines,
    }


def pipelines_built(loader) -> int | None:
    """DALI pipelines or DataLoader worker pools the loader built; None for a loader that builds neither."""
    return getattr(loader, "pipelines_built", None)
