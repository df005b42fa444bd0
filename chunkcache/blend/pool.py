"""`KVPool`: the memory fused caches live in while their requests are decoded. Buffers come in
size classes (token counts rounded up to ``granule``), are zeroed and handed out, and come back
when a request ends, to serve the next request of their class; all buffers together, in use or
free, stay within a byte budget. Memory therefore grows to the working set once and stays there
(no allocation per request), and buffers of a class keep their shapes and addresses from one
request to the next."""

from __future__ import annotations

import torch

from chunkcache.model.executor import LayerExecutor


class KVPool:
    """Fused-cache buffers by size class within ``budget`` bytes (model's device and dtype)."""

    def __init__(self, executor: LayerExecutor, budget: int, granule: int = 256) -> None:
        if budget < 1:
            raise ValueError(f"the KV budget must be at least 1 byte, got {budget}")
        if granule < 1:
            raise ValueError(f"granule must be at least 1 token, got {granule}")
        self.executor, self.total, self.granule = executor, budget, granule
        self.token_bytes = executor.kv_bytes(1)
        self.used = 0  # bytes of buffers handed out
        self._free: dict[int, list[torch.Tensor]] = {}  # tokens -> buffers back in the pool
        self._held = 0  # bytes of free buffers kept

    def tokens_for(self, tokens: int) -> int:
        """The size class of a cache of ``tokens`` tokens."""
        return max(1, -(-tokens // self.granule)) * self.granule

    def bytes_for(self, tokens: int) -> int:
        """What a cache of ``tokens`` tokens takes from the budget."""
        return self.tokens_for(tokens) * self.token_bytes

    def fits(self, tokens: int) -> bool:
        return self.used + self.bytes_for(tokens) <= self.total

    def acquire(self, tokens: int) -> torch.Tensor:
        """A zeroed buffer [layers, 2, kv_heads, size class, head_dim]; raises `MemoryError` when
        the budget has no room (check `fits` first)."""
        size, need = self.tokens_for(tokens), self.bytes_for(tokens)
        if self.used + need > self.total:
            raise MemoryError(f"the KV pool has {self.total - self.used} of {self.total} bytes free, {need} wanted")
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self._held -= need
            buf.zero_()
        else:
            self._trim(self.total - self.used - need)
            buf = self.executor.empty_kv(size)
        self.used += need
        return buf

    def release(self, buf: torch.Tensor) -> None:
        """Give a buffer from `acquire` back (what a failed fusion left to place went with its
        `FusedBuffer`)."""
        size = int(buf.shape[3])
        need = size * self.token_bytes
        self.used -= need
        self._free.setdefault(size, []).append(buf)
        self._held += need

    def _trim(self, keep: int) -> None:
        """Drop free buffers (largest classes first) until at most ``keep`` bytes of them remain."""
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while free and self._held > keep:
                free.pop()
                self._held -= size * self.token_bytes
            if not free:
                del self._free[size]
