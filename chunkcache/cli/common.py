"""What every command that runs a model shares: the common flags and the engine they describe."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

CommonArgs = Callable[[argparse.ArgumentParser], None]


def engine_from_args(args: argparse.Namespace) -> Any:
    """The engine the command's settings describe (`Settings.from_args`)."""
    from chunkcache.config import Settings
    from chunkcache.engine import ChunkCacheEngine

    return ChunkCacheEngine(Settings.from_args(args))


def add_common(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --config, --store, --max-new-tokens."""
    from chunkcache.engine import PACKAGED_MODELS

    p.add_argument("--model", help=f"packaged model ({', '.join(PACKAGED_MODELS)}) or a local Hugging Face folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="model dtype (default float32)")
    p.add_argument("--config", help="YAML settings file (also $CHUNKCACHE_CONFIG)")
    p.add_argument("--store", help="folder of the chunk-cache store (default ~/.cache/chunkcache/store)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most")
