"""A CUDA device emulated on the CPU, for tests that must fail when a GPU would wait for the host.

Tensors that would live on the GPU are tagged (``on_device``): model weights, the caches of the
GPU tier, whatever is created with ``device="cuda"`` and everything computed from a tagged
tensor. Their ``.device`` reads as ``cuda``; they really are CPU tensors, so the code runs. Host
tensors can be marked pinned (``pin_memory()`` works here without CUDA). While `FakeCuda.watch`
is active, every event that on a real GPU makes the host wait, or would fail, is recorded with
the chunkcache line it came from:

- ``copy``: a host tensor moved to the device from pageable memory, or without ``non_blocking``
  (copies to a GPU from pinned memory with ``non_blocking=True`` are asynchronous: counted, allowed);
  a host index used on a device tensor; ``torch.tensor(..., device="cuda")``;
- ``read``: ``.item()``, ``int()``, ``float()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.numpy()``
  of a device tensor;
- ``nonzero``: an output size that depends on device values (``nonzero``, ``unique``, boolean-mask
  indexing);
- ``mixed``: a device operation given a host tensor (an error on a real GPU).

Device operations (about one kernel launch each) are counted per selective-prefill layer, and
the shapes of every device operation are kept, so tests can compare two requests; so is every
device call with its numbers (`Record.calls`), what a CUDA graph would bake in."""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
_DEVICE = torch._C.TensorBase.__dict__["device"]
_IS_CUDA = torch._C.TensorBase.__dict__["is_cuda"]
_FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn,
              torch.randint, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like}
_COPYING_FACTORIES = {torch.tensor, torch.as_tensor}
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}
_VIEWS = {"view", "_unsafe_view", "slice", "select", "transpose", "t", "permute", "expand", "unsqueeze", "squeeze",
          "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk", "narrow", "diagonal",
          "lift_fresh", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
          "is_same_size", "dim", "size", "stride", "expand_as", "view_as", "reshape", "flatten", "movedim",
          "result_type", "_has_compatible_shallow_copy_type", "resolve_conj", "resolve_neg"}
_SIZE_FROM_VALUES = {"nonzero", "unique", "_unique2", "unique_consecutive", "masked_select", "nonzero_static"}


def on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.__dict__.get("_fake_cuda", False)


def tag(t: Any) -> Any:
    """Mark a tensor (or the tensors of a list/tuple) as living on the emulated GPU."""
    if isinstance(t, torch.Tensor):
        t.__dict__["_fake_cuda"] = True
    elif isinstance(t, (list, tuple)):
        for x in t:
            tag(x)
    return t


def _pinned(t: torch.Tensor) -> bool:
    return t.__dict__.get("_fake_pinned", False)


def _site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/chunkcache/" in name and "/tests/" not in name:
            return f"{name.split('/chunkcache/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


@dataclass
class Record:
    waits: list[tuple[str, str]] = field(default_factory=list)  # (kind, chunkcache call site)
    async_copies: int = 0
    ops: int = 0
    ops_by_layer: collections.Counter = field(default_factory=collections.Counter)
    shapes: list[tuple[str, tuple[tuple[int, ...], ...]]] = field(default_factory=list)
    # every device call, views included, with its device tensors' shapes and its numbers: what a
    # CUDA graph would bake in (two steps a graph may replay for must give the same list)
    calls: list[tuple[str, tuple[tuple[int, ...], ...], tuple[Any, ...]]] = field(default_factory=list)

    def summary(self) -> str:
        count = collections.Counter(self.waits)
        return "; ".join(f"{n}x {kind} at {site}" for (kind, site), n in count.most_common())


