"""`ChunkKV`: the one type every part passes around (a chunk's KV tensors plus metadata);
`EncodedLayer`, one layer of it still in its codec's bytes for a GPU to decode; `StoredEntry`,
a chunk cache as a store tier found it (`HeldEntry` when it is held decoded); and
`VariantMeta`, what Cache-Craft records of a stored variant of a chunk's cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from chunkcache.errors import InvalidInputError

if TYPE_CHECKING:
    from chunkcache.codec.base import KVCodec


@dataclass(frozen=True)
class ChunkKV:
    """KV cache of one chunk, computed behind a fixed head.

    ``kv`` has shape ``[layers, 2, kv_heads, tokens, head_dim]`` in the model's dtype; index 0 of
    the second axis holds keys (already rotated by RoPE), index 1 values. The keys were rotated
    for positions ``position_offset .. position_offset + tokens - 1``.
    """

    kv: torch.Tensor
    token_ids: tuple[int, ...]
    position_offset: int
    model_fingerprint: str
    prefix_fingerprint: str

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(
                f"ChunkKV.kv must have shape [layers, 2, kv_heads, tokens, head_dim], "
                f"got {tuple(self.kv.shape)}"
            )
        if self.kv.shape[3] != len(self.token_ids):
            raise ValueError(
                f"ChunkKV holds {self.kv.shape[3]} tokens of KV but {len(self.token_ids)} token ids"
            )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def metadata(self) -> tuple[tuple[int, ...], int, str, str]:
        """(token ids, position offset, model fingerprint, prefix fingerprint)."""
        return self.token_ids, self.position_offset, self.model_fingerprint, self.prefix_fingerprint

    def holding(self, kv: torch.Tensor) -> ChunkKV:
        """The same chunk with its tensor ``kv`` (moved or decoded elsewhere)."""
        return self if kv is self.kv else ChunkKV(kv, *self.metadata())


class EncodedLayer(Protocol):
    """One layer ``[2, kv_heads, tokens, head_dim]`` of a stored chunk still in its codec's form,
    in pinned host memory (``device`` is the CPU): `into` uploads it and decodes it into ``dst``
    on ``dst``'s device, queued on the current stream, without a host wait. The store hands these
    to a fusion on a GPU instead of decoded layers (`chunkcache.codec.base.DeviceLayer`)."""

    shape: tuple[int, int, int, int]
    device: torch.device

    def into(self, dst: torch.Tensor) -> None: ...


class StoredEntry(Protocol):
    """One chunk cache as a store tier found it, whatever the tier: read whole (`kv`, on the
    host or where the tier holds it), one layer at a time while later layers still decode
    (`layer`), or as codec bytes for a byte tier (`data`)."""

    @property
    def num_layers(self) -> int: ...

    def metadata(self) -> tuple[tuple[int, ...], int, str, str]: ...

    def layer(self, index: int, device: torch.device | str | None) -> torch.Tensor | EncodedLayer:
        """Layer ``index`` for a model on ``device``: decoded, or still encoded where a GPU
        decodes it itself; host tensors bound for a GPU are pinned."""

    def kv(self) -> ChunkKV: ...

    def data(self, codec: KVCodec) -> bytes:
        """The entry's bytes (encoded by ``codec`` if it holds none)."""


class HeldEntry:
    """A decoded chunk cache as a `StoredEntry` (a memory tier's, or one being written); encoded
    at most once, and only if a byte tier asks, unless its bytes are already known."""

    def __init__(self, kv: ChunkKV, data: bytes | StoredEntry | None = None) -> None:
        self._kv = kv
        self._data = data

    @property
    def num_layers(self) -> int:
        return self._kv.num_layers

    def metadata(self) -> tuple[tuple[int, ...], int, str, str]:
        return self._kv.metadata()

    def layer(self, index: int, device: torch.device | str | None) -> torch.Tensor:
        return self._kv.kv[index]  # where the tier holds it (pinned already for a GPU)

    def kv(self) -> ChunkKV:
        return self._kv

    def data(self, codec: KVCodec) -> bytes:
        if self._data is None:
            self._data = codec.encode(self._kv)
        elif not isinstance(self._data, bytes):
            self._data = self._data.data(codec)
        return self._data


@dataclass(frozen=True)
class VariantMeta:
    key: str
    chunk_key: str
    preceding: tuple[str, ...]
    weights: tuple[float, ...]  # attention to each preceding chunk
    cci: float
    token_inter: tuple[float, ...]  # per token of the chunk
    hits: int = 0

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.preceding):
            raise InvalidInputError("a variant needs one attention weight per preceding chunk")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariantMeta:
        return cls(key=str(data["key"]), chunk_key=str(data["chunk_key"]), preceding=tuple(data["preceding"]),
                   weights=tuple(float(w) for w in data["weights"]), cci=float(data["cci"]),
                   token_inter=tuple(float(t) for t in data["token_inter"]), hits=int(data["hits"]))
