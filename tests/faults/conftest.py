"""Fixtures of the fault suite (the cars5 photos and prepared manifest come from tests/conftest.py)."""

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """`carbrand train` run in-process makes an Accelerator; the next test must start from a clean slate."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(True)
