"""What the training loop (carbrand/train.py) is built from: the optimizer and its schedule, mixup/CutMix,
the divergence guard, graceful stop on a signal, the heartbeat that names a lost rank, the run-directory
lock and the throughput window. Depends on the core (config, model, checkpoint, ...) and data/ only."""
