"""Turning a chunk's KV tensors into self-describing, checksummed bytes and back."""

from chunkcache.codec.base import KVCodec
from chunkcache.codec.raw import RawCodec

CODECS = {"raw": RawCodec}


def get_codec(name: str, level: int = 3) -> KVCodec:
    from chunkcache.errors import InvalidInputError

    if name not in CODECS:
        raise InvalidInputError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")
    return CODECS[name](level)


__all__ = ["CODECS", "KVCodec", "RawCodec", "get_codec"]
