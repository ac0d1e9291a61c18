"""Shared fixtures: the real test photos (in ../shared beside the repository, or where CARBRAND_TEST_DATA
points: tests/helpers/paths.py), and a clean Accelerate state after in-process runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.paths import SHARED_DATA


def shared_folder(name: str, what: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.fail(f"{what} missing: {path} (clone the repository next to shared/, or set CARBRAND_TEST_DATA)")
    return path


@pytest.fixture
def fresh_accelerate_state():
    """A command run in-process makes an Accelerator (a singleton): the next test must start from a clean slate."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def cars5_dir() -> Path:
    """400 real photos: train/<brand>/ (60 each) and test/<brand>/ (20 each), 5 brands."""
    return shared_folder("cars5", "test photos")


@pytest.fixture(scope="session")
def devkit_dir() -> Path:
    """The real Stanford Cars annotation files (cars_meta.mat, cars_train_annos.mat, cars_test_annos.mat)."""
    return shared_folder("stanford_cars_devkit", "Stanford Cars devkit")


@pytest.fixture(scope="session")
def prepared_cars5(cars5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cars5 prepared with the defaults (seed 0): the output folder holding manifest.json."""
    from carbrand.prepare.command import prepare_dataset

    out = tmp_path_factory.mktemp("prepared_cars5")
    prepare_dataset(cars5_dir, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def fitted_cars5_export(prepared_cars5: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export whose predictions on cars5 are above chance but far from perfect (tests/helpers/exports.py):
    made once per session, for every test that needs a model worth evaluating but not a training run."""
    from tests.helpers.exports import fit_export

    return fit_export(tmp_path_factory.mktemp("fitted_run") / "best", prepared_cars5)


def gpu_tests_were_asked_for(config: pytest.Config) -> bool:
    """`-m gpu` (or any marker expression that holds only for gpu tests): a GPU host's check, not a default run."""
    from _pytest.mark.expression import Expression

    markexpr = config.option.markexpr
    if not markexpr:
        return False
    expression = Expression.compile(markexpr)
    return expression.evaluate(lambda name: name == "gpu") and not expression.evaluate(lambda name: False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """Under `-m gpu`, a gpu test skipped for want of CUDA fails: a broken CUDA set-up must not read as "all skipped"."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("gpu") and gpu_tests_were_asked_for(item.config):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: a gpu test was skipped under -m gpu ({report.longrepr[-1]}): no usable CUDA here"


@pytest.fixture(scope="session")
def cars5_server(fitted_cars5_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """`carbrand serve` of the fitted cars5 export (a real subprocess on 127.0.0.1), with RUN/eval_test/metrics.json
    beside it, a 3 MB upload limit, 4 images per request and a 100 ms batching wait: shared by the API, page and load tests."""
    from tests.helpers.serving import run_folder_with_metrics, serving

    workdir = tmp_path_factory.mktemp("cars5_server")
    best = run_folder_with_metrics(fitted_cars5_export, workdir, {"split": "test", "samples": 100, "accuracy": 0.61})
    with serving(best, workdir, "--max-upload-mb", "3", "--max-images", "4", "--max-wait-ms", "100") as server:
        yield server
