"""SIGTERM / SIGUSR1 to one rank of two: both stop together at a step boundary, save one checkpoint, exit 143.

The ranks are started the way srun starts tasks (one process per rank, RANK/WORLD_SIZE/MASTER_*
set), so each rank's own exit code is seen. Under `accelerate launch`/torchrun the workers exit
143 the same way, and the launcher reports them as failed (its own exit code is 1).
Resuming after such a stop: tests/test_train.py::test_resume_after_a_stop_matches_an_uninterrupted_run.
"""

import os
import signal

import pytest
import torch

from carbrand.checkpoint import load_training_checkpoint
from tests.helpers.fault_runs import complete_checkpoints, logged_steps, start_ranks, wait_until

LOG_EVERY = 2


@pytest.mark.slow
@pytest.mark.parametrize("signal_number, rank", [(signal.SIGTERM, 1), (signal.SIGUSR1, 0)],
                         ids=["SIGTERM-to-rank-1", "SIGUSR1-to-rank-0"])
def test_signal_to_one_rank_stops_all_ranks_with_a_checkpoint(signal_number, rank, prepared_cars5, tmp_path):
    run_dir = tmp_path / "run"
    ranks = start_ranks(prepared_cars5, run_dir, "data.loader=torchvision", "train.epochs=2",
                        f"train.log_every={LOG_EVERY}", logs=tmp_path / "logs")
    try:
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, ranks, what="step 2")
        os.kill(ranks[rank].process.pid, signal_number)
        codes = [r.wait(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert codes == [143, 143], [r.stderr[-2000:] for r in ranks]
    for r in ranks:
        assert "Traceback" not in r.stderr, r.stderr[-3000:]

    stopped_at = complete_checkpoints(run_dir)[-1]
    assert stopped_at < 16 and stopped_at % LOG_EVERY == 0, "mid-epoch, at a step where the ranks compare notes"
    assert max(logged_steps(run_dir)) == stopped_at, "nothing trained after the agreed stop"
    saved = load_training_checkpoint(run_dir / "checkpoints" / f"step_{stopped_at}")
    assert saved.training_state["progress"]["step"] == stopped_at and saved.training_state["world_size"] == 2
    assert all(torch.isfinite(t).all() for t in saved.model_state.values())
    said = ranks[0].stdout + ranks[1].stdout
    who = signal.Signals(signal_number).name if rank == 0 else "a signal to another rank"
    assert said.count("carbrand: stop requested") == 1, said  # the main process speaks for all
    assert f"stop requested ({who}); checkpoint saved at step {stopped_at}; resume with train.resume=auto" in said
