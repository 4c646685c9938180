"""Benchmarks time the ops themselves: the wrappers' optional NaN/Inf input
check (a full read of the inputs plus a host sync, the same for every
backend) is turned off, as the evaluation driver does in its hot loop."""

import pytest

from escape_fast import ops


@pytest.fixture(autouse=True)
def _no_finite_checks():
    with ops.finite_checks(False):
        yield
