"""Memory budgets as written by users (edgeinfer/memory.py); the dense check itself is exercised in
test_hostile_inputs.py, the MoE expert budget in test_moe.py."""

import pytest

from edgeinfer.errors import MemoryBudgetError
from edgeinfer.memory import parse_memory_budget


def test_parse_memory_budget():
    assert parse_memory_budget("512MB") == 512 * 10**6
    assert parse_memory_budget("1.5GiB") == int(1.5 * 2**30)
    assert parse_memory_budget("2000") == 2000
    assert parse_memory_budget(None) is None and parse_memory_budget("unlimited") is None


@pytest.mark.parametrize("value", ["lots", "12 parsecs", 0, "-1MB"])
def test_malformed_or_non_positive_budget_is_refused(value):
    with pytest.raises(MemoryBudgetError):
        parse_memory_budget(value)
