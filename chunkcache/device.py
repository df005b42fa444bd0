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
    """``host`` on ``device``, copied without a wait: through pinned memory, asynchronously. A
    pageable ``host`` is staged in pinned memory first, which PyTorch's host allocator does not
    reuse before the copy has run; an already pinned ``host`` is copied from directly, so it must
    not change until the device has read it."""
    if device.type == "cpu" or host.device.type != "cpu":
        return host.to(device)
    return _staged(host).to(device, non_blocking=True)


def upload_into(dst: torch.Tensor, host: torch.Tensor) -> None:
    """`upload` into an existing device tensor (a buffer a CUDA graph reads): one asynchronous
    copy through pinned memory."""
    if dst.device.type == "cpu" or host.device.type != "cpu":
        dst.copy_(host)
    else:
        dst.copy_(_staged(host), non_blocking=True)


def _staged(host: torch.Tensor) -> torch.Tensor:
    return host if host.is_pinned() else host.pin_memory()


def pinned(host: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """``host`` in pinned memory when it is bound for a CUDA ``device`` (a copy only if needed), so
    that copying it there makes nobody wait."""
    if device is None or not cuda_runtime(torch.device(device)) or host.device.type != "cpu" or host.is_pinned():
        return host
    return host.pin_memory()


def _place(dst: torch.Tensor, src: Any, non_blocking: bool) -> None:
    if isinstance(src, torch.Tensor):
        dst.copy_(src, non_blocking=non_blocking)
    else:
        src.into(dst)


class SideStream:
    """Copies from host memory into device tensors issued on a second stream, each batch ending in
    an event that the compute stream waits for before it reads the destinations: loading layer
    i + 1 overlaps the computation of layer i. Without a CUDA runtime copies run inline and
    events are None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._stream = torch.cuda.Stream(device) if cuda_runtime(device) else None

    def follow(self) -> None:
        """Order the side stream after everything queued on the compute stream so far: memory the
        compute stream allocated (and may still be using from an earlier life) is safe to write."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    def mark(self) -> Any:
        """An event at the current point of the compute stream (None without a side stream)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy_into(self, pairs: list[tuple[torch.Tensor, Any]], after: Any = None) -> Any:
        """Copy each host source into its device destination once ``after`` (a `mark`) has passed;
        returns the event marking the copies' end. A source that is no tensor is an
        `chunkcache.kv.EncodedLayer`: it uploads and decodes itself on the side stream."""
        if self._stream is None:
            for dst, src in pairs:
                _place(dst, src, src.is_pinned() if isinstance(src, torch.Tensor) else True)
            return None
        with torch.cuda.stream(self._stream):
            if after is not None:
                self._stream.wait_event(after)
            for dst, src in pairs:
                _place(dst, src, True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event`` (a device-side wait: the host goes on)."""
        if event is not None and self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
