"""Assertions shared by the test modules."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def assert_same_state_dict(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                           ordered: bool = True) -> None:
    """The same keys (in the same order, unless a file reader chose its own) and each tensor bit-identical, of the
    same dtype, on the same device, naming the first key that differs."""
    if ordered:
        assert list(actual) == list(expected), "the keys or their order differ"
    else:
        assert set(actual) == set(expected), f"keys differ: {sorted(set(actual) ^ set(expected))[:5]}"
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=0, atol=0, equal_nan=False, check_dtype=True,
                                   check_device=True, msg=lambda message, key=key: f"{key}: {message}")
