"""W&B online with its server unreachable from the start, or going away mid-run: training goes on, logs locally,
warns once, and the API key leaks nowhere.

(The offline run's history and the key's absence there: tests/test_train.py::test_wandb_offline_run_holds_the_logged_values.)
"""

import pytest

from tests.helpers.fake_wandb_server import FakeWandbServer
from tests.helpers.fault_runs import fault_environment, logged_steps, start_training, wait_until
from tests.helpers.ports import free_port
from tests.helpers.training_runs import read_metrics

API_KEY = "carbrand" + "0123456789abcdef" * 2  # 40 characters, the shape of a real key


@pytest.mark.slow
def test_unreachable_server_warns_once_and_training_finishes(prepared_cars5, tmp_path):
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    # W&B's server: a port nobody listens on, so connections are refused at once, as with a server that is down
    env = fault_environment() | {
        "WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_API_KEY": API_KEY,
        "CARBRAND_WANDB_INIT_TIMEOUT": "5", "HOME": str(home),  # W&B's settings and any credential file land here
    }
    env.pop("WANDB_SILENT")  # everything W&B would say to a user
    run = start_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.max_steps=4", "train.log_every=1",
                         "train.checkpoint_every_steps=2", "wandb.mode=online", logs=tmp_path / "logs", env=env)
    assert run.wait(timeout=300) == 0, run.stderr[-3000:]

    warnings = [line for line in run.stderr.replace("\r", "\n").splitlines() if "warn" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("carbrand: warning: W&B could not start in online mode"), warnings
    assert str(run_dir / "metrics.jsonl") in warnings[0]
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3, 4]
    assert (run_dir / "best" / "model.safetensors").is_file()

    saved = [p for p in [*run_dir.rglob("*"), *home.rglob("*")] if p.is_file()]
    assert run_dir / "config.yaml" in saved and run_dir / "checkpoints" / "step_4" / "config.yaml" in saved
    for path in saved:
        assert API_KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"
    assert API_KEY not in run.stdout + run.stderr


@pytest.mark.slow
def test_server_dying_mid_run_costs_one_warning_and_nothing_else(prepared_cars5, tmp_path):
    """A local fake W&B server accepts the run, then goes away (listening socket and connections closed)."""
    run_dir, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    server = FakeWandbServer.start()
    env = fault_environment() | {
        "WANDB_MODE": "online", "WANDB_BASE_URL": server.url, "WANDB_API_KEY": API_KEY, "HOME": str(home),
        "CARBRAND_WANDB_FINISH_TIMEOUT": "3",  # how long finish() waits for a server that is gone (120 s by default)
    }
    run = start_training(prepared_cars5, run_dir, "data.loader=torchvision", "train.max_steps=6", "train.log_every=1",
                         "wandb.mode=online", logs=tmp_path / "logs", env=env)
    try:
        wait_until(lambda: "UpsertBucket" in server.received.operations and logged_steps(run_dir), run,
                   what="the run created on the server and a first step logged")
        server.close()
        steps_before_close = logged_steps(run_dir)
        assert run.wait(timeout=300) == 0, run.stderr[-3000:]
    finally:
        run.kill()
        server.close()

    assert max(steps_before_close) < 6, "the run ended before the server went away: the test proves nothing"
    warnings = [line for line in run.stderr.replace("\r", "\n").splitlines() if "warn" in line.lower()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("carbrand: warning: W&B did not take this run's data within 3 s at the end"), warnings
    assert warnings[0].endswith(f"{run_dir / 'metrics.jsonl'} is complete") and "wandb sync" in warnings[0], warnings
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 7))
    assert (run_dir / "best" / "model.safetensors").is_file()
