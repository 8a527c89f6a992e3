"""Constant indices and values without host-to-device copies.

A tensor made from Python numbers (`torch.tensor([...])`, or indexing with a list) is made on the
host and copied to a GPU: the copy waits for the device, and it cannot be recorded in a CUDA
graph. These helpers build the same results from views and fills, which need nothing from the
host, so that a fit's iterations can run without host synchronisation and be captured.
"""
from __future__ import annotations

from typing import Sequence

import torch


def take(t: torch.Tensor, index: Sequence[int], dim: int) -> torch.Tensor:
    """t.index_select(dim, index) for a constant `index` of Python ints: views stacked by one copy."""
    return torch.stack([t.select(dim, i) for i in index], dim=dim)


def constant(values: Sequence[float], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len(values),) tensor of `values` on like's device (with like's dtype by default), written by fills."""
    out = like.new_empty(len(values), dtype=dtype)
    for i, value in enumerate(values):
        out[i].fill_(value)   # not out[i] = value: that copies a one-element tensor from the host
    return out
