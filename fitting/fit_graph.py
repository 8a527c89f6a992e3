"""A fit recorded as CUDA graphs: one per padded batch size, recorded once and then replayed.

A fit with fixed shapes (SmplifyConfig.mode 'static') launches thousands of small kernels in an
order that does not depend on the data and never waits for the device; recorded as a CUDA graph,
it runs as one launch. Each graph owns input buffers that a call copies its batch into (rows past
the batch are padding: stand-in samples marked bad, which the fit leaves alone) and output
buffers that the call copies out of. The graphs share one memory pool: a replay may overwrite
memory that holds another graph's outputs, so a call copies its outputs out at once.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]


def padded_size(batch: int) -> int:
    """The batch size at which a graph for `batch` samples is recorded: 1, 2, 4 or 8, then a
    multiple of a quarter of the power of two below (at most a quarter of the rows are padding),
    so that batches of nearby sizes share a graph."""
    if batch <= 8:
        return 1 << max(batch - 1, 0).bit_length()
    step = 1 << ((batch - 1).bit_length() - 3)
    return -(-batch // step) * step


@dataclass
class RecordedFit:
    graph: torch.cuda.CUDAGraph
    inputs: Tensors    # the buffers a call copies its batch into, (size, ...) each
    outputs: Tensors   # what the graph writes, (size, ...) each


def _fill(buffers: Tensors, inputs: Tensors, padding: Tensors) -> None:
    for name, buffer in buffers.items():
        batch = inputs[name].shape[0]
        buffer[:batch].copy_(inputs[name])
        buffer[batch:].copy_(padding[name].expand_as(buffer[batch:]))


class FitGraphs:
    """run(inputs) -> outputs, a fit that reads nothing back to the host, called through CUDA
    graphs: `graphs(inputs, padding)` records a graph at padded_size(batch) the first time that
    size is seen, then fills its buffers and replays it. `inputs` are (B, ...) tensors on
    `device`; `padding` holds, per input, one row for the padding rows (broadcast).

    At most `max_graphs` are kept (the least recently used goes). A graph that cannot be
    recorded raises; there is no fallback to running the fit unrecorded."""

    def __init__(self, run: Callable[[Tensors], Tensors], device: torch.device, max_graphs: int = 8):
        self.run = run
        self.device = torch.device(device)
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[int, RecordedFit] = OrderedDict()
        self.recorded = 0   # graphs recorded so far, evicted ones included
        self.pool = None

    def __call__(self, inputs: Tensors, padding: Tensors) -> Tensors:
        batch = next(iter(inputs.values())).shape[0]
        size = padded_size(batch)
        with torch.cuda.device(self.device):
            recorded = self.graphs.get(size) or self._record(size, inputs, padding)
            self.graphs.move_to_end(size)
            _fill(recorded.inputs, inputs, padding)
            recorded.graph.replay()
            return {name: value[:batch].clone() for name, value in recorded.outputs.items()}

    def _record(self, size: int, inputs: Tensors, padding: Tensors) -> RecordedFit:
        buffers = {name: torch.empty((size, *value.shape[1:]), dtype=value.dtype, device=self.device)
                   for name, value in inputs.items()}
        _fill(buffers, inputs, padding)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream, as PyTorch asks before a capture: the linear-algebra
        # libraries make their handles and workspaces there, outside the graph.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            self.run(buffers)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
                outputs = self.run(buffers)
        except RuntimeError as exc:
            raise RuntimeError(f"the fit at batch size {size} could not be recorded as a CUDA graph: {exc}") from exc
        while len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)
        self.graphs[size] = RecordedFit(graph, buffers, outputs)
        self.recorded += 1
        return self.graphs[size]
