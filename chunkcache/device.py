"""Moving tensors between the host and the model's device without making either wait.

On a GPU a copy from ordinary (pageable) host memory, or any read of a device value on the host,
waits until the device has finished everything queued before it: the GPU then idles while the
host catches up. A fused prefill therefore moves host data only as pinned memory with
asynchronous copies, and chunk caches arrive on a side stream that the compute stream waits for
through an event (`SideStream`). On the CPU all of this is a no-op."""

from __future__ import annotations

from typing import Any

import torch


def cuda_runtime(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA device this process can drive (streams, events, pinning)."""
    return device.type == "cuda" and torch.cuda.is_available()


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device``, copied without a wait: through pinned memory, asynchronously. The
    pinned staging block is not reused before the copy has run (PyTorch's host allocator records
    the copy), so ``host`` may change or go as soon as this returns."""
    if device.type == "cpu" or host.device.type != "cpu":
        return host.to(device)
    staged = host if host.is_pinned() else host.pin_memory()
    return staged.to(device, non_blocking=True)


def pinned(host: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``host`` in pinned memory when it is bound for a CUDA ``device`` (a copy only if needed), so
    that copying it there makes nobody wait."""
    if device is None or not cuda_runtime(torch.device(device)) or host.device.type != "cpu" or host.is_pinned():
        return host
    return host.pin_memory()


class SideStream:
    """Copies to ``device`` issued on a second stream, each batch followed by an event that the
    compute stream waits for before it reads what was copied: loading layer i + 1 overlaps the
    computation of layer i. Without a CUDA runtime copies run inline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if cuda_runtime(device) else None

    def copy(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """The ``tensors`` on the device (those already there as they are) and an event that
        marks the copies' end (None without a side stream)."""
        if self._stream is None:
            return [t.to(self.device, non_blocking=t.is_pinned()) for t in tensors], None
        with torch.cuda.stream(self._stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
            event = torch.cuda.Event()
            event.record(self._stream)
        return out, event

    def wait(self, event: Any, tensors: list[torch.Tensor]) -> None:
        """Make the current stream wait for ``event`` before it uses ``tensors``, and keep their
        memory from being reused until the current stream's work on them is done."""
        if event is None or self._stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in tensors:
            if tensor.device.type == "cuda":
                tensor.record_stream(current)
