"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (fast on a shared 2-core machine), then restore the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Tests call train() many times in one process with different precision settings; accelerate keeps one per
    process (a user runs one per process), so each test starts from a clean accelerate state. accelerate has no
    public call for that: its own test case class (accelerate.test_utils.AccelerateTestCase) uses these private
    ones, in tests only, as here."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
