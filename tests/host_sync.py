"""A guard, usable on a CPU, against operations that on a GPU make the host and the device wait
for each other: reading a value back (nonzero, item, boolean-mask indexing, a solver's error
check) or copying one from the host (a tensor made from Python data). Such an operation inside
a fit's iterations stalls every step on a GPU and cannot be recorded in a CUDA graph.

On a CPU there is no device to wait for, so the guard looks at the operations themselves: every
aten operation goes through a dispatch mode, and Tensor.tolist / numpy (which on a CPU need no
aten operation) are patched to raise while it is active.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
READ_BACK = {aten.nonzero, aten._local_scalar_dense, aten.masked_select, aten._unique2, aten.unique_dim,
             aten.unique_consecutive, aten.equal, aten._linalg_check_errors, aten.nonzero_numpy}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# A tensor made from a Python number may fill a slice (t[:, i] = 0.0: on a GPU its value is read
# on the host and passed to the kernel). Any other use of one, t[i] = 0.0 included (a copy of one
# element), is a copy from the host.
FILLS = {aten.fill_.Tensor}


class HostSync(AssertionError):
    pass


class NoHostSync(TorchDispatchMode):
    """with NoHostSync(): ... raises HostSync at the first operation that would synchronise."""

    def __init__(self):
        super().__init__()
        self.fresh: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.patched: dict[str, object] = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            self.patched[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, _refuse(f"Tensor.{name}"))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in READ_BACK:
            raise HostSync(f"{func} reads a value back to the host")
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            raise HostSync(f"{func} without output_size reads its length back to the host")
        flat = tree_flatten((args, kwargs))[0]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if packet in INDEXING and any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:]):
            raise HostSync(f"{func} with a boolean mask reads the count of its selection back to the host")
        lifted = [t for t in tensors if self.fresh.get(id(t)) is t]
        if lifted and not (func in FILLS and args[1] is lifted[0] and len(lifted) == 1):
            raise HostSync(f"{func} uses a tensor made from Python data: a copy from the host")
        out = func(*args, **kwargs)
        if func is aten.lift_fresh.default:
            if out.ndim:
                raise HostSync("a tensor made from a Python sequence: a copy from the host")
            self.fresh[id(out)] = out
        return out


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise HostSync(f"{name} reads values back to the host")
    return refuse