class FakeCuda:
    """See the module docstring. ``layer`` is set by the caller's hooks to attribute device
    operations to the selective prefill's layers (-1: outside the layer loop)."""

    def __init__(self) -> None:
        self.record: Record | None = None
        self.layer = -1

    # --- what the emulated GPU holds ------------------------------------------------------
    @staticmethod
    def put(t: torch.Tensor) -> torch.Tensor:
        return tag(t)

    @staticmethod
    def pinned_host(t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        out.__dict__["_fake_pinned"] = True
        return out

    def executor_on_device(self, executor: Any) -> Any:
        """Move (by tagging) a CPU `LayerExecutor`'s model to the emulated GPU."""
        for module in (executor.embed_tokens, executor.norm, executor.lm_head, *executor.layers):
            for t in (*module.parameters(), *module.buffers()):
                tag(t)
        tag(executor._inv_freq64)
        tag(executor.inv_freq)
        executor.device = CUDA
        return executor

    # --- recording ---------------------------------------------------------------------------
    def wait(self, kind: str) -> None:
        if self.record is not None:
            self.record.waits.append((kind, _site()))

    def op(self, name: str, tensors: list[torch.Tensor]) -> None:
        if self.record is None:
            return
        self.record.ops += 1
        self.record.ops_by_layer[self.layer] += 1
        self.record.shapes.append((name, tuple(tuple(t.shape) for t in tensors if on_device(t))))

    @contextmanager
    def active(self) -> Iterator["FakeCuda"]:
        """The emulation itself (devices, tags, copies); nothing is recorded."""
        with _Functions(self), _Dispatch(self):
            yield self

    @contextmanager
    def watch(self) -> Iterator[Record]:
        """Record waits and device operations inside this block (within `active`)."""
        self.record, self.layer = Record(), -1
        try:
            yield self.record
        finally:
            self.record = None


def _target(args: tuple, kwargs: dict) -> torch.device | None:
    device = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            device = a
        elif isinstance(a, torch.Tensor):
            device = CUDA if on_device(a) else CPU
    return torch.device(device) if device is not None else None


class _Functions(TorchFunctionMode):
    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE:
            return CUDA if on_device(args[0]) else func(*args)
        if owner is _IS_CUDA:
            return on_device(args[0])
        if func is torch.Tensor.is_pinned:
            return _pinned(args[0])
        if func is torch.Tensor.pin_memory:
            return FakeCuda.pinned_host(args[0])
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return self._move(func, args, kwargs)
        if func is torch.Tensor.record_stream:
            return None
        if func in _READS:
            if on_device(args[0]):
                self.fake.wait("read")
            return func(*args, **kwargs)
        if func in _FACTORIES or func in _COPYING_FACTORIES:
            device = kwargs.get("device")
            like = args[0] if func in (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like) else None
            if device is not None and torch.device(device).type == "cuda":
                if func in _COPYING_FACTORIES:
                    self.fake.wait("copy")
                return tag(func(*args, **{**kwargs, "device": CPU}))
            out = func(*args, **kwargs)
            return tag(out) if like is not None and on_device(like) and device is None else out
        return func(*args, **kwargs)

    def _move(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        src = args[0]
        if func is torch.Tensor.cuda:
            device = CUDA
        elif func is torch.Tensor.cpu:
            device = CPU
        else:
            device = _target(args, kwargs)
        dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
        out = src.to(dtype) if dtype is not None else src
        if device is not None and device.type == "cuda" and not on_device(src):
            if not (_pinned(src) and kwargs.get("non_blocking", False)):
                self.fake.wait("copy")
            elif self.fake.record is not None:
                self.fake.record.async_copies += 1
            return tag(out.clone() if out is src else out)
        if device is not None and device.type == "cpu" and on_device(src):
            self.fake.wait("read")
            copy = out.clone()
            copy.__dict__.pop("_fake_cuda", None)
            return copy
        return out


class _Dispatch(TorchDispatchMode):
    def __init__(self, fake: FakeCuda) -> None:
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        device = any(on_device(t) for t in tensors)
        name = func.overloadpacket.__name__
        if device:
            if self.fake.record is not None:
                numbers = tuple(a for a in flat if isinstance(a, (int, float)))
                self.fake.record.calls.append((name, tuple(tuple(t.shape) for t in tensors if on_device(t)), numbers))
            self._check(name, args, kwargs, tensors)
            upload = name == "copy_" and not on_device(args[1])  # a copy engine's transfer, counted apart
            if name not in _VIEWS and not upload:
                self.fake.op(name, tensors)
        out = func(*args, **kwargs)
        if device:
            tag(tree_flatten(out)[0])
        elif name in _VIEWS and any(_pinned(t) for t in tensors):  # views of pinned memory are pinned
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    t.__dict__["_fake_pinned"] = True
        return out

    def _check(self, name: str, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> None:
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            for ix in (args[1] if len(args) > 1 else []) or []:
                if isinstance(ix, torch.Tensor) and not on_device(ix):
                    self.fake.wait("copy")  # a host index moved to the device first
                elif isinstance(ix, torch.Tensor) and ix.dtype in (torch.bool, torch.uint8):
                    self.fake.wait("nonzero")
            return
        if name in _SIZE_FROM_VALUES:
            self.fake.wait("nonzero")
        elif name == "copy_" and on_device(args[0]) and not on_device(args[1]):
            asynchronous = _pinned(args[1]) and (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            if not asynchronous:
                self.fake.wait("copy")
            elif self.fake.record is not None:
                self.fake.record.async_copies += 1
        elif name not in _VIEWS and any(not on_device(t) and t.dim() > 0 for t in tensors):
            self.fake.wait("mixed")


class FakeGraph:
    """`torch.cuda.CUDAGraph` emulated: capturing runs the work once under a recording mode (every
    aten call with its very tensor objects, which stand for a real graph's fixed addresses) and
    then puts back what the work changed in ``restore`` (a real capture executes nothing);
    `replay` runs the recorded calls again on those same objects, writing each result into the
    tensor the capture produced. Work that reads anything but those objects (a tensor made anew
    per request outside the capture) replays with stale values, as a real graph would."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple, dict, Any, bool]] = []

    def replay(self) -> None:
        with torch.inference_mode():
            for func, args, kwargs, out, aliases in self.calls:
                if aliases:
                    continue  # the recorded view shares its base's memory already
                fresh = func(*args, **kwargs)
                for old, new in zip(tree_flatten(out)[0], tree_flatten(fresh)[0]):
                    if isinstance(old, torch.Tensor) and old is not new:
                        old.copy_(new)


class _Recording(TorchDispatchMode):
    def __init__(self, graph: FakeGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a view op may copy (reshape of a non-contiguous tensor): only a real alias is skipped on replay
        base = next((a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)), None)
        aliases = (func.is_view and isinstance(out, torch.Tensor) and base is not None
                   and out.untyped_storage().data_ptr() == base.untyped_storage().data_ptr())
        self.graph.calls.append((func, args, kwargs, out, aliases))
        return out


@contextmanager
def fake_capture(graph: FakeGraph, restore: list[torch.Tensor]) -> Iterator[None]:
    """The body of a ``torch.cuda.graph(graph)`` block, emulated: recorded into ``graph``; the
    tensors in ``restore`` (what the body may change in place) get their old values back."""
    saved = [t.clone() for t in restore]
    with _Recording(graph):
        yield
    for t, old in zip(restore, saved):
        t.copy_(old)
