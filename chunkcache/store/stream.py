"""`LayerStream`: a chunk cache arriving layer by layer from a background load, so fusion can
compute layer i while layer i + 1 is still being read or decoded."""

from __future__ import annotations

import threading
import time

import torch

from chunkcache.errors import CorruptCacheError
from chunkcache.kv import ChunkKV, EncodedLayer


class LayerStream:
    """Filled by one background job; read by the fusing thread. ``found()`` waits for the header
    (False on a miss); ``layer(i)`` waits for layer i; ``result()`` for the whole chunk."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._cond = threading.Condition()
        self._known = False
        self._hit = False
        self._layers: list[torch.Tensor | EncodedLayer] = []
        self._num_layers = 0
        self._done = False
        self._error: BaseException | None = None
        self.token_ids: tuple[int, ...] = ()
        self.position_offset = 0
        self.model_fingerprint = ""
        self.prefix_fingerprint = ""
        self._created = time.perf_counter()
        self.load_s = 0.0  # seconds from the request for this chunk until its last layer arrived
        self.wait_s = 0.0  # seconds the fusing thread waited for layers of this chunk
        self.read_s = 0.0  # of load_s: reading the entry's bytes from a lower tier
        self.decode_s = 0.0  # of load_s: decoding those bytes into layers

    # --- producer ------------------------------------------------------------------------
    def start(self, num_layers: int, token_ids: tuple[int, ...], position_offset: int,
              model_fingerprint: str, prefix_fingerprint: str) -> None:
        with self._cond:
            self._num_layers = num_layers
            self.token_ids, self.position_offset = token_ids, position_offset
            self.model_fingerprint, self.prefix_fingerprint = model_fingerprint, prefix_fingerprint
            self._known = self._hit = True
            self._cond.notify_all()

    def start_from(self, kv: ChunkKV) -> None:
        self.start(kv.num_layers, *kv.metadata())
        for layer in kv.kv.unbind(0):
            self.push(layer)

    def push(self, layer: torch.Tensor | EncodedLayer) -> None:
        with self._cond:
            self._layers.append(layer)
            self._done = len(self._layers) == self._num_layers
            if self._done:
                self.load_s = time.perf_counter() - self._created
            self._cond.notify_all()

    def miss(self) -> None:
        with self._cond:
            self._known, self._done = True, True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._known = True
            self._cond.notify_all()

    # --- consumer ------------------------------------------------------------------------
    def _wait(self, ready) -> None:  # type: ignore[no-untyped-def]
        """Wait until ``ready()``; raise only if the load failed before it became true."""
        with self._cond:
            self._cond.wait_for(lambda: ready() or self._error is not None)
            if not ready() and self._error is not None:
                raise CorruptCacheError(f"chunk cache {self.key[:16]} failed while loading: {self._error}")

    def found(self) -> bool:
        """True once the entry's header is known; False on a miss (or a load that failed first)."""
        with self._cond:
            self._cond.wait_for(lambda: self._known)
            return self._hit and (self._error is None or bool(self._layers))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def layer(self, i: int) -> torch.Tensor | EncodedLayer:
        """Layer ``i`` as ``[2, kv_heads, tokens, head_dim]``, once it has arrived (for a GPU,
        possibly still encoded: the fusion decodes it on the device)."""
        start = time.perf_counter()
        self._wait(lambda: len(self._layers) > i)
        self.wait_s += time.perf_counter() - start
        return self._layers[i]

    def result(self) -> ChunkKV:
        """The whole chunk, once every layer has arrived decoded."""
        self._wait(lambda: self._done)
        if not all(isinstance(layer, torch.Tensor) for layer in self._layers):
            raise TypeError("the chunk's layers arrived encoded, for the device to decode")
        return ChunkKV(torch.stack(self._layers), self.token_ids, self.position_offset,
                       self.model_fingerprint, self.prefix_fingerprint)
